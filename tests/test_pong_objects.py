"""Pong object locator on real protocol frames (paddle motion, ball tracking) and on synthetic frames."""
from __future__ import annotations

import numpy as np
import pytest

from dit_envs.envs.real import make_real_env
from trainers.pong_objects import agent_return_rows, ball_columns, locate_pong_objects, store_ball_columns

BG = np.array([144, 72, 17], np.uint8)
WALL_BLEND = np.array([177, 131, 96], np.uint8)  # row 10 of every real frame


@pytest.fixture(scope="module")
def held_frames() -> np.ndarray:
    """uint8 ``(T, 2, 3, 64, 64)``: env 0 holds UP (RIGHT), env 1 holds DOWN (LEFT) for 150 steps."""
    env = make_real_env("Pong", num_envs=2, seed=0)
    up, down = env.action_meanings.index("RIGHT"), env.action_meanings.index("LEFT")
    obs, _ = env.reset(seed=0)
    frames = [obs]
    for _ in range(150):
        obs, *_ = env.step(np.array([up, down]))
        frames.append(obs)
    env.close()
    return np.stack(frames)


def _field_frame() -> np.ndarray:
    f = np.empty((3, 64, 64), np.uint8)
    f[:] = BG[:, None, None]
    f[:, 8:10] = 236
    f[:, 10] = WALL_BLEND[:, None]
    f[:, 59:] = 236
    return f


def test_held_up_and_down_move_the_agent_paddle_the_right_way(held_frames):
    o = [locate_pong_objects(held_frames[:, i]) for i in range(2)]
    start_up, start_down = o[0].agent_y[0], o[1].agent_y[0]
    assert not np.isnan(start_up) and not np.isnan(start_down)
    end_up, end_down = np.nanmean(o[0].agent_y[20:30]), np.nanmean(o[1].agent_y[20:30])
    assert end_up < start_up - 5, (start_up, end_up)  # rows grow downwards: UP decreases the row
    assert end_down > start_down + 5, (start_down, end_down)
    assert end_up <= 13 and end_down >= 52  # pinned against the walls


def test_ball_found_where_in_play_and_tracked_smoothly(held_frames):
    frames = held_frames.reshape(-1, 3, 64, 64)
    o = locate_pong_objects(frames)
    brown = np.all(frames[:, :, 30, 30] == BG, axis=1)  # skip the reset frames' other palette
    # Independent "in play" test: a pixel far from the background between the paddle columns.
    mid = frames[:, :, 11:59, 12:52].astype(int)
    far = np.abs(mid - BG[None, :, None, None].astype(int)).sum(1) > 100  # (N, 48, 40)
    in_play = far.any((1, 2)) & brown
    assert in_play.mean() > 0.3  # serves pause the ball after every point
    assert not np.isnan(o.ball[in_play]).any(), "ball not found in a frame where it is in play"
    for i in np.flatnonzero(in_play):
        ys, xs = np.nonzero(far[i])
        if xs.min() < 2 or xs.max() > 37:  # partly outside the window: its centroid is cut
            continue
        assert abs(o.ball[i, 0] - (ys.mean() + 11)) < 1.0 and abs(o.ball[i, 1] - (xs.mean() + 12)) < 1.0
    for env in range(2):  # consecutive positions of one env's ball: <= 4 px per step (no jumps to paddles)
        ball = o.ball.reshape(-1, 2, 2)[:, env]
        both = ~np.isnan(ball[1:, 0]) & ~np.isnan(ball[:-1, 0])
        step = np.abs(np.diff(ball, axis=0))[both]
        assert both.sum() > 50 and step.max() <= 4.0, step.max()


def test_paddle_at_top_wall_is_not_a_ball(held_frames):
    o = locate_pong_objects(held_frames[:, 0])  # the UP env: its paddle sits against the top wall
    at_top = o.agent_y <= 11
    assert at_top.sum() > 20
    near_paddle = (o.ball[:, 0] < 12) & (o.ball[:, 1] > 54)
    assert not near_paddle[at_top].any()


def test_synthetic_positions():
    f = _field_frame()
    f[:, 30, 20] = 236  # one ball pixel
    f[:, 40:46, 56:58] = np.array([92, 186, 92], np.uint8)[:, None, None]  # agent rows 40..45
    f[:, 20:26, 6:8] = np.array([213, 130, 74], np.uint8)[:, None, None]  # opponent rows 20..25
    o = locate_pong_objects(f)
    assert np.abs(o.ball[0] - [30.0, 20.0]).max() <= 0.5
    assert abs(o.agent_y[0] - 42.5) <= 0.5 and abs(o.opponent_y[0] - 22.5) <= 0.5
    g = _field_frame()
    g[:, 30:32, 20] = 236  # a two-pixel ball: centroid between the rows
    assert np.abs(locate_pong_objects(g).ball[0] - [30.5, 20.0]).max() <= 0.5


def test_empty_and_smeared_frames_have_no_objects():
    o = locate_pong_objects(np.stack([_field_frame(), np.full((3, 64, 64), 128, np.uint8)]))
    assert np.isnan(o.ball).all() and np.isnan(o.agent_y).all() and np.isnan(o.opponent_y).all()


def test_bad_input():
    with pytest.raises(ValueError, match="frames: expected uint8"):
        locate_pong_objects(np.zeros((2, 3, 64, 64), np.float32))


def ball_frames(cols: list[int]) -> np.ndarray:
    """Field frames with a one-pixel ball at row 30 and the given columns: uint8 ``(len(cols), 3, 64, 64)``."""
    out = np.stack([_field_frame() for _ in cols])
    for i, c in enumerate(cols):
        out[i, :, 30, c] = 236
    return out


def test_agent_returns_are_apexes_on_the_agent_side_within_an_episode():
    cols = [40, 45, 50, 46, 42, 20, 15, 10, 14, 30, 40, 50]  # apex at 2 (agent side), 7 (opponent side), 11 (end)
    episode = np.array([0] * 10 + [1] * 2)
    col = ball_columns(ball_frames(cols), chunk=5)
    assert np.allclose(col, cols)
    assert np.flatnonzero(agent_return_rows(col, episode)).tolist() == [2]
    split = np.array([0] * 3 + [1] * 9)  # the same apex split over two episodes is no return
    assert not agent_return_rows(col, split).any()
    with pytest.raises(ValueError, match="episode.*12.*11"):
        agent_return_rows(col, episode[:11])


def test_store_ball_columns_reads_chunk_by_chunk_in_load_order(tmp_path):
    from trainers.data import EpisodeStore

    store = EpisodeStore(tmp_path / "s", chunk_rows=3)
    store.write_meta(game="Pong", action_meanings=["NOOP"])
    cols = [40, 45, 50, 46, 42, 20, 15]
    for ep, rows in ((1, [5, 6]), (0, [0, 1, 2, 3, 4])):  # episode 1's chunk is written first
        n = len(rows)
        store.add(obs=ball_frames([cols[r] for r in rows]), action=np.zeros(n, np.int64),
                  reward=np.zeros(n, np.float32), terminated=np.zeros(n, bool), truncated=np.zeros(n, bool),
                  episode=np.full(n, ep, np.int64), step=np.arange(n, dtype=np.int64))
        store.flush()
    episode, col = store_ball_columns(store)
    loaded = store.load()
    assert np.array_equal(episode, loaded["episode"]) and np.allclose(col, ball_columns(loaded["obs"]))
    assert episode.tolist() == [0] * 5 + [1] * 2 and np.allclose(col, [40, 45, 50, 46, 42, 20, 15])
    empty = store_ball_columns(EpisodeStore(tmp_path / "none"))
    assert empty[0].shape == (0,) and empty[1].shape == (0,)
