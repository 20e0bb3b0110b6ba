"""Convolutional branches of a one-token DiT (`DiTConfig.conv_width`): validation, zero-output initialisation,
cached sampling, and `ditwm pretrain --conv-width` (from scratch, grown from a plain `--init` run, refusals)."""
import json

import gymnasium as gym
import pytest
import torch

import dit_envs  # noqa: F401  (registers DiTWM/*)
from dit_envs.models.dit import DiT, DiTConfig
from trainers.checkpoint import load_checkpoint
from trainers.pretrain import Args, main

SHAPE = (2, 4, 6)  # (C, H, W): d_z 48


def config(**kw) -> DiTConfig:
    return DiTConfig(**{**dict(latent_dim=48, num_actions=3, width=32, depth=2, heads=2, freq_dim=16), **kw})


def randomise(model: DiT, seed: int) -> DiT:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model


def test_config_validation_names_the_field():
    assert config(conv_width=8, latent_shape=SHAPE).conv_width == 8
    for kw, field in ((dict(conv_width=-1), "conv_width"), (dict(conv_width=8), "latent_shape"),
                      (dict(conv_width=8, latent_shape=(2, 4, 4)), "latent_shape"),
                      (dict(conv_width=8, latent_shape=(2, 4, 6), patch_size=2), "conv_width")):
        with pytest.raises(ValueError, match=f"^{field}: expected"):
            config(**kw)


def test_branches_start_at_zero_so_a_grown_model_is_the_plain_one_and_then_differs():
    plain = randomise(DiT(config()), 0)
    grown = DiT(config(conv_width=8, latent_shape=SHAPE))
    conv_keys = {k for k in grown.state_dict() if k.startswith("conv_")}
    assert conv_keys and set(grown.state_dict()) - conv_keys == set(plain.state_dict())
    grown.load_state_dict({**grown.state_dict(), **plain.state_dict()})
    x, t, a = torch.randn(3, 5, 48), torch.rand(3, 5), torch.randint(0, 4, (3, 5))
    assert torch.equal(plain(x, t, a), grown(x, t, a))
    randomise(grown, 1)
    assert not torch.allclose(DiT(config())(x, t, a), grown(x, t, a))


def test_cached_velocity_equals_the_full_forward_pass():
    model = randomise(DiT(config(conv_width=8, latent_shape=SHAPE)), 2).eval()
    x, a = torch.randn(3, 5, 48), torch.randint(0, 4, (3, 5))
    level = torch.full((3,), 0.4)
    cache = model.context_cache(x[:, :4], a[:, :4])
    full = model(x, torch.cat([torch.zeros(3, 4), level[:, None]], 1), a)[:, 4]
    for kw in ({}, {"shared_level": True}, {"per_token": True}):  # the conditioning-table and general paths
        assert torch.allclose(model.predict_next(x[:, 4], level, a[:, 4], cache, **kw), full, atol=1e-5)


def perturbed_branches(streaming: bool = False) -> tuple[DiT, DiT]:
    """A random plain DiT and the same weights grown with branches whose outputs are then made non-zero."""
    plain = randomise(DiT(config(streaming=streaming)), 3).eval()
    conv = DiT(config(streaming=streaming, conv_width=8, latent_shape=SHAPE)).eval()
    conv.load_state_dict({**conv.state_dict(), **plain.state_dict()})
    torch.manual_seed(4)
    with torch.no_grad():
        for layer in (conv.conv_embed.out, conv.conv_head.convs[-1]):
            layer.weight.normal_(0.0, 0.1)
    return plain, conv


@pytest.mark.parametrize("branch", ["conv_embed", "conv_head"])
def test_each_branch_changes_the_output_on_every_path(branch):
    plain, conv = perturbed_branches()
    with torch.no_grad():  # only this branch active: the other's last layer back at zero
        other = conv.conv_head.convs[-1] if branch == "conv_embed" else conv.conv_embed.out
        other.weight.zero_()
    x, a = torch.randn(3, 5, 48), torch.randint(0, 4, (3, 5))
    t = torch.cat([torch.zeros(3, 4), torch.full((3, 1), 0.4)], 1)
    assert (conv(x, t, a) - plain(x, t, a)).abs().max() > 1e-3
    cache = conv.context_cache(x[:, :4], a[:, :4])
    for kw in ({}, {"per_token": True}):
        assert torch.allclose(conv.predict_next(x[:, 4], t[:, 4], a[:, 4], cache, **kw), conv(x, t, a)[:, 4],
                              atol=1e-5)


def test_streaming_cache_and_empty_batches_with_branches():
    _, conv = perturbed_branches(streaming=True)
    x, a = torch.randn(2, 6, 48), torch.randint(0, 4, (2, 6))
    level = torch.full((2,), 0.3)
    cache = conv.extend_cache(conv.context_cache(x[:, :4], a[:, :4]), x[:, 4], a[:, 4])  # one step rolled on
    full = conv(x, torch.cat([torch.zeros(2, 5), level[:, None]], 1), a)[:, -1]
    assert torch.allclose(conv.predict_next(x[:, 5], level, a[:, 5], cache), full, atol=1e-5)
    empty = conv.context_cache(torch.zeros(0, 4, 48), torch.zeros(0, 4, dtype=torch.int64))
    assert conv.sample_next(torch.zeros(0, 48), torch.zeros(0, dtype=torch.int64), empty, 2).shape == (0, 48)


def test_students_world_model_and_init_check_carry_the_branches():
    from dit_envs.models.autoencoder import AutoencoderConfig, FrameAutoencoder
    from dit_envs.models.dit_world_model import DiTWorldModel
    from dit_envs.models.heads import HeadsConfig, RewardTermHead
    from trainers.common import ArgError
    from trainers.distill_student import make_student
    from trainers.pretrain_nets import check_init

    _, teacher = perturbed_branches()
    for depth, streaming in ((0, False), (1, True)):
        student = make_student(teacher, 4, depth=depth, streaming=streaming)
        assert student.config.conv_width == 8
        for k in ("conv_embed.out.weight", "conv_head.convs.3.weight"):
            assert torch.equal(student.state_dict()[k], teacher.state_dict()[k])
    ae = FrameAutoencoder(AutoencoderConfig(base_channels=4, max_channels=16, latent_channels=2, latent_size=4))
    heads = RewardTermHead(HeadsConfig(latent_dim=32, num_actions=3, hidden=16))
    grown = lambda shape: DiT(config(latent_dim=32, conv_width=4, latent_shape=shape))  # noqa: E731
    DiTWorldModel(ae, grown((2, 4, 4)), heads)
    with pytest.raises(ValueError, match="latent_shape"):
        DiTWorldModel(ae, grown((8, 2, 2)), heads)
    # Growing a run that differs in another field is refused as that run, not as a refusal of the branches.
    saved = {"dit": {**config().__dict__, "heads": 4, "width": 32}, "heads": heads.config.__dict__}
    with pytest.raises(ArgError) as err:
        check_init(saved, config(conv_width=8, latent_shape=SHAPE), heads.config)
    assert err.value.field == "init"


def test_pretrain_conv_width_grows_a_plain_run_steps_as_an_env_and_resumes(tiny_stage1_store, tmp_path, capsys):
    from trainers import cli

    tiny = dict(preset="tiny", batch=8, warmup=2, log_every=2, eval_every=0, checkpoint_every=4, start_contexts=8,
                eval_windows=8, eval_horizon=6, threads=1)
    data = str(tiny_stage1_store)
    assert main(Args(data=data, out=str(tmp_path / "plain"), steps=4, **tiny)) == 0
    base, _ = load_checkpoint(tmp_path / "plain")
    out = tmp_path / "conv"
    # A vanishing learning rate: the shared weights stay the plain run's, the new branches their zero output.
    assert main(Args(data=data, out=str(out), steps=2, conv_width=8, init=str(tmp_path / "plain"), lr=1e-12,
                     weight_decay=0.0, **tiny)) == 0
    ck, meta = load_checkpoint(out)
    assert meta["configs"]["dit"]["conv_width"] == 8 and meta["configs"]["dit"]["latent_shape"] == [2, 4, 4]
    for k in (k for k in base if k.startswith("ema.dit.")):
        assert torch.allclose(ck[k], base[k], atol=1e-6), k
    assert ck["ema.dit.conv_head.convs.3.weight"].abs().max() < 1e-6  # the zero outputs, moved by ~lr
    assert ck["ema.dit.conv_embed.out.weight"].abs().max() < 1e-6
    assert torch.count_nonzero(ck["ema.dit.conv_embed.convs.0.weight"]) > 0
    dit = json.loads((out / "bundle" / "config.json").read_text())["configs"]["dit"]
    assert (dit["conv_width"], dit["latent_shape"]) == (8, [2, 4, 4])
    envs = gym.make_vec("DiTWM/Pong-v0", num_envs=2, checkpoint=str(out / "bundle"))
    envs.reset(seed=0)
    assert envs.step(envs.action_space.sample())[0].shape == (2, 3, 64, 64)
    envs.close()
    assert main(Args(data=data, out=str(out), steps=4, conv_width=8, init=str(tmp_path / "plain"), resume=True,
                     **tiny)) == 0
    assert load_checkpoint(out)[1]["step"] == 4
    capsys.readouterr()
    base_argv = ["pretrain", "--data", data, "--preset", "tiny", "--batch", "8", "--threads", "1", "--eval-every",
                 "0", "--start-contexts", "8", "--warmup", "2", "--steps", "2"]
    for extra in (["--out", str(tmp_path / "bad"), "--init", str(out)],  # branches cannot be dropped
                  ["--out", str(tmp_path / "bad"), "--init", str(out), "--conv-width", "4"],  # nor resized
                  ["--out", str(tmp_path / "bad"), "--conv-width", "-1"],
                  ["--out", str(tmp_path / "bad"), "--conv-width", "4", "--patch-size", "2"],
                  ["--out", str(out), "--init", str(tmp_path / "plain"), "--resume", "--steps", "6"]):  # dropped
        assert cli.main([*base_argv, *extra]) == 2
        assert "--conv-width" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
