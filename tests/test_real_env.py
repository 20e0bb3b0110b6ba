"""The real game under the protocol: format, seeding, and that actions reach the game."""
import numpy as np
import pytest

from dit_envs.envs.real import action_meanings, make_real_env, rom_id
from trainers.pong_objects import locate_pong_objects


def test_observation_format_and_spaces():
    env = make_real_env("Pong", num_envs=3, seed=0)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (3, 3, 64, 64) and obs.dtype == np.uint8
    assert env.single_observation_space.shape == (3, 64, 64)
    assert env.single_action_space.n == 6
    assert env.action_meanings[:4] == ("NOOP", "FIRE", "RIGHT", "LEFT")
    obs, reward, term, trunc, _ = env.step(np.zeros(3, np.int64))
    assert obs.shape == (3, 3, 64, 64) and reward.dtype == np.float32 and term.dtype == bool
    env.close()


def test_same_seed_same_frames():
    frames = []
    for _ in range(2):
        env = make_real_env("Pong", num_envs=2)
        obs, _ = env.reset(seed=123)
        rng = np.random.default_rng(0)
        for _ in range(30):
            obs, *_ = env.step(rng.integers(0, 6, 2))
        frames.append(obs)
        env.close()
    np.testing.assert_array_equal(frames[0], frames[1])


def test_actions_move_the_agent_paddle():
    """Holding UP vs DOWN for 20 steps leaves the agent's paddle far apart (guards against no-op actions)."""
    env = make_real_env("Pong", num_envs=2)
    env.reset(seed=1)
    up, down = action_meanings("Pong").index("RIGHT"), action_meanings("Pong").index("LEFT")
    for _ in range(20):
        obs, *_ = env.step(np.array([up, down]))
    y = locate_pong_objects(obs).agent_y
    assert not np.isnan(y).any()
    assert y[1] - y[0] > 20, f"paddle rows after UP {y[0]}, after DOWN {y[1]}"
    env.close()


def test_final_obs_on_truncation():
    env = make_real_env("Pong", num_envs=2, max_num_frames_per_episode=40)  # 10 agent steps
    env.reset(seed=0)
    for t in range(10):
        obs, _, term, trunc, info = env.step(np.zeros(2, np.int64))
    assert trunc.all() and not term.any()
    assert info["_final_obs"].all() and all(f.shape == (3, 64, 64) for f in info["final_obs"])
    env.close()


@pytest.mark.parametrize("kwargs, field", [
    (dict(game="Pongg"), "game"),
    (dict(num_envs=0), "num_envs"),
    (dict(grayscale=True), "grayscale"),
    (dict(sticky=0.25), "sticky"),
])
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        make_real_env(**{"game": "Pong", **kwargs})


def test_bad_actions_name_the_field():
    env = make_real_env("Pong", num_envs=2, seed=0)
    with pytest.raises(ValueError, match="actions"):
        env.step(np.array([0, 6]))
    with pytest.raises(ValueError, match="actions"):
        env.step(np.array([0]))
    with pytest.raises(TypeError, match="actions"):
        env.step(np.array([0.0, 1.0]))
    env.step(np.array([0, 1]))  # still works
    env.close()


def test_rom_id():
    assert rom_id("Pong") == "pong" and rom_id("MsPacman") == "ms_pacman"
