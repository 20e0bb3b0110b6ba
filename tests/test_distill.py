"""Stage 2b (`ditwm distill`): the step-conditioned student, the trajectory targets, a tiny distillation, the CLI."""
import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import dit_envs  # noqa: F401  (registers DiTWM/*)
from dit_envs.bundle import load_bundle
from dit_envs.models.dit import DiT, DiTConfig
from trainers.checkpoint import load_checkpoint
from trainers.common import ArgError
from trainers.distill import Args, main
from trainers.distill_objective import (DistillNet, make_distill_inputs, sample_gap, shortcut_targets, step_levels,
                                        teacher_trajectory)
from trainers.distill_student import make_student

K, D_Z, A = 3, 8, 4


def teacher(seed=0) -> DiT:
    """A tiny DiT whose zero-initialised layers are perturbed, so it computes a non-trivial velocity field."""
    torch.manual_seed(seed)
    dit = DiT(DiTConfig.from_preset("tiny", latent_dim=D_Z, num_actions=A, context_len=K))
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return dit.eval()


def batch(B=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, K, D_Z, generator=g), torch.randint(0, A + 1, (B, K), generator=g),
            torch.randint(0, A, (B,), generator=g))


def test_step_levels():
    assert step_levels(1) == [1] and step_levels(4) == [1, 2, 4] and step_levels(8) == [1, 2, 4, 8]
    for bad in (0, 3, 6):
        with pytest.raises(ValueError, match="teacher_steps"):
            step_levels(bad)


def test_fresh_student_equals_teacher_at_every_step_size():
    t = teacher()
    s = make_student(t, 4)
    assert s.config.shortcut_steps == 4 and s.step_embed is not None
    ctx, ctx_a, a = batch()
    x, tt = torch.randn(16, D_Z), torch.rand(16)
    ref = t.predict_next(x, tt, a, t.context_cache(ctx, ctx_a))
    for d in (0.25, 0.5, 1.0, 0.1):
        got = s.predict_next(x, tt, a, s.context_cache(ctx, ctx_a), step_size=torch.full((16,), d))
        assert torch.equal(got, ref)


def test_step_embedding_changes_only_the_noisy_token_and_is_clamped_below_one_over_n():
    s = make_student(teacher(), 4)
    with torch.no_grad():
        s.step_embed[2].weight.normal_()
    ctx, ctx_a, a = batch()
    x, tt = torch.randn(16, D_Z), torch.rand(16)
    cache = s.context_cache(ctx, ctx_a)
    v = {d: s.predict_next(x, tt, a, cache, step_size=torch.full((16,), d)) for d in (1.0, 0.5, 0.25, 0.125)}
    assert not torch.allclose(v[1.0], v[0.5])
    assert torch.equal(v[0.25], v[0.125])  # below 1/N the teacher's own step is used
    seq = torch.cat([ctx, x[:, None]], 1)
    full = s(seq, torch.cat([torch.zeros(16, K), tt[:, None]], 1), torch.cat([ctx_a, a[:, None]], 1),
             step_size=torch.cat([torch.zeros(16, K), torch.full((16, 1), 0.5)], 1))
    assert torch.allclose(full[:, -1], v[0.5], atol=1e-5)
    plain = s(seq, torch.cat([torch.zeros(16, K), tt[:, None]], 1), torch.cat([ctx_a, a[:, None]], 1))
    assert torch.allclose(full[:, :K], plain[:, :K])  # context tokens never see the step size


def test_teacher_trajectory_ends_at_the_teachers_sample():
    t = teacher()
    ctx, ctx_a, a = batch()
    noise = torch.randn(16, D_Z)
    traj = teacher_trajectory(t, ctx, ctx_a, a, noise, 4)
    assert traj.shape == (5, 16, D_Z) and torch.equal(traj[0], noise)
    assert torch.allclose(traj[-1], t.sample_next(noise, a, t.context_cache(ctx, ctx_a), 4), atol=1e-5)


def test_shortcut_targets_by_hand():
    N, B = 4, 512
    traj = torch.randn(N + 1, B, D_Z)
    out = shortcut_targets(traj, torch.Generator().manual_seed(0))
    j = torch.round((1.0 - out["t"]) * N).long()
    m = torch.round(out["step_size"] * N).long()
    assert set(m.tolist()) == {1, 2, 4}  # every level is drawn
    assert bool(((j % m) == 0).all()) and bool((j + m <= N).all())  # starts on the coarse sampler's grid
    rows = torch.arange(B)
    assert torch.equal(out["x"], traj[j, rows])
    assert torch.allclose(out["v"], (traj[j, rows] - traj[j + m, rows]) / out["step_size"][:, None])
    one = m == 4
    assert bool((j[one] == 0).all()) and torch.allclose(out["v"][one], traj[0, one] - traj[4, one])


@pytest.mark.parametrize("jumps", ["one", "all"])
@pytest.mark.parametrize("depth, streaming", [(0, False), (1, False), (0, True)])  # 2 blocks, 1 block, streaming
def test_tiny_distillation_lowers_the_gap_to_the_teacher_on_a_fixed_batch(depth, streaming, jumps):
    t = teacher()
    net = DistillNet(make_student(t, 4, depth=depth, streaming=streaming))
    ctx, ctx_a, a = batch(B=32)
    gap = lambda k: sample_gap(net.dit, t, ctx, ctx_a, a, teacher_steps=4, student_steps=k, seed=3)  # noqa: E731
    before = {k: gap(k) for k in (1, 2, 4)}
    if depth == 0 and not streaming:
        assert before[4] == pytest.approx(0.0, abs=1e-10)  # the fresh student is the teacher
    else:
        assert before[4] > 1e-4  # one block fewer, or no positions but a window: no longer the teacher
    assert before[1] > 1e-3
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        loss = net(make_distill_inputs(t, ctx, ctx_a, a, teacher_steps=4, generator=gen, jumps=jumps))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = {k: gap(k) for k in (1, 2, 4)}
    assert after[1] < 0.5 * before[1] and after[2] < before[2]
    if depth:  # (a streaming student starts nearer the 4-step teacher than training on this tiny batch keeps any)
        assert after[4] < 0.5 * before[4]


TINY = dict(batch=8, warmup=2, log_every=2, eval_every=4, checkpoint_every=4, eval_windows=8, eval_horizon=6,
            threads=1)



def test_distill_cli_writes_a_student_bundle_that_steps_as_an_env(tiny_stage1_store, teacher_bundle, tmp_path,
                                                                  capsys):
    out = tmp_path / "d"
    assert main(Args(teacher=str(teacher_bundle), data=str(tiny_stage1_store), out=str(out), steps=8, **TINY)) == 0
    assert "distill: bundle" in capsys.readouterr().out
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert recs[0]["step"] == 0 and recs[0]["eval/gap@4"] == pytest.approx(0.0, abs=1e-10)
    assert [r["step"] for r in recs if "loss" in r] == [2, 4, 6, 8]
    assert all(k in recs[-1] for k in ("eval/gap@1", "eval/gap@2", "eval/mse@1"))
    b = load_bundle(out / "bundle")
    assert b.config["sampling_steps"] == 2 and b.model.dit.config.shortcut_steps == 4
    teach = load_bundle(teacher_bundle)
    assert torch.equal(b.start_z, teach.start_z) and torch.equal(b.model.latent_std, teach.model.latent_std)
    card = (out / "bundle" / "README.md").read_text()
    assert "Stage 2b: distillation" in card and "Stage 2: DiT pretraining" in card
    for steps in (1, 2, 4):
        envs = gym.make_vec("DiTWM/Pong-v0", num_envs=2, checkpoint=str(out / "bundle"), sampling_steps=steps)
        obs, _ = envs.reset(seed=0)
        obs, reward, *_ = envs.step(envs.action_space.sample())
        assert obs.shape == (2, 3, 64, 64) and obs.dtype == np.uint8
        envs.close()


def test_bf16_distillation_writes_a_float32_student(tiny_stage1_store, teacher_bundle, tmp_path):
    common = dict(teacher=str(teacher_bundle), data=str(tiny_stage1_store), steps=4, **TINY)
    assert main(Args(**common, out=str(tmp_path / "bf16"), precision="bf16")) == 0
    assert main(Args(**common, out=str(tmp_path / "fp32"), precision="fp32")) == 0
    a, b = load_bundle(tmp_path / "bf16" / "bundle"), load_bundle(tmp_path / "fp32" / "bundle")
    pa, pb = dict(a.model.dit.named_parameters()), dict(b.model.dit.named_parameters())
    assert a.config["dtype"] == "float32" and all(torch.isfinite(p).all() for p in pa.values())
    assert any(not torch.equal(pa[k], pb[k]) for k in pa)  # the forwards ran in bfloat16


@pytest.mark.parametrize("extra", [{}, dict(imagined_fraction=0.5, imagined_pool=16, imagined_steps=2,
                                           imagined_sticky=0.9, pixel_weight=1.0),
                                   dict(streaming=True, imagined_fraction=0.5, imagined_pool=16, imagined_steps=2),
                                   dict(streaming=True, imagined_fraction=0.5, imagined_pool=16, imagined_steps=2,
                                        imagined_refresh=3)])
def test_distill_resume_equals_an_uninterrupted_run(tiny_stage1_store, teacher_bundle, tmp_path, extra, capsys):
    kw = dict(TINY, lr_decay_steps=8, **extra)
    common = dict(teacher=str(teacher_bundle), data=str(tiny_stage1_store))
    assert main(Args(**common, out=str(tmp_path / "full"), steps=8, **kw)) == 0
    assert main(Args(**common, out=str(tmp_path / "split"), steps=4, **kw)) == 0
    assert main(Args(**common, out=str(tmp_path / "split"), steps=8, resume=True, **kw)) == 0
    a, ma = load_checkpoint(tmp_path / "full")
    b, mb = load_checkpoint(tmp_path / "split")
    assert ma["step"] == mb["step"] == 8 and a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    if extra.get("imagined_refresh"):  # rebuilt at 3 and 6; the split run rebuilt step 3's pool from saved weights
        printed = capsys.readouterr().out
        assert printed.count("distill: step 3: 16 contexts of the student's own rollouts") == 2
        assert "distill: rebuilt the student's own rollouts of step 3 from the checkpoint" in printed
        assert printed.count("distill: step 6: 16 contexts of the student's own rollouts") == 2
        assert "| student's own rollouts rebuilt every (steps) | 3 |" in (tmp_path / "full/bundle/README.md").read_text()
        with pytest.raises(ArgError, match=r"--imagined-refresh: expected 3 \(the checkpoint's\), got 0"):
            main(Args(**common, out=str(tmp_path / "split"), steps=9, resume=True, **{**kw, "imagined_refresh": 0}))
    if extra.get("imagined_sticky"):  # the pool's rollouts are part of the objective: a resume must repeat them
        with pytest.raises(ArgError, match=r"--imagined-sticky: expected 0.9 \(the checkpoint's\), got 0.75"):
            main(Args(**common, out=str(tmp_path / "split"), steps=9, resume=True, **{**kw, "imagined_sticky": 0.75}))


@pytest.mark.parametrize("extra, field", [
    (dict(teacher_steps=3), "teacher_steps"),
    (dict(sampling_steps=3), "sampling_steps"),
    (dict(steps=0), "steps"),
    (dict(ema=1.0), "ema"),
    (dict(student_depth=3), "student_depth"),  # the tiny teacher has 2 blocks
    (dict(student_depth=-1), "student_depth"),
    (dict(pixel_weight=-1.0), "pixel_weight"),
    (dict(imagined_fraction=1.5), "imagined_fraction"),
    (dict(imagined_steps=0), "imagined_steps"),
    (dict(imagined_pool=0), "imagined_pool"),
    (dict(imagined_sticky=1.5), "imagined_sticky"),
    (dict(motion_boost=-1.0), "motion_boost"),
    (dict(pixel_weight="nan"), "pixel_weight"),
    (dict(imagined_fraction=0.005), "imagined_fraction"),  # no row of a batch of 64
    (dict(jumps="two"), "jumps"),
    (dict(imagined_refresh=-1), "imagined_refresh"),
    (dict(imagined_refresh=100), "imagined_refresh"),  # the student's rollouts go into the imagined pool: none here
    (dict(temperatures=-0.5), "temperatures"),
    (dict(temperatures="nan"), "temperatures"),
])
def test_bad_arguments_exit_2_and_write_nothing(tiny_stage1_store, teacher_bundle, tmp_path, capsys, extra, field):
    from trainers.distill import cli

    argv = ["--teacher", str(teacher_bundle), "--data", str(tiny_stage1_store), "--out", str(tmp_path / "x")]
    for k, v in extra.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    assert cli(argv) == 2
    assert f"--{field.replace('_', '-')}" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_teacher_must_be_a_dit_bundle(tiny_stage1_store, tmp_path, capsys):
    from trainers.distill import cli

    assert cli(["--teacher", str(tmp_path), "--data", str(tiny_stage1_store), "--out", str(tmp_path / "x")]) == 2
    assert "--teacher" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_ddp_two_cpu_processes_keep_identical_weights(tiny_stage1_store, teacher_bundle, tmp_path):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "trainers.distill", "--teacher", str(teacher_bundle), "--data", str(tiny_stage1_store), "--out", str(out),
           "--steps", "4", "--batch", "8", "--warmup", "2", "--log-every", "2", "--eval-every", "0",
           "--checkpoint-every", "2", "--eval-windows", "8", "--eval-horizon", "6", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    # save_state raises unless every parameter is bit-identical on both ranks (checked at steps 2 and 4)
    tensors, meta = load_checkpoint(out)
    assert meta["world_size"] == 2 and meta["step"] == 4
    assert not torch.equal(tensors["rng.gen.0"], tensors["rng.gen.1"])  # each rank draws its own noise
    assert res.stdout.count("distill: bundle") == 1 and (out / "bundle" / "config.json").is_file()


def test_distilled_teacher_is_refused(tiny_stage1_store, teacher_bundle, tmp_path, capsys):
    from trainers.distill import cli

    out = tmp_path / "d"
    assert main(Args(teacher=str(teacher_bundle), data=str(tiny_stage1_store), out=str(out), steps=2, **TINY)) == 0
    capsys.readouterr()
    assert cli(["--teacher", str(out / "bundle"), "--data", str(tiny_stage1_store), "--out", str(tmp_path / "x")]) == 2
    assert "undistilled" in capsys.readouterr().err and not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="shortcut_steps"):
        make_student(make_student(teacher(), 4), 4)


def test_empty_batch_and_untrained_step_count_warning():
    s = make_student(teacher(), 4)
    cache = s.context_cache(torch.zeros(0, K, D_Z), torch.zeros(0, K, dtype=torch.int64))
    assert s.sample_next(torch.zeros(0, D_Z), torch.zeros(0, dtype=torch.int64), cache, 1).shape == (0, D_Z)
    ctx, ctx_a, a = batch(B=2)
    cache = s.context_cache(ctx, ctx_a)
    from dit_envs.models import dit as dit_module

    dit_module._WARNED.clear()  # warned once per process: start from none
    with pytest.warns(UserWarning, match="untrained step size"):
        s.sample_next(torch.zeros(2, D_Z), a, cache, 3)
