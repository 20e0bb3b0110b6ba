"""A scripted Pong player that aims where the ball will cross the agent's paddle line (``ditwm collect --agent
intercept``).

Why: a world model learns the points an agent wins only from data that holds them. The stage-1 agent's 100k-step
store holds 44 points won (0.44 per 1 000 steps); the ball tracker of :func:`trainers.pong_objects.track_actions`
wins few more (it chases the ball's current row, and the paddle's inertia makes it overshoot). This player
estimates the ball's velocity from the previous frame, extrapolates the ball's path to the paddle's column with
reflections off the walls, and leads its own paddle by its velocity, so it returns most balls and, hitting them
off-centre by ``offset`` pixels, sends steep shots the opponent misses: it shows the world model many points won.
With an offset range (``ditwm collect --agent intercept --intercept-offset LOW HIGH``) each approach of the ball
draws its own offset, so some balls meet the paddle's edge and some pass it by a few pixels: data of the hit / miss
boundary, where a world model that has seen only clean returns and wide misses loses the ball instead of deciding.

Measured on real Pong (``python examples/reward_rates.py --policy intercept --num-envs 32 --steps 1000``, seed 0):
2.75 points won and 4.38 lost per 1 000 steps; in 64 games the tracker wins 0.63 and loses 6.70, random play 0.81
and 21.6.

Objects are located by colour in the 64×64 protocol frame (:func:`trainers.pong_objects.locate_pong_objects`).
"""
from __future__ import annotations

import numpy as np

from trainers.pong_objects import CENTRE_ROW, FIELD_BOTTOM, FIELD_TOP, locate_pong_objects, paddle_actions

PADDLE_COL = 55.0  # the column where the ball meets the agent's paddle face (64×64 frame)
BALL_TOP, BALL_BOTTOM = FIELD_TOP + 0.5, FIELD_BOTTOM - 1.5  # rows where the ball's centre bounces
APPROACH_GAP = 3  # frames a coming ball may go unseen and still be the same approach (no new offset)


def intercept_rows(row: np.ndarray, col: np.ndarray, v_row: np.ndarray, v_col: np.ndarray) -> np.ndarray:
    """Row where a ball at ``(row, col)`` moving ``(v_row, v_col)`` pixels per step reaches :data:`PADDLE_COL`,
    reflecting off the walls; where it moves away from the paddle (``v_col ≤ 0.1``), half-way from
    :data:`CENTRE_ROW` to the ball's row (a waiting position that follows the play).

    A ball already past the paddle's column (still moving towards it) gets its own row, folded into the field; a
    NaN ``v_col`` counts as moving away; a NaN ``row`` gives NaN.

    Args:
        row, col, v_row, v_col: float ``(N,)`` (or broadcastable) in pixels and pixels per env step of the 64×64
            frame.
    Returns:
        float64 ``(N,)`` rows: inside ``[BALL_TOP, BALL_BOTTOM]`` for a coming ball.
    """
    row, col, v_row, v_col = (np.asarray(x, np.float64) for x in (row, col, v_row, v_col))
    coming = v_col > 0.1
    steps = np.where(coming, (PADDLE_COL - col) / np.where(coming, v_col, 1.0), 0.0)
    span = BALL_BOTTOM - BALL_TOP
    y = np.mod(row + v_row * np.maximum(steps, 0.0) - BALL_TOP, 2 * span)
    y = np.where(y > span, 2 * span - y, y) + BALL_TOP  # unfold the reflections
    return np.where(coming, y, CENTRE_ROW + 0.5 * (row - CENTRE_ROW))


class InterceptPlayer:
    """Scripted Pong player for ``N`` envs, stateful: it remembers the previous frame's ball and paddle rows.

    Args:
        action_meanings: the game's action names; must hold ``NOOP``, ``RIGHT`` (paddle up) and ``LEFT`` (down).
        num_envs: ``N``.
        offset: pixels (of the 64×64 frame) below the predicted crossing row to put the paddle's centre, so the
            ball hits it off-centre and leaves at a steeper angle (default 1; 0 plays for long rallies); or a range
            ``(low, high)``: each env draws a new offset uniformly from it whenever a ball starts coming towards
            its paddle (and at construction); a coming ball unseen for fewer than :data:`APPROACH_GAP` frames keeps
            its approach's offset.
        dead_zone: no move while the paddle (led by its velocity) is within this many pixels of its target.
        seed: seed of the offset draws (an int or a sequence of ints, as :func:`numpy.random.default_rng` takes;
            used only with a range).
    Attributes:
        offsets: float64 ``(N,)``, each env's current offset.
    Raises:
        ValueError: ``action_meanings`` lacks an action, ``num_envs`` not an integer ≥ 1, ``offset`` not a finite
            number or a ``(low, high)`` pair of finite numbers with ``low ≤ high``, or ``dead_zone`` < 0.
    """

    def __init__(self, action_meanings: list[str], num_envs: int, *, offset: float | tuple[float, float] = 1.0,
                 dead_zone: float = 1.0, seed: int | list[int] = 0) -> None:
        self.noop, self.up, self.down = paddle_actions(action_meanings)
        if not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
            raise ValueError(f"num_envs: expected an integer ≥ 1, got {num_envs!r}")
        bad = ValueError(f"offset: expected a finite number of pixels or a (low, high) pair with low ≤ high, got "
                         f"{offset!r}")
        if isinstance(offset, (bool, str)):
            raise bad
        try:
            bounds = np.asarray(offset, np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise bad from None
        if bounds.size == 1:
            bounds = np.repeat(bounds, 2)
        if bounds.size != 2 or not np.isfinite(bounds).all() or bounds[0] > bounds[1]:
            raise bad
        if not dead_zone >= 0:
            raise ValueError(f"dead_zone: expected ≥ 0 pixels, got {dead_zone}")
        self.offset_range, self.dead_zone = (float(bounds[0]), float(bounds[1])), float(dead_zone)
        self.rng = np.random.default_rng(seed)
        self.offsets = self._draw(num_envs)
        self.prev_ball = np.full((num_envs, 2), np.nan)
        self.prev_paddle = np.full(num_envs, np.nan)
        self.coming = np.zeros(num_envs, bool)
        self.unseen = np.zeros(num_envs, np.int64)  # frames since the ball was last seen

    def _draw(self, n: int) -> np.ndarray:
        low, high = self.offset_range
        return np.full(n, low) if low == high else self.rng.uniform(low, high, n)

    def act(self, frames: np.ndarray) -> np.ndarray:
        """Actions int64 ``(N,)`` for the current uint8 frames ``(N, 3, 64, 64)``; ``NOOP`` where the paddle is
        not found. Call :meth:`episode_ended` for envs whose episode ended before their next frame.

        Raises:
            ValueError: ``frames`` not ``(N, 3, 64, 64)`` uint8 for this player's ``N``.
        """
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[0] != len(self.prev_paddle):
            raise ValueError(f"frames: expected uint8 ({len(self.prev_paddle)}, 3, 64, 64), got {frames.dtype} "
                             f"{frames.shape}")
        objs = locate_pong_objects(frames)
        ball, paddle = objs.ball, objs.agent_y
        velocity = ball - self.prev_ball  # NaN where either frame lacks the ball
        target = intercept_rows(ball[:, 0], ball[:, 1], velocity[:, 0], velocity[:, 1])
        target = np.where(np.isnan(velocity[:, 1]), ball[:, 0], target)  # first sight: the ball's row
        target = np.where(np.isnan(ball[:, 0]), CENTRE_ROW, target)  # no ball: wait in the centre
        v_col = velocity[:, 1]
        # no velocity (the ball unseen now or a frame ago): the approach goes on through a short gap
        coming = np.where(np.isnan(v_col), self.coming & (self.unseen < APPROACH_GAP), v_col > 0.1)
        new = coming & ~self.coming  # a ball starts coming: a new offset
        if new.any():
            self.offsets[new] = self._draw(int(new.sum()))
        lead = np.nan_to_num(paddle - self.prev_paddle)
        diff = paddle + lead - (target + self.offsets)
        out = np.full(len(frames), self.noop, np.int64)
        out[diff > self.dead_zone] = self.up
        out[diff < -self.dead_zone] = self.down
        self.prev_ball, self.prev_paddle, self.coming = ball, paddle, coming
        self.unseen = np.where(np.isnan(ball[:, 0]), self.unseen + 1, 0)
        return out

    def episode_ended(self, done: np.ndarray) -> None:
        """Forget the previous frame of the envs where ``done`` (bool ``(N,)``) is True.

        Raises:
            ValueError: ``done`` not a bool array of shape ``(N,)``.
        """
        done = np.asarray(done)
        if done.dtype != bool or done.shape != self.prev_paddle.shape:
            raise ValueError(f"done: expected bool {self.prev_paddle.shape}, got {done.dtype} {done.shape}")
        self.prev_ball[done] = np.nan
        self.prev_paddle[done] = np.nan
        self.coming[done] = False
        self.unseen[done] = 0
