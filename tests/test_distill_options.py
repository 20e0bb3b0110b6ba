"""`ditwm distill` options: a shallower student (--student-depth), the pixel term (--pixel-weight) and imagined
contexts (--imagined-fraction)."""
import json

import gymnasium as gym
import numpy as np
import pytest
import torch

import dit_envs  # noqa: F401  (registers DiTWM/*)
from dit_envs.bundle import load_bundle
from dit_envs.models.dit import DiT, DiTConfig
from tests.test_distill import A, D_Z, K, TINY, batch, teacher
from trainers.checkpoint import load_checkpoint
from trainers.common import ArgError
from trainers.distill import Args, main
from trainers.distill_student import make_student, student_blocks
from trainers.distill_objective import DistillNet


def test_student_blocks_by_hand():
    assert student_blocks(4, 4) == [0, 1, 2, 3] and student_blocks(4, 2) == [0, 3] and student_blocks(4, 1) == [0]
    assert student_blocks(4, 3) == [0, 2, 3] and student_blocks(8, 4) == [0, 2, 5, 7]
    for bad in (0, 5):
        with pytest.raises(ValueError, match="depth: expected 1 .. 4"):
            student_blocks(4, bad)


def test_shallow_student_is_the_teacher_with_only_the_chosen_blocks():
    torch.manual_seed(0)
    t = DiT(DiTConfig.from_preset("tiny", latent_dim=D_Z, num_actions=A, context_len=K, depth=4))
    with torch.no_grad():
        for p in t.parameters():
            p.add_(0.3 * torch.randn_like(p))
    s = make_student(t.eval(), 4, depth=2)
    assert s.config.depth == 2 and len(s.blocks) == 2 and s.config.shortcut_steps == 4
    for i, j in ((0, 0), (1, 3)):
        for (k, a), b in zip(s.blocks[i].state_dict().items(), t.blocks[j].state_dict().values()):
            assert torch.equal(a, b), k
    pruned = DiT(s.config)  # the teacher by hand with blocks 1 and 2 removed, no step conditioning
    pruned.load_state_dict({**t.state_dict(), **s.state_dict()}, strict=False)
    pruned.step_embed = None
    ctx, ctx_a, a = batch()
    x, tt = torch.randn(16, D_Z), torch.rand(16)
    ref = pruned.predict_next(x, tt, a, pruned.context_cache(ctx, ctx_a))
    got = s.predict_next(x, tt, a, s.context_cache(ctx, ctx_a), step_size=torch.full((16,), 0.5))
    assert torch.equal(got, ref)  # a fresh step embedding adds zero
    with pytest.raises(ValueError, match="depth: expected 1 .. 4"):
        make_student(t, 4, depth=5)


def test_shallow_student_bundle_steps_as_an_env_and_resumes_only_at_its_depth(tiny_stage1_store, teacher_bundle,
                                                                               tmp_path, capsys):
    from trainers.distill import cli

    common = dict(teacher=str(teacher_bundle), data=str(tiny_stage1_store), out=str(tmp_path / "d"), **TINY)
    assert main(Args(**common, steps=4, student_depth=1)) == 0
    b = load_bundle(tmp_path / "d" / "bundle")
    assert b.model.dit.config.depth == 1 and load_bundle(teacher_bundle).model.dit.config.depth == 2
    assert "| student blocks | 1 of the teacher's 2 |" in (tmp_path / "d" / "bundle" / "README.md").read_text()
    envs = gym.make_vec("DiTWM/Pong-v0", num_envs=2, checkpoint=str(tmp_path / "d" / "bundle"), sampling_steps=1,
                        obs_type="latent")
    envs.reset(seed=0)
    obs, reward, *_ = envs.step(envs.action_space.sample())
    assert np.isfinite(obs).all() and np.isfinite(reward).all()
    envs.close()
    argv = ["--teacher", str(teacher_bundle), "--data", str(tiny_stage1_store), "--out", str(tmp_path / "d"),
            "--steps", "8", "--resume"]
    capsys.readouterr()
    assert cli(argv) == 2  # the checkpoint holds a 1-block student, the default asks for the teacher's 2
    assert "--student-depth: expected 1 (the checkpoint's student), got 2" in capsys.readouterr().err
    with pytest.raises(ArgError, match=r"--pixel-weight: expected 0.0 \(the checkpoint's\), got 1.0"):
        main(Args(**{**common, "steps": 8}, student_depth=1, resume=True, pixel_weight=1.0))
    assert main(Args(**{**common, "steps": 8}, student_depth=1, resume=True)) == 0
    assert load_checkpoint(tmp_path / "d")[1]["step"] == 8


def perturb(wm):
    """The 6-step tiny teacher is nearly a zero velocity field and its tiny decoder nearly ignores the latent:
    perturb both, so student/teacher differences show in pixels."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in [*wm.dit.parameters(), *wm.autoencoder.parameters()]:
            p.add_(0.3 * torch.randn_like(p))
    return wm


def test_pixel_term_by_hand(teacher_bundle):
    from trainers.pretrain_objective import motion_weighted_mse

    wm = perturb(load_bundle(teacher_bundle).model)
    d_z = wm.latent_dim
    g = torch.Generator().manual_seed(0)
    B = 6
    inputs = {"context": torch.randn(B, 2, d_z, generator=g), "x": torch.randn(B, d_z, generator=g),
              "v": torch.randn(B, d_z, generator=g), "t": torch.tensor([1.0, 1.0, 0.5, 0.25, 0.75, 0.5]),
              "step_size": torch.tensor([1.0, 0.5, 0.5, 0.25, 0.25, 0.25])}  # rows 0, 2, 3 end at the sample
    net = DistillNet(make_student(teacher(), 4))
    mean, std = torch.randn(d_z, generator=g) * 0.1, torch.rand(d_z, generator=g) + 0.5
    net.set_decoder(wm.autoencoder, mean, std, pixel_weight=2.0, motion_boost=50.0)
    assert net.pixel_loss(inputs, inputs["v"]).item() == 0.0  # the teacher's own jump: identical end points
    v = inputs["v"] + 0.3 * torch.randn(B, d_z, generator=g)
    raw = lambda x: (x * std + mean).clamp(-1.0, 1.0)  # noqa: E731
    fin = [0, 2, 3]
    d = inputs["step_size"][fin, None]
    with torch.no_grad():
        img = wm.autoencoder.decode(raw(inputs["x"][fin] - d * v[fin]))
        target = wm.autoencoder.decode(raw(inputs["x"][fin] - d * inputs["v"][fin]))
        prev = wm.autoencoder.decode(raw(inputs["context"][fin, -1]))
        ref = motion_weighted_mse(img, target, prev, motion_boost=50.0, threshold=0.1, foreground=True).mean()
        assert ref.item() > 1e-4 and net.pixel_loss(inputs, v).item() == pytest.approx(ref.item(), rel=1e-5)
        none = {**inputs, "t": torch.ones(B), "step_size": torch.full((B,), 0.5)}
        assert net.pixel_loss(none, v).item() == 0.0
    assert "decoder" not in dict(net.named_modules()) and not any(k.startswith("lat_") for k in net.state_dict())


def test_pixel_weighted_distillation_runs_and_changes_the_student(tiny_stage1_store, teacher_bundle, tmp_path):
    from dit_envs.bundle import save_bundle

    b = load_bundle(teacher_bundle)
    perturb(b.model)
    save_bundle(b.model, tmp_path / "t", game=b.config["game"], action_meanings=b.config["action_meanings"],
                start_z=b.start_z, start_a=b.start_a)
    common = dict(teacher=str(tmp_path / "t"), data=str(tiny_stage1_store), steps=4, **{**TINY, "log_every": 1})
    assert main(Args(**common, out=str(tmp_path / "px"), pixel_weight=10.0)) == 0
    assert main(Args(**common, out=str(tmp_path / "plain"))) == 0
    a, b = load_bundle(tmp_path / "px" / "bundle"), load_bundle(tmp_path / "plain" / "bundle")
    pa, pb = dict(a.model.dit.named_parameters()), dict(b.model.dit.named_parameters())
    assert all(torch.isfinite(p).all() for p in pa.values()) and any(not torch.equal(pa[k], pb[k]) for k in pa)
    losses = [[json.loads(r)["loss"] for r in (tmp_path / o / "metrics.jsonl").read_text().splitlines()
               if '"loss"' in r] for o in ("px", "plain")]
    assert losses[0][0] > losses[1][0]  # the same first batch, plus a positive pixel term


def test_motion_weighted_mse_by_hand():
    from trainers.pretrain_objective import motion_weighted_mse

    target = torch.zeros(1, 3, 2, 2)
    prev = target.clone()
    prev[0, 1, 0, 0] = 1.0  # one pixel moved
    img = torch.full((1, 3, 2, 2), 0.5)
    img[0, :, 0, 0] = 1.0
    # squared errors per pixel (mean over channels): 1.0 at the moved pixel, 0.25 elsewhere; weights 11 and 1
    got = motion_weighted_mse(img, target, prev, motion_boost=10.0, threshold=0.1)
    assert got.shape == (1,) and got.item() == pytest.approx((11 * 1.0 + 3 * 0.25) / 14)
    target = torch.zeros(1, 3, 3, 3)
    target[0, 1, 2, 2] = 1.0  # a still object: not moved, but off the median (background) colour
    img = torch.zeros(1, 3, 3, 3)
    img[0, :, 0, 0] = 0.3  # a background error of 0.09; the object is missing: error (0 + 1 + 0) / 3
    for fg, w in ((False, 1.0), (True, 11.0)):
        got = motion_weighted_mse(img, target, target, motion_boost=10.0, threshold=0.1, foreground=fg)
        assert got.item() == pytest.approx((0.09 + w / 3) / (8 + w))


class _Windows:
    """Stand-in for LatentWindows: 20 random windows of K + 1 standardised latents."""

    def __init__(self, wm, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(20, wm.context_len + 1, wm.latent_dim, generator=g) * 0.5
        self.a = torch.randint(0, wm.num_actions + 1, (20, wm.context_len + 1), generator=g)
        self.z = wm.denormalize(self.x)
        self.sampler = type("S", (), {"all_window_starts": staticmethod(lambda: np.arange(20))})()

    def windows(self, starts):
        i = torch.from_numpy(starts)
        return type("W", (), {"x": self.x[i], "z": self.z[i], "prev_action": self.a[i]})


def test_imagined_pool_is_the_teachers_own_rollout_and_seeded(teacher_bundle, monkeypatch):
    from trainers.distill_pool import imagined_pool

    wm = load_bundle(teacher_bundle).model
    K, n = wm.context_len, 6
    predict = wm.heads.predict
    monkeypatch.setattr(wm.heads, "predict", lambda *a, **k: (predict(*a, **k)[0], torch.zeros(a[0].shape[0],
                                                                                            dtype=torch.bool)))
    ctx, ctx_a, act = imagined_pool(wm, _Windows(wm), size=2 * n, steps=2, seed=3, sticky=0.5)
    assert ctx.shape == (2 * n, K, wm.latent_dim) and ctx_a.shape == (2 * n, K) and act.shape == (2 * n,)
    assert int(act.min()) >= 0 and int(act.max()) < wm.num_actions
    # rows n..2n are the step after rows 0..n: the context slides by one and the recorded next action is taken
    assert torch.allclose(ctx[n:, :-1], ctx[:n, 1:], atol=1e-6) and torch.equal(ctx_a[n:, :-1], ctx_a[:n, 1:])
    assert torch.equal(ctx_a[n:, -1], act[:n])
    assert float(wm.denormalize(ctx).abs().max()) <= 1.0 + 1e-6  # the env's clamp to the encoder's range
    again = imagined_pool(wm, _Windows(wm), size=2 * n, steps=2, seed=3, sticky=0.5)
    other = imagined_pool(wm, _Windows(wm), size=2 * n, steps=2, seed=4, sticky=0.5)
    assert all(torch.equal(a, b) for a, b in zip((ctx, ctx_a, act), again))
    assert not torch.equal(ctx, other[0])
    held = imagined_pool(wm, _Windows(wm), size=3 * n, steps=3, seed=3, sticky=1.0)[2]
    assert torch.equal(held[:n], held[n:2 * n]) and torch.equal(held[:n], held[2 * n:])  # sticky 1: one action
    with pytest.raises(ValueError, match="sticky"):
        imagined_pool(wm, _Windows(wm), size=4, steps=2, seed=0, sticky=1.5)
    # rows 0 and 1 of the chunk end their game at the first step: none of their contexts is kept
    monkeypatch.setattr(wm.heads, "predict", lambda *a, **k: (predict(*a, **k)[0], torch.arange(a[0].shape[0]) < 2))
    ended = imagined_pool(wm, _Windows(wm), size=2 * n, steps=2, seed=3, sticky=0.5)
    keep = [*range(2, n), *range(n + 2, 2 * n)]
    assert ended[0].shape[0] == 2 * (n - 2) and torch.equal(ended[0], ctx[keep]) and torch.equal(ended[2], act[keep])


def test_distillation_on_imagined_contexts_runs(tiny_stage1_store, teacher_bundle, tmp_path, capsys):
    out = tmp_path / "im"
    assert main(Args(teacher=str(teacher_bundle), data=str(tiny_stage1_store), out=str(out), steps=4,
                     imagined_fraction=1.0, imagined_pool=32, imagined_steps=4, **TINY)) == 0
    assert "distill: 32 imagined contexts (4-step teacher rollouts)" in capsys.readouterr().out
    assert "| imagined fraction | 1.0 |" in (out / "bundle" / "README.md").read_text()


def test_mix_in_by_hand():
    from trainers.distill import mix_in

    pool = (torch.arange(10.0)[:, None], torch.arange(10) + 100)
    batch = (torch.full((4, 1), -1.0), torch.full((4,), -1))
    out = mix_in(pool, batch, 3, torch.Generator().manual_seed(0))
    assert out[0].shape == (4, 1) and out[0][3, 0] == -1.0 and out[1][3] == -1
    assert torch.equal(out[1][:3] - 100, out[0][:3, 0].long())  # the same pool rows in every tensor
    assert mix_in(pool, batch, 0, torch.Generator()) is batch


def test_distillation_temperatures_scale_each_trajectory_start_and_keep_the_stream_at_one():
    from trainers.distill_objective import make_distill_inputs

    t, (ctx, ctx_a, a) = teacher(), batch()
    ref = make_distill_inputs(t, ctx, ctx_a, a, teacher_steps=4, generator=torch.Generator().manual_seed(3))
    same = make_distill_inputs(t, ctx, ctx_a, a, teacher_steps=4, generator=torch.Generator().manual_seed(3),
                               temperatures=[1.0])
    for k in ref:
        assert torch.equal(ref[k], same[k]), k  # one temperature draws nothing: the default's stream unchanged
    eps = torch.randn(16, D_Z, generator=torch.Generator().manual_seed(3))
    half = make_distill_inputs(t, ctx, ctx_a, a, teacher_steps=4, generator=torch.Generator().manual_seed(3),
                               temperatures=[0.5])
    assert torch.equal(half["x"][0], 0.5 * eps)  # the first jump starts at the trajectory's start, t = 1
    mixed = make_distill_inputs(t, ctx, ctx_a, a, teacher_steps=4, generator=torch.Generator().manual_seed(3),
                                temperatures=[0.5, 1.0])
    start = mixed["x"][0]
    is_half = torch.isclose(start, 0.5 * eps).all(1)
    assert (is_half | torch.isclose(start, eps).all(1)).all() and 0 < int(is_half.sum()) < 16
    for bad in ([], [-0.5], [float("nan")]):
        with pytest.raises(ValueError, match="temperatures: expected"):
            make_distill_inputs(t, ctx, ctx_a, a, teacher_steps=4, generator=torch.Generator(), temperatures=bad)


def test_distillation_at_two_temperatures_logs_both_gaps_and_resumes_only_with_them(tiny_stage1_store,
                                                                                     teacher_bundle, tmp_path):
    common = dict(teacher=str(teacher_bundle), data=str(tiny_stage1_store), out=str(tmp_path / "d"), **TINY)
    assert main(Args(**common, steps=4, temperatures=[0.5, 1.0])) == 0
    rows = [json.loads(line) for line in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/gap@1" in r]
    assert evals and all("eval/gap@1@T0.5" in r and "eval/gap@4@T0.5" in r for r in evals)
    assert "| distilled at temperatures | 0.5, 1 |" in (tmp_path / "d" / "bundle" / "README.md").read_text()
    assert load_bundle(tmp_path / "d" / "bundle").model.temperature == 0.5  # the first: the bundle's default
    with pytest.raises(ArgError, match=r"--temperatures: expected \[0.5, 1.0\] \(the checkpoint's\), got \[1.0\]"):
        main(Args(**common, steps=6, resume=True))
