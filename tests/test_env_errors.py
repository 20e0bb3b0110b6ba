"""Bad input to the imagination envs: a clear exception naming the field, and the env still works after."""
import json
import shutil

import gymnasium as gym
import numpy as np
import pytest

import torch

import dit_envs  # noqa: F401
import registry
from dit_envs.bundle import save_bundle
from tests.conftest import make_tiny_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("errors") / "b", game="Pong")


@pytest.fixture
def copy_of(bundle, tmp_path):
    def _copy():
        dst = tmp_path / "copy"
        shutil.copytree(bundle, dst)
        return dst
    return _copy


@pytest.mark.parametrize("actions, exc, words", [
    (np.array([0, 6, 1]), ValueError, ["actions", "[0, 6)", "max 6"]),
    (np.array([0, -1, 1]), ValueError, ["actions", "min -1"]),
    (np.array([0.0, 1.0, 2.0]), TypeError, ["actions", "integer", "float64"]),
    (np.array([0, 1]), ValueError, ["actions", "(3,)", "(2,)"]),
    (np.zeros((3, 1), np.int64), ValueError, ["actions", "(3, 1)"]),
])
def test_vector_bad_actions_then_still_works(bundle, actions, exc, words):
    envs = gym.make_vec("DiTWM/Pong-v0", num_envs=3, checkpoint=str(bundle))
    envs.reset(seed=0)
    with pytest.raises(exc) as info:
        envs.step(actions)
    for w in words:
        assert w in str(info.value)
    obs, *_ = envs.step(np.array([0, 1, 2]))
    assert obs.shape == (3, 3, 64, 64)


def test_single_bad_actions_then_still_works(bundle):
    env = gym.make("DiTWM/Pong-v0", checkpoint=str(bundle)).unwrapped
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"action: expected an integer in \[0, 6\), got 9"):
        env.step(9)
    with pytest.raises(TypeError, match="action"):
        env.step(1.5)
    assert env.step(2)[0].shape == (3, 64, 64)


def test_step_before_reset(bundle):
    envs = gym.make_vec("DiTWM/Pong-v0", num_envs=2, checkpoint=str(bundle))
    with pytest.raises(gym.error.ResetNeeded, match="reset"):
        envs.step(np.zeros(2, np.int64))
    env = gym.make("DiTWM/Pong-v0", checkpoint=str(bundle)).unwrapped
    with pytest.raises(gym.error.ResetNeeded, match="reset"):
        env.step(0)
    envs.reset(seed=0)
    envs.step(np.zeros(2, np.int64))


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_envs=0), "num_envs"),
    (dict(obs_type="rgb"), "obs_type"),
    (dict(sampling_steps=0), "sampling_steps"),
    (dict(temperature=-1.0), "temperature"),
    (dict(sampling_shift=0.0), "sampling_shift"),
    (dict(max_episode_steps=0), "max_episode_steps"),
    (dict(render_mode="human"), "render_mode"),
    (dict(dtype="int8"), "dtype"),
])
def test_bad_constructor_arguments(bundle, kwargs, field):
    kw = {"num_envs": 2, "checkpoint": str(bundle), **kwargs}
    with pytest.raises(ValueError, match=field) as info:
        gym.make_vec("DiTWM/Pong-v0", **kw)
    assert repr(list(kwargs.values())[0]) in str(info.value) or str(list(kwargs.values())[0]) in str(info.value)


def test_dtype_auto_runs_bfloat16_only_where_matmuls_are_native(bundle, monkeypatch):
    from dit_envs.envs import loading

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert loading.fast_dtype("cpu") == torch.bfloat16
    envs = gym.make_vec("DiTWM/Pong-v0", num_envs=2, checkpoint=str(bundle), dtype="auto", obs_type="latent")
    assert next(envs.unwrapped.bundle.model.parameters()).dtype == torch.bfloat16
    obs, _ = envs.reset(seed=0)
    obs, reward, *_ = envs.step(np.zeros(2, np.int64))
    assert obs.dtype == np.float32 and np.isfinite(obs).all() and np.isfinite(reward).all()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert loading.fast_dtype("cpu") == torch.float32
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)  # a build without the probe
    assert loading.fast_dtype("cpu") == torch.float32
    env = gym.make("DiTWM/Pong-v0", checkpoint=str(bundle), dtype="auto").unwrapped
    assert next(env.bundle.model.parameters()).dtype == torch.float32


def test_sampling_steps_setter_validates(bundle):
    envs = gym.make_vec("DiTWM/Pong-v0", num_envs=2, checkpoint=str(bundle))
    with pytest.raises(ValueError, match="sampling_steps.*got 0"):
        envs.unwrapped.sampling_steps = 0
    envs.unwrapped.sampling_steps = 1
    envs.reset(seed=0)
    envs.step(np.zeros(2, np.int64))


def test_temperature_setting(bundle):
    envs = gym.make_vec("DiTWM/Pong-v0", num_envs=2, checkpoint=str(bundle), temperature=0.25)
    assert envs.unwrapped.temperature == 0.25 == envs.unwrapped.bundle.model.temperature
    with pytest.raises(ValueError, match="temperature.*got -1"):
        envs.unwrapped.temperature = -1
    envs.unwrapped.temperature = 0
    envs.reset(seed=0)
    envs.step(np.zeros(2, np.int64))
    assert gym.make("DiTWM/Pong-v0", checkpoint=str(bundle), temperature=0.5).unwrapped.temperature == 0.5


def test_sampling_shift_setting(bundle):
    assert "sampling_shift" not in json.loads((bundle / "config.json").read_text())  # absent: uniform steps
    envs = gym.make_vec("DiTWM/Pong-v0", num_envs=2, checkpoint=str(bundle), sampling_shift=3.0)
    assert envs.unwrapped.sampling_shift == 3.0 == envs.unwrapped.bundle.model.sampling_shift
    with pytest.raises(ValueError, match="sampling_shift.*got -1"):
        envs.unwrapped.sampling_shift = -1
    envs.reset(seed=0)
    envs.step(np.zeros(2, np.int64))
    assert gym.make("DiTWM/Pong-v0", checkpoint=str(bundle)).unwrapped.sampling_shift == 1.0
    assert gym.make("DiTWM/Pong-v0", checkpoint=str(bundle), sampling_shift=2).unwrapped.sampling_shift == 2.0


def test_temperature_refused_by_a_model_without_one(tmp_path):
    from dit_envs.envs.real import action_meanings
    from tests.test_rssm_bundle import make_rssm_model

    rssm = make_rssm_model()
    path = save_bundle(rssm, tmp_path / "rssm", game="Pong", action_meanings=list(action_meanings("Pong")),
                       start_z=torch.zeros(1, rssm.context_len, rssm.latent_dim),
                       start_a=torch.full((1, rssm.context_len), 6, dtype=torch.int64))
    assert "temperature" not in json.loads((path / "config.json").read_text())
    envs = gym.make_vec("DiTWM/Pong-v0", num_envs=2, checkpoint=str(path), obs_type="latent")
    assert envs.unwrapped.temperature is None
    with pytest.raises(ValueError, match="temperature: the rssm model has no sampling temperature, got 0.5"):
        gym.make_vec("DiTWM/Pong-v0", num_envs=2, checkpoint=str(path), obs_type="latent", temperature=0.5)
    assert envs.unwrapped.sampling_shift is None
    with pytest.raises(ValueError, match="sampling_shift: the rssm model has no sampler time shift, got 2"):
        gym.make_vec("DiTWM/Pong-v0", num_envs=2, checkpoint=str(path), obs_type="latent", sampling_shift=2)


def test_bundle_missing_file(copy_of):
    b = copy_of()
    (b / "dynamics.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="dynamics.safetensors"):
        gym.make_vec("DiTWM/Pong-v0", num_envs=2, checkpoint=str(b))


@pytest.mark.parametrize("damage", ["truncate", "bitflip"])
def test_bundle_damaged_weights(copy_of, damage):
    b = copy_of()
    f = b / "dynamics.safetensors"
    raw = bytearray(f.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        raw[-10] ^= 0x01
    f.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="dynamics.safetensors"):
        gym.make_vec("DiTWM/Pong-v0", num_envs=2, checkpoint=str(b))


def test_sha256_pin_mismatch(copy_of):
    b = copy_of()
    pins = registry.sha256_dir(b)
    pins["heads.safetensors"] = "0" * 64
    registry.register("DiTWMTest/PinnedPong-v0", str(b), game="Pong", sha256=pins)
    try:
        with pytest.raises(registry.IntegrityError, match="heads.safetensors"):
            gym.make_vec("DiTWMTest/PinnedPong-v0", num_envs=2)
    finally:
        registry.unregister("DiTWMTest/PinnedPong-v0")


@pytest.mark.parametrize("game, num_actions, expect, field", [
    ("Breakout", 4, {}, "game"),
    ("Pong", 3, {}, "num_actions"),
    ("Pong", 6, {"latent_dim": 999}, "latent_dim"),
    ("Pong", 6, {"obs_shape": [1, 84, 84]}, "obs_shape"),
])
def test_bundle_disagrees_with_id(tmp_path, game, num_actions, expect, field):
    b = make_tiny_bundle(tmp_path / "b", game=game, num_actions=num_actions)
    with pytest.raises(ValueError, match=field):
        gym.make_vec("DiTWM/Pong-v0", num_envs=2, checkpoint=str(b), **expect)


def test_bundle_obs_shape_in_config_checked(copy_of):
    b = copy_of()
    cfg = json.loads((b / "config.json").read_text())
    cfg["obs_shape"] = [3, 84, 84]
    (b / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="obs_shape"):
        gym.make_vec("DiTWM/Pong-v0", num_envs=2, checkpoint=str(b))


def test_unpinned_hub_revision(bundle):
    with pytest.raises(ValueError, match="revision"):
        gym.make_vec("DiTWM/Pong-v0", num_envs=2, checkpoint="hf://someorg/pong@main")
    with pytest.raises(ValueError, match="revision"):
        gym.make_vec("DiTWM/Pong-v0", num_envs=2, checkpoint="hf://someorg/pong")
