"""Ball fates at the agent's paddle (`reward_rates.py --fates`): returns, phantom returns and vanished balls."""
import numpy as np
import pytest

from trainers.pong_fates import PHANTOM_GAP, ball_fates

NAN = np.nan


def _episode(cols, rows=None, paddle=30.0, reward=None, done=None):
    """One env: ball columns per frame (NaN: not visible), the ball's row 30 unless given, a fixed paddle row."""
    cols = np.asarray(cols, np.float64)
    t = len(cols)
    rows = np.full(t, 30.0) if rows is None else np.asarray(rows, np.float64)
    ball = np.stack([np.where(np.isnan(cols), NAN, rows), cols], axis=1)[None]
    pad = np.full((1, t), paddle, np.float64)
    rew = np.zeros((1, t)) if reward is None else np.asarray(reward, np.float64)[None]
    dn = np.zeros((1, t), bool) if done is None else np.asarray(done, bool)[None]
    return ball, pad, rew, dn


def test_a_return_at_the_paddle_and_a_phantom_one():
    cols = [44, 48, 52, 55, 52, 48, 44]
    assert ball_fates(*_episode(cols)) == {"returns": 1, "phantom_returns": 0, "vanished": 0}
    far = ball_fates(*_episode(cols, paddle=30.0 + PHANTOM_GAP + 1))
    assert far == {"returns": 1, "phantom_returns": 1, "vanished": 0}
    assert ball_fates(*_episode(cols, paddle=NAN))["phantom_returns"] == 1  # no paddle: a phantom
    assert ball_fates(*_episode(cols, paddle=30.0 + PHANTOM_GAP))["phantom_returns"] == 0  # at the gap: real
    # done[t] ends the episode at step t, so frame t + 1 is the next one's first: a turn whose three frames
    # (2, 3, 4) straddle an end is no return, one with the end before or after them is
    assert ball_fates(*_episode(cols, done=[0, 0, 0, 1, 0, 0, 0]))["returns"] == 0
    assert ball_fates(*_episode(cols, done=[0, 0, 1, 0, 0, 0, 0]))["returns"] == 0
    assert ball_fates(*_episode(cols, done=[0, 1, 0, 0, 0, 0, 0]))["returns"] == 1
    assert ball_fates(*_episode(cols, done=[0, 0, 0, 0, 1, 0, 0]))["returns"] == 1
    assert ball_fates(*_episode([20, 22, 24, 22, 20]))["returns"] == 0  # a turn mid-field is not the paddle's


def test_a_vanished_ball_and_what_is_not_one():
    cols = [40, 44, 48, NAN, NAN, NAN, NAN]
    assert ball_fates(*_episode(cols))["vanished"] == 1
    assert ball_fates(*_episode(cols, reward=[0, 0, 0, -1, 0, 0, 0]))["vanished"] == 0  # it cost a point
    assert ball_fates(*_episode(cols, done=[0, 0, 1, 0, 0, 0, 0]))["vanished"] == 0  # the episode ended
    assert ball_fates(*_episode(cols, done=[0, 0, 0, 0, 1, 0, 0]))["vanished"] == 0  # ... before frame 5
    assert ball_fates(*_episode(cols, done=[0, 0, 0, 0, 0, 1, 0]))["vanished"] == 1  # ... after it
    assert ball_fates(*_episode([40, 44, 48, NAN, NAN, 50, 52]))["vanished"] == 0  # seen again within 3 frames
    assert ball_fates(*_episode([48, 44, 40, NAN, NAN, NAN, NAN]))["vanished"] == 0  # moving away
    assert ball_fates(*_episode([52, 55, 58, 61, NAN, NAN, NAN]))["vanished"] == 0  # seen past the paddle
    two = [np.concatenate(x) for x in zip(_episode(cols), _episode([44, 48, 52, 55, 52, 48, 44]))]
    assert ball_fates(*two) == {"returns": 1, "phantom_returns": 0, "vanished": 1}  # summed over envs


def test_bad_shapes():
    ball, pad, rew, done = _episode([40, 44, 48])
    with pytest.raises(ValueError, match="ball"):
        ball_fates(ball[..., 0], pad, rew, done)
    with pytest.raises(ValueError, match="paddle"):
        ball_fates(ball, pad[:, :2], rew, done)
    with pytest.raises(ValueError, match="reward"):
        ball_fates(ball, pad, rew[0], done)
    with pytest.raises(ValueError, match="done"):
        ball_fates(ball, pad, rew, done.astype(int))
