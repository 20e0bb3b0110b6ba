"""Error-prioritised window sampling (trainers.priority, LatentWindows.set_priorities)."""
from pathlib import Path

import numpy as np
import pytest
import torch

from dit_envs.models.dit import DiT, DiTConfig
from trainers.data import SequenceSampler
from trainers.latents import LatentDataset, LatentWindows
from trainers.priority import (event_probabilities, flag_probabilities, flagged_windows, lift, one_step_errors,
                               priority_probabilities)


def _dataset(lengths=(9, 3, 12), d=6, seed=0) -> LatentDataset:
    rng = np.random.default_rng(seed)
    episode = np.concatenate([np.full(n, i) for i, n in enumerate(lengths)]).astype(np.int64)
    step = np.concatenate([np.arange(n) for n in lengths]).astype(np.int64)
    action = np.where(step == 0, -1, rng.integers(0, 3, len(step))).astype(np.int64)
    return LatentDataset(z=rng.uniform(-0.5, 0.5, (len(step), d)).astype(np.float16), episode=episode, step=step,
                         action=action, reward=np.zeros(len(step), np.float32),
                         terminated=np.zeros(len(step), bool), encoder_sha256="x", path=Path("x"))


def _windows(ds, length=5, seed=0) -> LatentWindows:
    d = ds.z.shape[1]
    return LatentWindows(ds, length, mean=torch.zeros(d), std=torch.ones(d), num_actions=3, seed=seed,
                         device=torch.device("cpu"))


def test_all_window_starts_are_every_valid_window_once():
    ds = _dataset()
    s = SequenceSampler({"episode": ds.episode, "step": ds.step}, 5)
    starts = s.all_window_starts()
    want = [i for i in range(len(ds.step) - 4) if ds.episode[i] == ds.episode[i + 4]]
    assert starts.tolist() == want and len(starts) == s.num_windows


def test_probabilities_follow_error_power():
    e = np.array([0.0, 1.0, 2.0, 4.0])
    p = priority_probabilities(e, 2.0)
    assert p.sum() == pytest.approx(1.0) and np.all(np.diff(p) > 0) and p[0] > 0
    assert p[3] / p[2] == pytest.approx(4.0, rel=1e-3)
    assert np.allclose(priority_probabilities(e, 0.0), 0.25)
    assert lift(p, np.array([False, False, False, True])) == pytest.approx(4 * p[3])


@pytest.mark.parametrize("errors, alpha, field", [
    (np.array([]), 1.0, "errors"), (np.array([1.0, -1.0]), 1.0, "errors"), (np.array([1.0, np.nan]), 1.0, "errors"),
    (np.array([1.0]), -0.5, "alpha"),
])
def test_bad_probabilities_input_raises_naming_the_field(errors, alpha, field):
    with pytest.raises(ValueError, match=field):
        priority_probabilities(errors, alpha)


def test_prioritised_fraction_of_each_batch_goes_to_the_heavy_window():
    w = _windows(_dataset())
    n = w.sampler.num_windows
    probs = np.zeros(n)
    probs[3] = 1.0  # all prioritised draws on window 3
    w.set_priorities(probs, 0.75)
    starts = w.draw_starts(400)
    assert (starts[:300] == w.sampler.all_window_starts()[3]).all()
    assert len(np.unique(starts[300:])) > 1  # the other quarter is uniform
    w.set_priorities(None, 0.0)
    assert len(np.unique(w.draw_starts(400))) == n


@pytest.mark.parametrize("probs, fraction, field", [
    (np.ones(3), 0.5, "probs"), (None, 1.5, "fraction"),
])
def test_bad_priorities_raise(probs, fraction, field):
    with pytest.raises(ValueError, match=field):
        _windows(_dataset()).set_priorities(probs, fraction)


def test_one_step_errors_single_out_a_corrupted_target_and_are_seeded():
    ds = _dataset()
    w = _windows(ds)
    torch.manual_seed(0)
    dit = DiT(DiTConfig(latent_dim=6, num_actions=3, context_len=4, width=16, depth=1, heads=2, freq_dim=16)).eval()
    starts = w.sampler.all_window_starts()
    x = w.z.float().clone()
    x[starts[5] + 4] += 8.0  # the target row of window 5 is far from anything the model predicts
    kw = dict(context_len=4, sampling_steps=2, clamp=lambda v: v, seed=3, batch=4)
    e = one_step_errors(dit, x, w.prev_action, starts, **kw)
    assert e.shape == (len(starts),) and (e >= 0).all() and int(np.argmax(e)) == 5
    assert np.array_equal(e, one_step_errors(dit, x, w.prev_action, starts, **kw))


def test_event_windows_are_balanced_by_sign_and_stay_in_their_episode():
    reward = np.zeros(20)
    reward[6], reward[10], reward[15], reward[17] = 1, -1, -1, -1  # row 10 is episode 1's first row
    episode = np.array([0] * 10 + [1] * 10)
    starts = np.array([0, 1, 2, 3, 4, 5, 6, 7, 10, 11, 12, 13, 14])
    p = event_probabilities(reward, episode, starts, first_target=2, length=3, horizon=1)
    # window s predicts row s+2 and counts events up to row s+3 of its own episode
    got = {int(s): float(v) for s, v in zip(starts, p) if v > 0}
    assert got.keys() == {3, 4, 12, 13, 14}  # not 7: its row 10 is in the next episode
    assert got[3] == got[4] == pytest.approx(0.25)  # the sign with 2 windows gets the same mass as the one with 3
    assert all(got[s] == pytest.approx(0.5 / 3) for s in (12, 13, 14)) and p.sum() == pytest.approx(1.0)


def test_event_windows_of_one_sign_take_all_the_mass_and_none_is_an_error():
    reward, episode = np.zeros(12), np.zeros(12, np.int64)
    reward[8] = -1
    starts = np.arange(8)
    p = event_probabilities(reward, episode, starts, first_target=1, length=2, horizon=0)
    assert np.flatnonzero(p).tolist() == [7] and p.sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="reward"):
        event_probabilities(np.zeros(12), episode, starts, first_target=1, length=2, horizon=0)
    with pytest.raises(ValueError, match="first_target"):
        event_probabilities(reward, episode, starts, first_target=2, length=2, horizon=0)


def test_flagged_windows_share_the_mass_uniformly_within_their_episode():
    flags = np.zeros(20, bool)
    flags[[6, 10, 13]] = True  # row 10 is episode 1's first row
    episode = np.array([0] * 10 + [1] * 10)
    starts = np.array([0, 1, 2, 3, 4, 5, 6, 7, 10, 11, 12])
    mask = flagged_windows(flags, episode, starts, first_target=2, length=3, horizon=1)
    assert starts[mask].tolist() == [3, 4, 10, 11]  # 7 reaches row 10 only across the episode boundary
    p = flag_probabilities(flags, episode, starts, first_target=2, length=3, horizon=1, name="returns")
    assert np.allclose(p[mask], 1 / 4) and not p[~mask].any()
    with pytest.raises(ValueError, match="returns"):
        flag_probabilities(np.zeros(20, bool), episode, starts, first_target=2, length=3, horizon=1, name="returns")
    with pytest.raises(ValueError, match="flags.*20.*19"):
        flagged_windows(flags[:19], episode, starts, first_target=2, length=3, horizon=1)
