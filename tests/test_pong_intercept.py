"""The scripted intercept player (`ditwm collect --agent intercept`): its geometry, its actions on synthetic
frames, its per-env memory, and the collector playing exactly its actions."""
import numpy as np
import pytest

from trainers import cli as ditwm
from trainers.collect import Args, main
from trainers.data import EpisodeStore
from trainers.pong_intercept import BALL_BOTTOM, BALL_TOP, CENTRE_ROW, PADDLE_COL, InterceptPlayer, intercept_rows

MEANINGS = ["NOOP", "FIRE", "RIGHT", "LEFT", "RIGHTFIRE", "LEFTFIRE"]
NOOP, UP, DOWN = 0, 2, 3
BG = np.array([144, 72, 17], np.uint8)


def _frame(ball: tuple[int, int] | None, paddle_row: int) -> np.ndarray:
    """A 64×64 Pong frame with a 2-pixel ball at (row, col) and the agent's 8-row paddle on rows paddle_row-4 …
    paddle_row+3 (its centroid: paddle_row - 0.5)."""
    f = np.empty((3, 64, 64), np.uint8)
    f[:] = BG[:, None, None]
    f[:, paddle_row - 4:paddle_row + 4, 56:58] = np.array([92, 186, 92], np.uint8)[:, None, None]
    if ball is not None:
        f[:, ball[0]:ball[0] + 1, ball[1]:ball[1] + 2] = 236
    return f


def test_intercept_rows_straight_reflected_and_away():
    row = intercept_rows(np.array([30.0, 30.0, 30.0]), np.array([15.0, PADDLE_COL - 10, 40.0]),
                         np.array([0.0, -3.0, 2.0]), np.array([4.0, 1.0, -2.0]))
    assert row[0] == pytest.approx(30.0)  # flat: the ball's own row
    top_dist = 30.0 - BALL_TOP  # 30 px up over 10 steps: reaches the top wall and comes back down
    assert row[1] == pytest.approx(BALL_TOP + (30.0 - top_dist))
    assert row[2] == pytest.approx(CENTRE_ROW + 0.5 * (30.0 - CENTRE_ROW))  # moving away: half-way to the centre
    bottom = intercept_rows(50.0, PADDLE_COL - 10, 2.0, 1.0)  # 20 px down: 7.5 to the wall, 12.5 back up
    assert bottom == pytest.approx(BALL_BOTTOM - 12.5)
    twice = intercept_rows(30.0, PADDLE_COL - 10, -8.0, 1.0)  # 80 px up: 19.5 to the top, 47 down, 13.5 back up
    assert twice == pytest.approx(BALL_BOTTOM - 13.5)
    past = intercept_rows(30.0, PADDLE_COL + 2, 1.0, 1.0)  # already past the paddle's column: its own row
    assert past == pytest.approx(30.0)
    many = intercept_rows(np.full(50, 30.0), np.zeros(50), np.linspace(-20, 20, 50), np.full(50, 1.0))
    assert (many >= BALL_TOP - 1e-9).all() and (many <= BALL_BOTTOM + 1e-9).all()


def test_player_moves_towards_the_crossing_and_remembers_per_env():
    p = InterceptPlayer(MEANINGS, 2, offset=0.0)
    first = np.stack([_frame((20, 30), 40), _frame((50, 30), 42)])
    assert p.act(first).tolist() == [UP, DOWN]  # first sight: towards the ball's row
    # env 0: the ball moves right and down (2 rows per 2 cols) → crosses the paddle column near row 45: go down
    # env 1: the ball moves away from the paddle → wait half-way between the centre and the ball (row 42); the
    # paddle's centroid is 41.5, inside the 1-pixel dead zone: stay
    second = np.stack([_frame((22, 32), 40), _frame((50, 28), 42)])
    assert p.act(second).tolist() == [DOWN, NOOP]
    p.episode_ended(np.array([True, False]))
    assert np.isnan(p.prev_ball[0]).all() and not np.isnan(p.prev_ball[1]).any()
    assert np.isnan(p.prev_paddle[0]) and not np.isnan(p.prev_paddle[1])
    # env 0 forgot its ball at (22, 32): a ball at (30, 36) is a first sight (its row, 30: go up), not a ball coming
    # down-right (crossing near row 48: go down)
    assert p.act(np.stack([_frame((30, 36), 40), _frame(None, 42)])).tolist() == [UP, UP]  # no ball: the centre


def test_offset_range_draws_a_new_offset_at_each_approach():
    p = InterceptPlayer(MEANINGS, 3, offset=(-7.0, 7.0), seed=0)
    start = p.offsets.copy()
    assert ((start >= -7) & (start <= 7)).all() and len(set(start.tolist())) == 3
    assert np.array_equal(start, InterceptPlayer(MEANINGS, 3, offset=(-7.0, 7.0), seed=0).offsets)
    p.act(np.stack([_frame((30, 30), 34), _frame((30, 30), 34), _frame(None, 34)]))
    assert np.array_equal(p.offsets, start)  # first sight: no velocity yet
    p.act(np.stack([_frame((30, 32), 34), _frame((30, 28), 34), _frame(None, 34)]))  # env 0's ball comes
    assert p.offsets[0] != start[0] and np.array_equal(p.offsets[1:], start[1:])
    drawn = p.offsets[0]
    p.act(np.stack([_frame((30, 34), 34), _frame((30, 26), 34), _frame(None, 34)]))  # still coming: kept
    assert p.offsets[0] == drawn
    p.act(np.stack([_frame(None, 34), _frame((30, 24), 34), _frame(None, 34)]))  # env 0's ball unseen 2 frames
    p.act(np.stack([_frame(None, 34), _frame((30, 22), 34), _frame(None, 34)]))
    p.act(np.stack([_frame((30, 40), 34), _frame((30, 20), 34), _frame(None, 34)]))
    p.act(np.stack([_frame((30, 42), 34), _frame((30, 18), 34), _frame(None, 34)]))
    assert p.offsets[0] == drawn  # a short gap: the same approach
    p.episode_ended(np.array([True, False, False]))
    p.act(np.stack([_frame((30, 36), 34), _frame((30, 16), 34), _frame(None, 34)]))  # first sight again
    p.act(np.stack([_frame((30, 38), 34), _frame((30, 14), 34), _frame(None, 34)]))  # a new approach
    assert p.offsets[0] != drawn
    again = p.offsets[0]
    for col in (36, 34, 32):  # env 0's ball goes away (returned), then comes back: a new approach
        p.act(np.stack([_frame((30, col), 34), _frame(None, 34), _frame(None, 34)]))
    assert p.offsets[0] == again
    p.act(np.stack([_frame((30, 34), 34), _frame(None, 34), _frame(None, 34)]))
    assert p.offsets[0] != again
    last = p.offsets[0]
    for _ in range(3):  # unseen for APPROACH_GAP frames: the approach is over, the next sight starts a new one
        p.act(np.stack([_frame(None, 34)] * 3))
    p.act(np.stack([_frame((30, 30), 34), _frame(None, 34), _frame(None, 34)]))
    p.act(np.stack([_frame((30, 32), 34), _frame(None, 34), _frame(None, 34)]))
    assert p.offsets[0] != last
    assert (InterceptPlayer(MEANINGS, 2, offset=3.0).offsets == 3.0).all()
    # the offset moves the paddle's target: a flat ball at row 34, the paddle's centroid at 33.5
    acts = []
    for off in (6.0, -6.0):
        q = InterceptPlayer(MEANINGS, 1, offset=(off, off))
        q.act(_frame((34, 30), 34)[None])
        acts.append(int(q.act(_frame((34, 32), 34)[None])[0]))
    assert acts == [DOWN, UP]


def test_player_bad_input():
    with pytest.raises(ValueError, match="action_meanings"):
        InterceptPlayer(["NOOP", "FIRE"], 1)
    with pytest.raises(ValueError, match="num_envs"):
        InterceptPlayer(MEANINGS, 0)
    with pytest.raises(ValueError, match="dead_zone"):
        InterceptPlayer(MEANINGS, 1, dead_zone=-1.0)
    with pytest.raises(ValueError, match="offset"):
        InterceptPlayer(MEANINGS, 1, offset=float("nan"))
    for bad in ((3.0, -3.0), (1.0, 2.0, 3.0), (0.0, float("inf")), True, "3", ("a", "b")):
        with pytest.raises(ValueError, match="offset"):
            InterceptPlayer(MEANINGS, 1, offset=bad)
    with pytest.raises(ValueError, match="frames"):
        InterceptPlayer(MEANINGS, 2).act(np.stack([_frame(None, 30)]))
    with pytest.raises(ValueError, match="frames"):
        InterceptPlayer(MEANINGS, 3).act(_frame(None, 30))  # one frame without its batch axis
    with pytest.raises(ValueError, match="done"):
        InterceptPlayer(MEANINGS, 2).episode_ended(np.array([0, 1]))


def test_collect_intercept_plays_the_players_actions(tmp_path, monkeypatch):
    import trainers.collect as collect

    ended = []

    class Recording(InterceptPlayer):
        def episode_ended(self, done):
            ended.append(np.array(done))
            super().episode_ended(done)

    monkeypatch.setattr(collect, "InterceptPlayer", Recording)
    out = tmp_path / "icpt"
    assert main(Args(steps=300, out=str(out), num_envs=2, agent="intercept", epsilon=0.0, seed=3)) == 0
    assert len(ended) == 150 and all(d.dtype == bool and d.shape == (2,) for d in ended)
    store = EpisodeStore(out)
    assert store.read_meta()["collector"]["agent"] == "intercept"
    d = store.load()
    assert len(np.unique(d["episode"])) == 2  # 150 steps each: no episode ended
    moved = 0
    for ep in np.unique(d["episode"]):
        rows = np.flatnonzero(d["episode"] == ep)  # sorted by step; row t's action was chosen on row t-1's frame
        replay = InterceptPlayer(store.read_meta()["action_meanings"], 1)
        expected = np.concatenate([replay.act(d["obs"][r:r + 1]) for r in rows[:-1]])
        assert (d["action"][rows[1:]] == expected).all()
        moved += int((expected != NOOP).sum())
    assert moved > 20


def test_collect_intercept_offset_range_replays(tmp_path, capsys):
    out = tmp_path / "edge"
    assert main(Args(steps=200, out=str(out), num_envs=1, agent="intercept", epsilon=0.0, seed=5,
                     intercept_offset=[-7.0, 7.0])) == 0
    store = EpisodeStore(out)
    d = store.load()
    replay = InterceptPlayer(store.read_meta()["action_meanings"], 1, offset=(-7.0, 7.0), seed=[5, 0, 1])
    first = replay.offsets[0]
    assert (d["action"][1:] == np.concatenate([replay.act(o[None]) for o in d["obs"][:-1]])).all()
    assert replay.offsets[0] != first  # it drew again during play
    assert ditwm.main(["collect", "--agent", "intercept", "--intercept-offset", "1", "2", "--steps", "400",
                       "--num-envs", "1", "--resume", "--out", str(out)]) == 2  # resumed with another offset
    assert "--intercept-offset: expected [-7.0, 7.0] (the offset of the store being resumed)" in \
        capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--agent", "intercept", "--intercept-offset", "3", "-3"],
                                  ["--agent", "random", "--intercept-offset", "-7", "7"]])
def test_intercept_offset_bad_exit_2(tmp_path, capsys, argv):
    out = tmp_path / "new"
    assert ditwm.main(["collect", *argv, "--steps", "10", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--intercept-offset" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_intercept_other_game_exit_2(tmp_path, capsys):
    out = tmp_path / "new"
    assert ditwm.main(["collect", "--agent", "intercept", "--game", "Breakout", "--steps", "10", "--out",
                       str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--agent" in err and "intercept" in err and len(err.splitlines()) == 1
    assert not out.exists()
