"""The previous-latent flow source (`DiTConfig.prev_source`, `ditwm pretrain --prev-source`): the flow of the next
latent starts at the last one plus noise; sampler, objective, world model, distillation and the CLI flag."""
import json

import pytest
import torch

from dit_envs.models.autoencoder import AutoencoderConfig, FrameAutoencoder
from dit_envs.models.dit import DiT, DiTConfig
from dit_envs.models.dit_world_model import DiTWorldModel
from dit_envs.models.heads import HeadsConfig, RewardTermHead
from trainers.checkpoint import load_checkpoint
from trainers.common import ArgError
from trainers.distill_objective import sample_gap, teacher_trajectory
from trainers.pretrain import Args, main
from trainers.pretrain_nets import check_init, saved_field
from trainers.pretrain_objective import ObjectiveConfig, Windows, make_inputs

A, K, D_Z, S = 3, 3, 8, 0.25


def dit(prev_source=S, seed=0, perturb=True) -> DiT:
    torch.manual_seed(seed)
    model = DiT(DiTConfig.from_preset("tiny", latent_dim=D_Z, num_actions=A, context_len=K, prev_source=prev_source))
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def test_config_refuses_a_negative_or_non_finite_source_std():
    assert DiTConfig(latent_dim=4, num_actions=2).prev_source == 0.0  # the default: rectified flow's N(0, I)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="prev_source"):
            DiTConfig(latent_dim=4, num_actions=2, prev_source=bad)


def test_flow_source_is_the_previous_latent_plus_scaled_noise():
    noise, prev = torch.randn(5, D_Z), torch.randn(5, D_Z)
    assert dit(0.0).flow_source(noise, prev) is noise  # no source change without prev_source
    assert torch.equal(dit().flow_source(noise, prev), prev + S * noise)
    for bad in (None, prev[:, :4]):
        with pytest.raises(ValueError, match="x_prev"):
            dit().flow_source(noise, bad)


def test_one_sampler_step_starts_at_the_previous_latent():
    m = dit()
    g = torch.Generator().manual_seed(1)
    ctx, ctx_a = torch.randn(4, K, D_Z, generator=g), torch.randint(0, A + 1, (4, K), generator=g)
    a, noise = torch.randint(0, A, (4,), generator=g), torch.randn(4, D_Z, generator=g)
    cache = m.context_cache(ctx, ctx_a)
    start = ctx[:, -1] + S * noise
    by_hand = start - m.predict_next(start, torch.ones(4), a, cache)  # one Euler step from t = 1 to 0
    assert torch.allclose(m.sample_next(noise, a, cache, 1, x_prev=ctx[:, -1]), by_hand, atol=1e-6)
    with pytest.raises(ValueError, match="x_prev"):
        m.sample_next(noise, a, cache, 1)


def test_objective_noises_each_token_from_the_latent_before_it_and_skips_the_first():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, K + 1, D_Z, generator=g)
    a = torch.randint(0, A, (6, K + 1), generator=g)
    w = Windows(x=x, z=x.clamp(-1, 1), prev_action=a, reward=torch.zeros(6, K + 1),
                terminated=torch.zeros(6, K + 1, dtype=torch.bool))
    cfg = ObjectiveConfig(seq_len=K + 1, clean_context=0.0, action_dropout=0.0)
    plain = make_inputs(w, cfg, num_actions=A, generator=torch.Generator().manual_seed(3))
    prev = make_inputs(w, cfg, num_actions=A, generator=torch.Generator().manual_seed(3), dit=dit())
    eps, t = plain["noise"], plain["t"]  # the same draws: only the source differs
    assert torch.equal(prev["noise"][:, 0], eps[:, 0])  # no latent before the first token: N(0, I), not counted
    assert torch.equal(prev["noise"][:, 1:], x[:, :K] + S * eps[:, 1:])
    assert torch.allclose(prev["xt"], (1 - t[..., None]) * x + t[..., None] * prev["noise"])
    assert torch.all(prev["mask"][:, 0] == 0) and torch.all(prev["mask"][:, 1:] == 1)


def test_multi_step_term_starts_the_target_at_the_imagined_last_latent():
    g = torch.Generator().manual_seed(0)
    L = K + 3
    x = torch.randn(6, L, D_Z, generator=g)
    a = torch.randint(0, A, (6, L), generator=g)
    w = Windows(x=x, z=x.clamp(-1, 1), prev_action=a, reward=torch.zeros(6, L),
                terminated=torch.zeros(6, L, dtype=torch.bool))
    cfg = ObjectiveConfig(seq_len=K + 1, rollout_steps=3)
    m = dit()
    inp = make_inputs(w, cfg, num_actions=A, generator=torch.Generator().manual_seed(3), dit=m, context_len=K,
                      clamp=lambda v: v)
    eps = (inp["ro_noise"] - inp["ro_xt"][:, K - 1]) / S  # the source minus the (partly imagined) last context
    t = inp["ro_t"][:, -1:]
    assert torch.allclose(inp["ro_xt"][:, -1], (1 - t) * inp["ro_x0"] + t * inp["ro_noise"], atol=1e-6)
    assert 0.7 < float(eps.std()) < 1.3 and abs(float(eps.mean())) < 0.3  # N(0, I) draws, not the latent itself


def world_model(prev_source: float) -> DiTWorldModel:
    ae = FrameAutoencoder(AutoencoderConfig(base_channels=4, max_channels=16, latent_channels=2, latent_size=4))
    cfg = DiTConfig.from_preset("tiny", latent_dim=32, num_actions=A, context_len=K, prev_source=prev_source)
    return DiTWorldModel(ae, DiT(cfg), RewardTermHead(HeadsConfig(latent_dim=32, num_actions=A, hidden=16)),
                         temperature=0.0)


def test_a_fresh_world_model_with_the_previous_source_imagines_that_nothing_moves():
    z = torch.rand(2, K, 32) * 1.6 - 0.8
    a = torch.randint(0, A, (2, K))
    for prev_source, expect in ((S, z[:, -1]), (0.0, torch.zeros(2, 32))):  # adaLN-Zero: the velocity is 0
        m = world_model(prev_source)
        _, z_next, _, _ = m.step(m.initial_state(z, a), torch.zeros(2, dtype=torch.int64))
        assert torch.allclose(z_next, expect, atol=1e-6)


def test_world_model_samples_from_the_last_latent_plus_scaled_noise():
    z = torch.rand(3, K, 32) * 1.6 - 0.8
    a = torch.randint(0, A, (3, K))
    m = world_model(S)
    m.temperature = 0.5
    with torch.no_grad():
        m.latent_mean.uniform_(-0.1, 0.1)
        m.latent_std.uniform_(0.2, 0.4)
    _, z_next, _, _ = m.step(m.initial_state(z, a), torch.zeros(3, dtype=torch.int64),
                             generator=torch.Generator().manual_seed(5))
    eps = torch.randn(3, 32, generator=torch.Generator().manual_seed(5))  # the step's draw
    expect = m.denormalize(m.normalize(z[:, -1]) + S * 0.5 * eps).clamp(-1, 1)  # a fresh DiT moves nothing
    assert torch.allclose(z_next, expect, atol=1e-5) and not torch.allclose(z_next, z[:, -1], atol=1e-3)


def test_distillation_starts_the_teachers_trajectory_at_its_source():
    t = dit()
    g = torch.Generator().manual_seed(2)
    ctx, ctx_a = torch.randn(8, K, D_Z, generator=g), torch.randint(0, A + 1, (8, K), generator=g)
    a, noise = torch.randint(0, A, (8,), generator=g), torch.randn(8, D_Z, generator=g)
    traj = teacher_trajectory(t, ctx, ctx_a, a, noise, 4)
    assert torch.equal(traj[0], ctx[:, -1] + S * noise)
    assert torch.allclose(traj[-1], t.sample_next(noise, a, t.context_cache(ctx, ctx_a), 4, x_prev=ctx[:, -1]),
                          atol=1e-5)
    fresh = dit(perturb=False)  # velocity 0: its sample is the source itself, x_prev + σ·ε
    noise_gap = torch.randn(8, D_Z, generator=torch.Generator().manual_seed(0))  # sample_gap's draw (seed 0)
    ref = t.sample_next(noise_gap, a, t.context_cache(ctx, ctx_a), 4, x_prev=ctx[:, -1])
    by_hand = (ctx[:, -1] + S * noise_gap - ref).square().mean().item()
    assert sample_gap(fresh, t, ctx, ctx_a, a, teacher_steps=4, student_steps=1) == pytest.approx(by_hand, rel=1e-5)


def test_pretrain_prev_source_writes_a_bundle_and_resume_must_match(tiny_stage1_store, tmp_path, capsys):
    from trainers import cli

    tiny = dict(preset="tiny", batch=8, warmup=2, eval_every=0, checkpoint_every=4, start_contexts=8,
                eval_windows=8, eval_horizon=6, threads=1)
    out = tmp_path / "ps"
    assert main(Args(data=str(tiny_stage1_store), out=str(out), steps=4, prev_source=0.5, **tiny)) == 0
    assert json.loads((out / "bundle" / "config.json").read_text())["configs"]["dit"]["prev_source"] == 0.5
    capsys.readouterr()
    base = ["pretrain", "--data", str(tiny_stage1_store), "--preset", "tiny", "--batch", "8", "--threads", "1",
            "--eval-every", "0", "--start-contexts", "8", "--warmup", "2"]
    for extra in (["--out", str(out), "--steps", "8", "--resume"],  # the run's 0.5 must be given again
                  ["--out", str(tmp_path / "bad"), "--steps", "2", "--prev-source", "-1"],
                  ["--out", str(tmp_path / "bad"), "--steps", "2", "--prev-source", "nan"]):
        assert cli.main([*base, *extra]) == 2
        assert "--prev-source" in capsys.readouterr().err
    assert cli.main([*base, "--out", str(tmp_path / "bad"), "--steps", "2", "--init", str(out)]) == 2
    assert "--prev-source" in capsys.readouterr().err  # a fine-tune keeps the source it was trained with
    assert load_checkpoint(out)[1]["step"] == 4 and not (tmp_path / "bad").exists()
    assert cli.main([*base, "--out", str(out), "--steps", "6", "--resume", "--prev-source", "0.5"]) == 0
    assert load_checkpoint(out)[1]["step"] == 6


def test_init_check_reads_a_field_the_checkpoint_predates_as_its_default():
    cfg = DiTConfig(latent_dim=D_Z, num_actions=A)
    heads = HeadsConfig(latent_dim=D_Z, num_actions=A)
    old = {k: v for k, v in cfg.__dict__.items() if k != "prev_source"}  # written before prev_source existed
    assert saved_field(old, "prev_source") == 0.0 and saved_field(None, "width") == cfg.width
    check_init({"dit": old, "heads": heads.__dict__}, cfg, heads)  # matches: the missing field is the default
    with pytest.raises(ArgError, match="--prev-source: expected 0.0"):
        check_init({"dit": old, "heads": heads.__dict__}, DiTConfig(latent_dim=D_Z, num_actions=A, prev_source=S),
                   heads)
