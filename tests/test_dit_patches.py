"""Spatial tokens (`DiTConfig.patch_size`): layout, adaLN-Zero, block-causal attention, cached sampling, the
`ditwm pretrain --patch-size/--width` flags and bundles that step as envs."""
import json
from dataclasses import asdict

import gymnasium as gym
import pytest
import torch

import dit_envs  # noqa: F401  (registers DiTWM/*)
from dit_envs.models.dit import DiT, DiTConfig
from trainers.checkpoint import load_checkpoint
from trainers.common import ArgError
from trainers.pretrain import Args, main

SHAPE = (2, 4, 6)  # (C, H, W): d_z 48; p 2 -> G = 2 * 3 = 6 tokens of 8 elements


def patched(**kw) -> DiTConfig:
    return DiTConfig(**{**dict(latent_dim=48, num_actions=3, width=32, depth=2, heads=2, freq_dim=16,
                               patch_size=2, latent_shape=SHAPE), **kw})


def randomised(cfg: DiTConfig, seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    model = DiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model


def test_config_sizes_validation_and_json_round_trip():
    cfg = patched()
    assert (cfg.frame_tokens, cfg.token_dim) == (6, 8)
    assert DiTConfig(**json.loads(json.dumps(asdict(cfg)))) == cfg  # the JSON list comes back as the tuple
    one = DiTConfig(latent_dim=48, num_actions=3)
    assert (one.frame_tokens, one.token_dim) == (1, 48)
    for kw, field in ((dict(latent_shape=None), "latent_shape"), (dict(latent_shape=(2, 4, 4)), "latent_shape"),
                      (dict(patch_size=4), "patch_size"), (dict(patch_size=-1), "patch_size"),
                      (dict(streaming=True), "streaming")):
        with pytest.raises(ValueError, match=field):
            patched(**kw)


def test_patch_layout_puts_each_latent_element_in_its_patch_and_inverts():
    model = DiT(patched())
    x = torch.zeros(1, 1, 48)
    c, y, col = 1, 3, 4  # channel-major flat index c*H*W + y*W + col
    x[0, 0, c * 24 + y * 6 + col] = 1.0
    p = model.patches(x)  # (1, 1, G, C p p)
    assert p.shape == (1, 1, 6, 8)
    g, e = (y // 2) * 3 + col // 2, c * 4 + (y % 2) * 2 + col % 2
    assert p[0, 0, g, e] == 1.0 and p.sum() == 1.0
    z = torch.randn(3, 2, 48)
    assert torch.equal(model._latents(model.patches(z).flatten(1, 2)), z)


def test_fresh_patched_dit_outputs_exactly_zero():
    model = DiT(patched())
    out = model(torch.randn(2, 3, 48), torch.rand(2, 3), torch.randint(0, 4, (2, 3)))
    assert out.shape == (2, 3, 48) and torch.count_nonzero(out) == 0


def test_attention_is_block_causal_over_time_steps_and_full_inside_one():
    model = randomised(patched())
    x, lvl, a = torch.randn(2, 4, 48), torch.rand(2, 4), torch.randint(0, 4, (2, 4))
    out = model(x, lvl, a)
    later = x.clone()
    later[:, 3] += 1.0
    assert torch.equal(model(later, lvl, a)[:, :3], out[:, :3])  # no step sees a later one
    corner = x.clone()
    corner[:, 2, :4] += 1.0  # channel 0, row 0 of step 2: one patch
    moved = model(corner, lvl, a)
    assert torch.equal(moved[:, :2], out[:, :2])
    assert (moved[:, 2, 24:] - out[:, 2, 24:]).abs().max() > 1e-4  # channel 1 of the same step: other tokens


@pytest.mark.parametrize("action_cond", [True, False])
def test_cached_prediction_equals_the_full_forward(action_cond):
    model = randomised(patched(action_cond=action_cond, shortcut_steps=2), seed=1)
    z, a = torch.randn(3, 5, 48), torch.randint(0, 4, (3, 5))
    lvl = torch.zeros(3, 5)
    lvl[:, 4] = 0.7
    step = torch.zeros(3, 5)
    step[:, 4] = 0.5
    full = model(z, lvl, a, step_size=step)[:, 4]  # (3, d_z)
    cache = model.context_cache(z[:, :4], a[:, :4])
    assert cache[0][0].shape[2] == 4 * 6  # G keys per context step
    for per_token in (False, True):
        got = model.predict_next(z[:, 4], lvl[:, 4], a[:, 4], cache, step_size=step[:, 4], per_token=per_token)
        torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)
    short = model.context_cache(z[:, 2:4], a[:, 2:4])  # a context shorter than K
    torch.testing.assert_close(model.predict_next(z[:, 4], lvl[:, 4], a[:, 4], short),
                               model(z[:, 2:], lvl[:, 2:], a[:, 2:])[:, 2], atol=1e-5, rtol=1e-5)


def test_patched_flow_overfits_a_tiny_fixed_batch():
    from dit_envs.models.flow import interpolate, velocity_target

    torch.manual_seed(0)
    model = DiT(patched(width=64, freq_dim=32))
    z, a = torch.randn(4, 3, 48), torch.randint(0, 4, (4, 3))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    t, eps = torch.full((4, 3), 0.5), torch.randn(4, 3, 48)
    first = None
    for _ in range(300):
        xt, v = interpolate(z, eps, t), velocity_target(z, eps)
        loss = ((model(xt, t, a) - v) ** 2).mean()
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.02 * first


def test_pretrain_patch_size_and_width_make_a_bundle_that_steps_and_resumes(tiny_stage1_store, tmp_path, capsys):
    from trainers import cli

    tiny = dict(preset="tiny", batch=8, warmup=2, log_every=2, eval_every=0, checkpoint_every=4, start_contexts=8,
                eval_windows=8, eval_horizon=6, threads=1)
    out = tmp_path / "p2"
    assert main(Args(data=str(tiny_stage1_store), out=str(out), steps=4, patch_size=2, width=16, **tiny)) == 0
    dit = json.loads((out / "bundle" / "config.json").read_text())["configs"]["dit"]
    assert (dit["patch_size"], dit["width"], dit["latent_shape"]) == (2, 16, [2, 4, 4])
    assert "tiny width 16 patch-size 2" in (out / "bundle" / "README.md").read_text()
    envs = gym.make_vec("DiTWM/Pong-v0", num_envs=2, checkpoint=str(out / "bundle"))
    envs.reset(seed=0)
    assert envs.step(envs.action_space.sample())[0].shape == (2, 3, 64, 64)
    envs.close()
    assert main(Args(data=str(tiny_stage1_store), out=str(out), steps=6, patch_size=2, width=16, resume=True,
                     **tiny)) == 0
    assert load_checkpoint(out)[1]["step"] == 6
    capsys.readouterr()
    base = ["pretrain", "--data", str(tiny_stage1_store), "--preset", "tiny", "--batch", "8", "--threads", "1",
            "--eval-every", "0", "--start-contexts", "8", "--warmup", "2"]
    for extra, field in ((["--out", str(out), "--steps", "8", "--resume", "--width", "16"], "--patch-size"),
                         (["--out", str(tmp_path / "bad"), "--steps", "2", "--patch-size", "3"], "--patch-size"),
                         (["--out", str(tmp_path / "bad"), "--steps", "2", "--width", "15"], "--width"),
                         (["--out", str(tmp_path / "bad"), "--steps", "2", "--init", str(out)], "--init")):
        assert cli.main([*base, *extra]) == 2
        assert field in capsys.readouterr().err
    assert load_checkpoint(out)[1]["step"] == 6 and not (tmp_path / "bad").exists()


def test_a_patched_teacher_distills_to_a_patched_student_but_not_a_streaming_one(tiny_stage1_store, tmp_path,
                                                                                 capsys):
    from trainers.distill import Args as DistillArgs, main as distill

    tiny = dict(preset="tiny", batch=8, warmup=2, eval_every=0, start_contexts=8, eval_windows=8, eval_horizon=6,
                threads=1)
    assert main(Args(data=str(tiny_stage1_store), out=str(tmp_path / "t"), steps=2, patch_size=2, **tiny)) == 0
    common = dict(teacher=str(tmp_path / "t" / "bundle"), data=str(tiny_stage1_store), steps=2, batch=8, warmup=2,
                  eval_every=0, eval_windows=8, eval_horizon=6, threads=1)
    assert distill(DistillArgs(out=str(tmp_path / "s"), **common)) == 0
    dit = json.loads((tmp_path / "s" / "bundle" / "config.json").read_text())["configs"]["dit"]
    assert dit["patch_size"] == 2 and dit["shortcut_steps"] == 4
    envs = gym.make_vec("DiTWM/Pong-v0", num_envs=2, checkpoint=str(tmp_path / "s" / "bundle"))
    envs.reset(seed=0)
    assert envs.step(envs.action_space.sample())[0].shape == (2, 3, 64, 64)
    envs.close()
    with pytest.raises(ArgError, match="spatial tokens"):
        distill(DistillArgs(out=str(tmp_path / "bad"), streaming=True, **common))
    assert not (tmp_path / "bad").exists()


def test_world_model_refuses_a_latent_shape_other_than_the_autoencoders():
    from dit_envs.models.autoencoder import AutoencoderConfig, FrameAutoencoder
    from dit_envs.models.dit_world_model import DiTWorldModel
    from dit_envs.models.heads import HeadsConfig, RewardTermHead

    ae = FrameAutoencoder(AutoencoderConfig(base_channels=4, max_channels=16, latent_channels=2, latent_size=4))
    heads = RewardTermHead(HeadsConfig(latent_dim=32, num_actions=3, hidden=16))
    dit = lambda shape: DiT(patched(latent_dim=32, latent_shape=shape))  # noqa: E731
    DiTWorldModel(ae, dit((2, 4, 4)), heads)
    with pytest.raises(ValueError, match="latent_shape"):
        DiTWorldModel(ae, dit((8, 2, 2)), heads)
