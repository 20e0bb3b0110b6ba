"""Streaming DiT students (`ditwm distill --streaming`): windowed attention with relative positions, a rolling
context cache in the env state, and their distillation."""
from dataclasses import replace

import gymnasium as gym
import numpy as np
import pytest
import torch

import dit_envs  # noqa: F401  (registers DiTWM/*)
from dit_envs.bundle import load_bundle
from dit_envs.envs.checker import check_vector_env
from dit_envs.models.attention import window_attention
from dit_envs.models.dit import DiT, DiTConfig
from dit_envs.models.dit_world_model import DiTWorldModel, pack_cache, unpack_cache
from tests.test_distill import TINY
from trainers.common import ArgError
from trainers.distill import Args, main
from trainers.distill_student import make_student

D_Z, A, K = 6, 3, 3


def stream_dit(seed=0, depth=3) -> DiT:
    """A tiny streaming student with every parameter perturbed (relative embeddings included)."""
    torch.manual_seed(seed)
    dit = DiT(DiTConfig(latent_dim=D_Z, num_actions=A, context_len=K, width=16, depth=depth, heads=2, freq_dim=16,
                        shortcut_steps=4, streaming=True))
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return dit.eval()


def test_window_attention_by_hand():
    g = torch.Generator().manual_seed(0)
    B, H, T, P, dh, W = 2, 2, 4, 3, 3, 3
    q = torch.randn(B, H, T, dh, generator=g)
    k, v = torch.randn(B, H, P + T, dh, generator=g), torch.randn(B, H, P + T, dh, generator=g)
    rk, rv = torch.randn(W, H * dh, generator=g), torch.randn(W, H * dh, generator=g)
    valid = torch.ones(B, P + T, dtype=torch.bool)
    valid[1, :3] = False  # batch row 1: the first three keys are padding
    got = window_attention(q, k, v, rk, rv, offset=P, key_valid=valid)
    ref = torch.zeros_like(got)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                js = [P + i - o for o in range(W) if P + i - o >= 0 and (valid[b, P + i - o] or o == 0)]
                r = lambda e, j: e[P + i - j, h * dh:(h + 1) * dh]  # noqa: E731  (embedding of offset i - j)
                logits = torch.stack([q[b, h, i] @ (k[b, h, j] + r(rk, j)) / dh ** 0.5 for j in js])
                p = torch.softmax(logits, 0)
                ref[b, h, i] = sum(p[n] * (v[b, h, j] + r(rv, j)) for n, j in enumerate(js))
    assert torch.allclose(got, ref, atol=1e-5)
    # one query seeing all keys (the env's fast path) equals the general path
    one = window_attention(q[:, :, :1], k[:, :, :3], v[:, :, :3], rk, rv, offset=2)
    general = window_attention(q[:, :, :1], k[:, :, :3], v[:, :, :3], rk, rv, offset=2,
                               key_valid=torch.ones(B, 3, dtype=torch.bool))
    assert torch.allclose(one, general, atol=1e-6)
    with pytest.raises(ValueError, match="k, v: expected 7 tokens"):
        window_attention(q, k[:, :, 1:], v[:, :, 1:], rk, rv, offset=P)


def test_rolling_cache_equals_the_whole_sequence():
    dit = stream_dit()
    g = torch.Generator().manual_seed(1)
    B, L = 4, 8  # longer than the window: the cache rolls
    z, a = torch.randn(B, L, D_Z, generator=g), torch.randint(0, A + 1, (B, L), generator=g)
    x, t, act = torch.randn(B, D_Z, generator=g), torch.full((B,), 0.75), torch.randint(0, A, (B,), generator=g)
    d = torch.full((B,), 0.25)
    with torch.no_grad():
        seq_out = dit(torch.cat([z, x[:, None]], 1), torch.cat([torch.zeros(B, L), t[:, None]], 1),
                      torch.cat([a, act[:, None]], 1), step_size=torch.cat([torch.zeros(B, L), d[:, None]], 1))
        cache = dit.context_cache(z[:, :K], a[:, :K])
        for i in range(K, L):
            cache = dit.extend_cache(cache, z[:, i], a[:, i])
        assert all(kk.shape[2] == K for kk, _ in cache)
        got = dit.predict_next(x, t, act, cache, step_size=d)
        assert torch.allclose(got, seq_out[:, -1], atol=1e-5)
        # padding keys: the same as the sequence without them
        valid = torch.ones(B, L + 1, dtype=torch.bool)
        valid[:, :3] = False
        full = torch.cat([z, x[:, None]], 1)
        tt, aa = torch.cat([torch.zeros(B, L), t[:, None]], 1), torch.cat([a, act[:, None]], 1)
        dd = torch.cat([torch.zeros(B, L), d[:, None]], 1)
        padded = dit(full, tt, aa, step_size=dd, key_valid=valid)[:, -1]
        assert torch.allclose(padded, dit(full[:, 3:], tt[:, 3:], aa[:, 3:], step_size=dd[:, 3:])[:, -1], atol=1e-5)
        assert not torch.allclose(padded, seq_out[:, -1], atol=1e-3)  # the history matters
    assert torch.equal(pack_cache(unpack_cache(pack_cache(cache))), pack_cache(cache))
    plain = DiT(replace(dit.config, streaming=False))
    with pytest.raises(ValueError, match="config.streaming: expected True"):
        plain.extend_cache(cache, z[:, 0], a[:, 0])
    with pytest.raises(ValueError, match="key_valid: expected None"):
        plain(full[:, :4], tt[:, :4], aa[:, :4], key_valid=valid[:, :4])


def streaming_world_model(base: DiTWorldModel, **kw) -> DiTWorldModel:
    """The teacher ``base`` with a streaming student of its DiT (random relative embeddings) in its place."""
    student = make_student(base.dit, 4, streaming=True)
    with torch.no_grad():
        for blk in student.blocks:
            blk.rel_k.normal_(0, 0.3)
            blk.rel_v.normal_(0, 0.3)
    wm = DiTWorldModel(base.autoencoder, student, base.heads, **kw).eval()
    wm.set_latent_stats(base.latent_mean, base.latent_std)
    return wm


def test_world_model_rolls_its_cache_like_the_sequence(teacher_bundle):
    """Seven 1-step env steps of a streaming world model equal Euler steps of the DiT run on the whole imagined
    sequence (start context + every sample so far), drawing the same noise."""
    b = load_bundle(teacher_bundle)
    wm = streaming_world_model(b.model, sampling_steps=1, temperature=0.7)
    student = wm.dit
    N, Kw = 3, wm.context_len
    z0, a0 = b.start_z[:N].float(), b.start_a[:N]
    state = wm.initial_state(z0, a0)
    assert state["kv"].shape == (N, student.config.depth, 2, student.config.heads, Kw, student.config.width // 2)
    gen, ref_gen = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    seq, acts = wm.normalize(z0), a0.clone()
    for _ in range(7):
        action = torch.randint(0, wm.num_actions, (N,), generator=torch.Generator().manual_seed(len(acts[0])))
        state, z_next, _, _ = wm.step(state, action, gen)
        noise = 0.7 * torch.randn(N, wm.latent_dim, generator=ref_gen)
        with torch.no_grad():
            v = student(torch.cat([seq, noise[:, None]], 1), torch.cat([torch.zeros(seq.shape[:2]), torch.ones(N, 1)],
                                                                       1),
                        torch.cat([acts, action[:, None]], 1),
                        step_size=torch.cat([torch.zeros(seq.shape[:2]), torch.ones(N, 1)], 1))[:, -1]
        ref = wm.denormalize(noise - v).clamp(-1, 1)
        assert torch.allclose(z_next, ref, atol=1e-4)
        seq, acts = torch.cat([seq, wm.normalize(z_next)[:, None]], 1), torch.cat([acts, action[:, None]], 1)
    with pytest.raises(ValueError, match=r"state\['kv'\]: expected shape"):
        wm.step({"z": state["z"], "a": state["a"]}, action)


def test_history_rows_by_hand(tmp_path):
    from trainers.latents import LatentDataset, LatentWindows

    # episode 0: steps 0-5, then a gap (a lost chunk), then 20-25; episode 1: steps 0-5
    step = np.array([*range(6), *range(20, 26), *range(6)])
    episode = np.array([0] * 12 + [1] * 6)
    R = len(step)
    z = np.arange(R, dtype=np.float16)[:, None].repeat(2, 1)
    action = np.where(step == 0, -1, step % 3)
    ds = LatentDataset(z=z, episode=episode, step=step, action=action, reward=np.zeros(R, np.float32),
                       terminated=np.zeros(R, bool), encoder_sha256="", path=tmp_path / "none")
    w = LatentWindows(ds, 3, mean=torch.zeros(2), std=torch.ones(2), num_actions=A, seed=0, device=torch.device("cpu"))
    starts = np.array([14, 13, 8, 3])  # episode 1 step 2; episode 1 step 1; episode 0 step 22; episode 0 step 3
    x, pa, valid = w.history(starts, 3)
    assert valid.tolist() == [[False, True, True], [False, False, True], [False, True, True], [True, True, True]]
    assert x[0, 1:, 0].tolist() == [12.0, 13.0] and x[3, :, 0].tolist() == [0.0, 1.0, 2.0]
    assert pa[0, 1].item() == A and pa[0, 2].item() == 1  # the episode's first row has the null action
    assert w.history(starts, 0)[0].shape == (4, 0, 2)


def test_streaming_distillation_runs_steps_as_an_env_and_resumes(tiny_stage1_store, teacher_bundle, tmp_path):
    common = dict(teacher=str(teacher_bundle), data=str(tiny_stage1_store), out=str(tmp_path / "s"), **TINY)
    assert main(Args(**common, steps=4, streaming=True)) == 0
    b = load_bundle(tmp_path / "s" / "bundle")
    assert b.model.dit.config.streaming and any(blk.rel_k.abs().sum() > 0 for blk in b.model.dit.blocks)
    assert "| streaming (rolling context cache) | True |" in (tmp_path / "s" / "bundle" / "README.md").read_text()
    envs = gym.make_vec("DiTWM/Pong-v0", num_envs=3, checkpoint=str(tmp_path / "s" / "bundle"), sampling_steps=2,
                        obs_type="latent")
    obs = [envs.reset(seed=0)[0]]
    for _ in range(12):  # long enough for terminations and resets of single envs
        obs.append(envs.step(np.array([0, 1, 2]))[0])
    envs.reset(seed=0)
    again = [envs.reset(seed=0)[0]] + [envs.step(np.array([0, 1, 2]))[0] for _ in range(12)]
    assert np.isfinite(obs).all() and np.array_equal(np.stack(obs), np.stack(again))
    core = envs.unwrapped.core  # a per-env reset replaces exactly the reset envs' rows of the rolling cache
    before = core.state["kv"].clone()
    mask = np.array([True, False, True])
    core.reset_envs(mask)
    fresh = core.model.initial_state(core.state["z"][mask], core.state["a"][mask])["kv"]
    assert torch.equal(core.state["kv"][mask], fresh) and not torch.equal(before[mask], fresh)
    assert torch.equal(core.state["kv"][~mask], before[~mask])
    envs.close()
    envs = gym.make_vec("DiTWM/Pong-v0", num_envs=3, checkpoint=str(tmp_path / "s" / "bundle"), obs_type="latent",
                        max_episode_steps=5)
    ends = check_vector_env(envs, steps=40)  # spaces, autoreset contract, seeded determinism
    assert ends["truncated"] > 0  # envs ended and were reset one by one: their rows of the cache replaced
    envs.close()
    with pytest.raises(ArgError, match=r"--streaming: expected True \(the checkpoint's\), got False"):
        main(Args(**{**common, "steps": 8}, resume=True))
    assert main(Args(**{**common, "steps": 8}, resume=True, streaming=True)) == 0
    im = dict(streaming=True, imagined_fraction=0.5, imagined_pool=32, imagined_steps=4)
    assert main(Args(**{**common, "out": str(tmp_path / "im"), "steps": 4}, **im)) == 0  # imagined history too


def test_imagined_pool_keeps_each_contexts_history(teacher_bundle):
    """With ``history``, every pooled context comes with the rows before it: first the real rows before its start
    window, then the rollout's own, so history + context is one contiguous imagined trajectory."""
    from tests.test_distill_options import _Windows
    from trainers.distill_pool import imagined_pool

    wm = load_bundle(teacher_bundle).model
    H, n, K = 4, 6, wm.context_len

    class Hist(_Windows):
        def __init__(self, wm):
            super().__init__(wm)
            g = torch.Generator().manual_seed(9)
            self.hx, self.ha = torch.randn(20, H, wm.latent_dim, generator=g), torch.randint(0, A, (20, H), generator=g)
            self.hv = torch.ones(20, H, dtype=torch.bool)
            self.hv[::2, :2] = False  # even windows start 2 rows after their episode's first row

        def history(self, starts, length):
            i = torch.from_numpy(starts)
            return self.hx[i][:, H - length:], self.ha[i][:, H - length:], self.hv[i][:, H - length:]

    w = Hist(wm)
    ctx, ctx_a, act, hx, ha, hv = imagined_pool(wm, w, size=3 * n, steps=3, seed=3, sticky=0.5, history=H)
    assert hx.shape == (3 * n, H, wm.latent_dim) and ha.shape == hv.shape == (3 * n, H) and hv.dtype == torch.bool
    seq, seq_a = torch.cat([hx, ctx], 1), torch.cat([ha, ctx_a], 1)  # (3n, H + K, ·)
    for a, b in ((slice(0, n), slice(n, 2 * n)), (slice(n, 2 * n), slice(2 * n, 3 * n))):  # one step later
        assert torch.allclose(seq[b, :-1], seq[a, 1:], atol=1e-6) and torch.equal(seq_a[b, :-1], seq_a[a, 1:])
        assert torch.equal(hv[b, :-1], hv[a, 1:]) and bool(hv[b, -1].all())
    for r in range(n):  # after one step: the real history minus its oldest row, then the start window's first row
        s = [j for j in range(20) if torch.allclose(hx[r, :-1], w.hx[j, 1:])]
        assert s and torch.allclose(hx[r, -1], w.x[s[0], 0], atol=1e-5) and torch.equal(hv[r, :-1], w.hv[s[0], 1:])
    plain = imagined_pool(wm, _Windows(wm), size=3 * n, steps=3, seed=3, sticky=0.5)
    assert len(plain) == 3


def test_training_evaluation_rolls_the_cache_like_the_env(teacher_bundle):
    """``eval/mse@h`` of a streaming student (trainers.pretrain_eval) equals the error of a world-model rollout
    drawing the same noise: the evaluation rolls the cache exactly as the env does."""
    from dit_envs.models.flow import logit_normal_times
    from trainers.pretrain_eval import evaluate
    from trainers.pretrain_objective import PretrainNet, Windows

    b = load_bundle(teacher_bundle)
    base = b.model
    wm = streaming_world_model(base, sampling_steps=2)
    student = wm.dit
    Kw, B, H = wm.context_len, 3, 4
    g = torch.Generator().manual_seed(5)
    z = torch.rand(B, Kw + H, wm.latent_dim, generator=g) * 2 - 1
    pa = torch.randint(0, wm.num_actions, (B, Kw + H), generator=g)
    w = Windows(x=wm.normalize(z), z=z, prev_action=pa, reward=torch.zeros(B, Kw + H),
                terminated=torch.zeros(B, Kw + H, dtype=torch.bool))
    got = evaluate(PretrainNet(student, base.heads), w, context_len=Kw, sampling_steps=2, mean=wm.latent_mean,
                   std=wm.latent_std, seed=7)
    gen = torch.Generator().manual_seed(7)
    logit_normal_times((B,), generator=gen)  # the evaluation's flow-loss draws come first
    torch.randn(B, wm.latent_dim, generator=gen)
    state = wm.initial_state(z[:, :Kw], pa[:, :Kw])
    for h in range(1, H + 1):
        state, z_next, _, _ = wm.step(state, pa[:, Kw + h - 1], gen)
        if h in (1, 4):
            assert got[f"eval/mse@{h}"] == pytest.approx((z_next - z[:, Kw + h - 1]).square().mean().item(), rel=1e-5)
