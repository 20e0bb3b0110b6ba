"""SB3 on the imagination env through `to_sb3`: the VecEnv contract and short PPO / A2C / DQN runs."""
import gymnasium as gym
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode

import dit_envs  # noqa: F401  (registers DiTWM ids)
from dit_envs.sb3 import to_sb3
from tests.conftest import make_tiny_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return str(make_tiny_bundle(tmp_path_factory.mktemp("sb3") / "b", game="Pong"))


def test_vecenv_contract(bundle):
    venv = to_sb3(gym.make_vec("DiTWM/Pong-v0", num_envs=4, checkpoint=bundle, max_episode_steps=5))
    venv.seed(3)
    obs = venv.reset()
    assert obs.shape == (4, 3, 64, 64) and obs.dtype == np.uint8
    ends = 0
    for t in range(12):
        venv.step_async(np.zeros(4, np.int64))
        obs, rew, dones, infos = venv.step_wait()
        assert rew.dtype == np.float32 and dones.dtype == bool and len(infos) == 4
        for i in np.flatnonzero(dones):
            assert infos[i]["terminal_observation"].shape == (3, 64, 64)
            assert "TimeLimit.truncated" in infos[i]
            ends += 1
        for i in np.flatnonzero(~dones):
            assert "terminal_observation" not in infos[i]
    assert ends >= 8  # every env truncates at step 5 and 10 (or terminates earlier)
    assert venv.get_attr("num_envs") == [4] * 4


def test_rejects_next_step_autoreset(bundle):
    envs = gym.make_vec("DiTWM/Pong-v0", num_envs=2, checkpoint=bundle, autoreset_mode=AutoresetMode.NEXT_STEP)
    with pytest.raises(ValueError, match="autoreset_mode"):
        to_sb3(envs)
    with pytest.raises(TypeError, match="vec_env"):
        to_sb3(gym.make("DiTWM/Pong-v0", checkpoint=bundle))


def test_ppo_cnn_on_pixels(bundle):
    from stable_baselines3 import PPO

    venv = to_sb3(gym.make_vec("DiTWM/Pong-v0", num_envs=8, checkpoint=bundle, max_episode_steps=100))
    model = PPO("CnnPolicy", venv, n_steps=128, batch_size=256, n_epochs=1, seed=0, device="cpu", verbose=0)
    model.learn(total_timesteps=3072)
    assert model.num_timesteps >= 3072
    obs = venv.reset()
    action, _ = model.predict(obs, deterministic=True)
    assert action.shape == (8,)


@pytest.mark.parametrize("algo", ["A2C", "DQN"])
def test_mlp_on_latents(bundle, algo):
    import stable_baselines3 as sb3

    venv = to_sb3(gym.make_vec("DiTWM/Pong-v0", num_envs=4, checkpoint=bundle, obs_type="latent",
                               max_episode_steps=50))
    kw = dict(learning_starts=100, buffer_size=2000) if algo == "DQN" else {}
    model = getattr(sb3, algo)("MlpPolicy", venv, seed=0, device="cpu", verbose=0, **kw)
    model.learn(total_timesteps=1000)
    assert model.num_timesteps >= 1000
