"""The product: registered DiTWM ids as single and natively batched Gymnasium envs (parametrized over every id)."""
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env
from gymnasium.vector import AutoresetMode

import dit_envs
import registry
from dit_envs.envs.checker import check_vector_env
from dit_envs.envs.real import action_meanings
from tests.conftest import make_tiny_bundle

ENV_IDS = [e.env_id for e in registry.entries()]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Per registered id: {} when its own checkpoint resolves, else a tiny random bundle of the same game."""
    out = {}
    for entry in registry.entries():
        try:
            registry.resolve(entry)
            out[entry.env_id] = {}
        except FileNotFoundError:
            path = tmp_path_factory.mktemp(entry.env_id.replace("/", "_"))
            make_tiny_bundle(path / "bundle", game=entry.game, num_actions=len(action_meanings(entry.game)))
            out[entry.env_id] = {"checkpoint": str(path / "bundle")}
    return out


@pytest.mark.parametrize("env_id", ENV_IDS)
@pytest.mark.parametrize("obs_type", ["pixels", "latent"])
def test_gymnasium_check_env(env_id, obs_type, checkpoints):
    env = gym.make(env_id, obs_type=obs_type, **checkpoints[env_id])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gym_check_env(env.unwrapped, skip_render_check=True)
    env.close()


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_sb3_check_env(env_id, checkpoints):
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    env = gym.make(env_id, **checkpoints[env_id])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sb3_check_env(env, warn=True)


@pytest.mark.parametrize("env_id", ENV_IDS)
@pytest.mark.parametrize("num_envs", [1, 4, 64])
def test_vector_checker_1000_steps(env_id, num_envs, checkpoints):
    envs = gym.make_vec(env_id, num_envs=num_envs, max_episode_steps=40, **checkpoints[env_id])
    assert type(envs.unwrapped).__name__ == "DiTWMVectorEnv"  # native batching, not SyncVectorEnv
    counts = check_vector_env(envs, steps=1000)
    assert counts["truncated"] > 0
    envs.close()


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_next_step_autoreset(env_id, checkpoints):
    envs = gym.make_vec(env_id, num_envs=4, max_episode_steps=5, autoreset_mode=AutoresetMode.NEXT_STEP,
                        **checkpoints[env_id])
    assert envs.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
    counts = check_vector_env(envs, steps=60)
    assert counts["truncated"] > 0


@pytest.mark.parametrize("env_id", ENV_IDS)
@pytest.mark.parametrize("obs_type", ["pixels", "latent"])
def test_seeded_rollouts_bit_identical(env_id, obs_type, checkpoints):
    def rollout(seed):
        envs = gym.make_vec(env_id, num_envs=8, obs_type=obs_type, **checkpoints[env_id])
        obs, _ = envs.reset(seed=seed)
        frames, rewards = [obs], []
        rng = np.random.default_rng(0)
        for _ in range(30):
            obs, r, *_ = envs.step(rng.integers(0, envs.single_action_space.n, 8))
            frames.append(obs)
            rewards.append(r)
        return np.stack(frames), np.stack(rewards)

    a, b, c = rollout(7), rollout(7), rollout(8)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_spaces_and_formats(checkpoints):
    kw = checkpoints["DiTWM/Pong-v0"]
    envs = gym.make_vec("DiTWM/Pong-v0", num_envs=3, **kw)
    obs, _ = envs.reset(seed=0)
    real = dit_envs.make_real_env("Pong", num_envs=3)
    assert envs.single_observation_space == real.single_observation_space
    assert envs.single_action_space == real.single_action_space
    assert obs.dtype == np.uint8 and obs.shape == (3, 3, 64, 64)
    lat = gym.make_vec("DiTWM/Pong-v0", num_envs=3, obs_type="latent", **kw)
    lobs, _ = lat.reset(seed=0)
    K, d_z = lat.unwrapped.core.model.context_len, lat.unwrapped.core.model.latent_dim
    assert lobs.dtype == np.float32 and lobs.shape == (3, K, d_z)
    real.close()


def test_render_and_sampling_steps(checkpoints):
    kw = checkpoints["DiTWM/Pong-v0"]
    env = gym.make("DiTWM/Pong-v0", render_mode="rgb_array", sampling_steps=2, **kw)
    env.reset(seed=0)
    frame = env.render()
    assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8
    assert env.unwrapped.sampling_steps == 2
    envs = gym.make_vec("DiTWM/Pong-v0", num_envs=2, render_mode="rgb_array", **kw)
    envs.reset(seed=0)
    assert envs.render().shape == (2, 64, 64, 3)


def test_registered_max_episode_steps_and_override(checkpoints):
    kw = checkpoints["DiTWM/Pong-v0"]
    env = gym.make("DiTWM/Pong-v0", max_episode_steps=3, **kw)
    for seed in range(5):
        env.reset(seed=seed)
        for t in range(3):
            _, _, terminated, truncated, _ = env.step(0)
            if terminated:
                break
            assert truncated == (t == 2)
    assert gym.spec("DiTWM/Pong-v0").max_episode_steps == registry.get("DiTWM/Pong-v0").max_episode_steps


def test_runtime_registration_makes_gym_id(tmp_path):
    make_tiny_bundle(tmp_path / "b", game="Pong")
    registry.register("DiTWMTest/Pong-v7", str(tmp_path / "b"), game="Pong", max_episode_steps=12)
    try:
        envs = gym.make_vec("DiTWMTest/Pong-v7", num_envs=2)
        envs.reset(seed=0)
        for _ in range(12):
            *_, trunc, _ = envs.step(np.zeros(2, np.int64))
        assert trunc.all()
    finally:
        registry.unregister("DiTWMTest/Pong-v7")
    with pytest.raises(gym.error.Error):
        gym.make("DiTWMTest/Pong-v7")


def test_missing_bundled_checkpoint_message():
    if not isinstance(registry.get("DiTWM/Pong-v0").source, str) or "bundled" not in registry.get("DiTWM/Pong-v0").source:
        pytest.skip("catalog source changed")
    try:
        registry.resolve(registry.get("DiTWM/Pong-v0"))
    except FileNotFoundError as e:
        assert "checkpoint" in str(e)
