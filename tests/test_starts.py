"""Imagination start contexts: drawn from an episode store (trainers.starts) and served by the env."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from dit_envs.envs.imagination import DiTWMVectorEnv
from dit_envs.envs.single import DiTWMEnv
from trainers.data import EpisodeStore
from trainers.starts import draw_start_contexts

NULL = 6


class PixelIdEncoder(torch.nn.Module):
    """``encode`` returns each frame's (episode, step) id written into its first two pixels."""

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        return frames[:, 0, 0, :2].float()


def make_store(root, lengths: list[int], chunk_rows: int = 5) -> EpisodeStore:
    """Episodes of the given lengths written interleaved row by row (as parallel envs write them)."""
    store = EpisodeStore(root, chunk_rows=chunk_rows)
    store.write_meta(game="Pong")
    for t in range(max(lengths)):
        for e, n in enumerate(lengths):
            if t >= n:
                continue
            obs = np.zeros((1, 3, 64, 64), np.uint8)
            obs[0, 0, 0, :2] = (e, t)
            store.add(obs=obs, action=np.array([-1 if t == 0 else (e + t) % 6]), reward=np.zeros(1, np.float32),
                      terminated=np.array([t == n - 1]), truncated=np.zeros(1, bool), episode=np.array([e]),
                      step=np.array([t]))
    store.flush()
    return store


def test_windows_lie_in_one_episode_with_their_previous_actions(tmp_path):
    store = make_store(tmp_path, [9, 3, 7, 2])  # 21 rows in 5 chunks; episode 3 is shorter than K
    assert len(store.chunk_paths()) == 5
    z, a = draw_start_contexts(tmp_path, PixelIdEncoder(), k=3, m=200, num_actions=NULL, seed=1)
    assert z.shape == (200, 3, 2) and z.dtype == torch.float32 and a.shape == (200, 3) and a.dtype == torch.int64
    ep, st = z[..., 0].long(), z[..., 1].long()
    assert bool((ep == ep[:, :1]).all()) and bool((st[:, 1:] - st[:, :-1] == 1).all())
    assert set(ep[:, 0].tolist()) == {0, 1, 2}  # every episode with >= 3 frames, none of the 2-frame one
    want = torch.where(st == 0, torch.tensor(NULL), (ep + st) % 6)
    assert torch.equal(a, want)
    counts = np.bincount(ep[:, 0].numpy(), minlength=3)  # uniform over windows: 7, 1 and 5 of them
    assert counts[0] > counts[2] > counts[1]
    z2, a2 = draw_start_contexts(tmp_path, PixelIdEncoder(), k=3, m=200, num_actions=NULL, seed=1)
    assert torch.equal(z, z2) and torch.equal(a, a2)
    assert not torch.equal(z, draw_start_contexts(tmp_path, PixelIdEncoder(), k=3, m=200, num_actions=NULL,
                                                  seed=2)[0])


@pytest.mark.parametrize("kw, match", [
    (dict(k=0), "k: expected >= 1, got 0"),
    (dict(m=0), "m: expected >= 1, got 0"),
    (dict(k=10), r"k: expected <= the longest episode segment \(9 rows\), got 10 in"),
])
def test_bad_arguments(tmp_path, kw, match):
    make_store(tmp_path, [9, 3])
    with pytest.raises(ValueError, match=match):
        draw_start_contexts(tmp_path, PixelIdEncoder(), **{"k": 3, "m": 4, "num_actions": NULL, **kw})


def test_unreadable_chunks_are_skipped_with_a_warning(tmp_path):
    store = make_store(tmp_path, [9, 3, 7])
    bad = store.chunk_paths()[1]
    bad.write_bytes(b"not a zip file")
    with pytest.warns(UserWarning, match=re.escape(f"skipping unreadable chunk {bad}")):
        z, _ = draw_start_contexts(tmp_path, PixelIdEncoder(), k=2, m=100, num_actions=NULL)
    written = [(e, t) for t in range(9) for e, n in enumerate([9, 3, 7]) if t < n]  # make_store's row order
    drawn = {(int(e), int(t)) for e, t in z.reshape(-1, 2).tolist()}
    assert drawn and drawn <= set(written) - set(written[5:10])  # nothing from the second chunk's 5 rows


def test_empty_store_names_the_directory(tmp_path):
    with pytest.raises(ValueError, match="store_dir: expected an episode store with readable chunks"):
        draw_start_contexts(tmp_path, PixelIdEncoder(), k=3, m=4, num_actions=NULL)


def test_env_resets_from_given_start_contexts(tiny_bundle):
    z = torch.linspace(-0.5, 0.5, 5)[:, None, None].expand(5, 4, 32).contiguous()  # 5 contexts, one value each
    a = torch.full((5, 4), 2)
    envs = DiTWMVectorEnv(8, checkpoint=str(tiny_bundle), obs_type="latent", start_contexts=(z, a))
    obs, _ = envs.reset(seed=0)
    first = obs[:, 0, 0]
    assert np.allclose(obs, first[:, None, None], atol=1e-5)  # each env holds one whole given context
    assert np.isin(np.round(first, 4), np.round(z[:, 0, 0].numpy(), 4)).all()
    assert len(np.unique(np.round(first, 4))) > 1
    envs.close()
    single = DiTWMEnv(checkpoint=str(tiny_bundle), obs_type="latent", start_contexts=(z[:1], a[:1]))
    assert np.allclose(single.reset(seed=0)[0], -0.5, atol=1e-5)


@pytest.mark.parametrize("z_shape, a, match", [
    ((5, 3, 32), None, r"expected z of shape \(M >= 1, 4, 32\), got \(5, 3, 32\)"),
    ((0, 4, 32), None, r"expected z of shape \(M >= 1, 4, 32\), got \(0, 4, 32\)"),
    ((5, 4, 32), torch.zeros(5, 4), "expected integer actions of shape"),
    ((5, 4, 32), torch.full((5, 4), 7), r"expected actions in \[0, 6\], got min 7, max 7"),
    ((5, 4, 32), "nan", "expected finite latents, got NaN or inf"),
])
def test_env_rejects_bad_start_contexts(tiny_bundle, z_shape, a, match):
    z = torch.full(z_shape, float("nan") if isinstance(a, str) else 0.0)
    a = torch.zeros(z_shape[:2], dtype=torch.int64) if a is None or isinstance(a, str) else a
    with pytest.raises(ValueError, match="start_contexts: " + match):
        DiTWMVectorEnv(2, checkpoint=str(tiny_bundle), obs_type="latent", start_contexts=(z, a))
