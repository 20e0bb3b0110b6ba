"""Colour-based locator of Pong's ball and paddles in 64×64 protocol frames (DESIGN.md §4 fidelity metrics).

Pong's play field spans rows 10–58 of the 64×64 frame (white walls at rows 8–9 and 59–63; the score sits above
row 8 in the paddles' colours, so it is excluded). The agent's paddle is green (92, 186, 92) near column 56, the
opponent's orange (213, 130, 74) near column 7, the ball white (236, 236, 236). Resizing blends edges with the
brown background (144, 72, 17), so each object is a soft mask and its position the mask's centroid.

Row 10, the field's top row, is the wall's resize blend (177, 131, 96). It passes the orange rule, so there the
opponent's paddle needs r > 190 (the paddle's own red is 213); where the agent's paddle touches the wall the
blend turns bluish (up to b = 144) and would pass for the ball, so there the ball needs b > 150 (a ball half
over the row gives b ≈ 166).

A mask larger than any real object (:data:`MAX_BALL_PIXELS`, :data:`MAX_PADDLE_PIXELS`; real frames give ≤ 3
ball and ≤ 20 paddle pixels) is not an object but a smear, e.g. a blurry or grey imagined frame, and counts
as not visible.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FIELD_TOP, FIELD_BOTTOM = 10, 59  # rows [10, 59): inside the walls
CENTRE_ROW = 34.0  # the field's middle row, where a scripted player waits while no ball is visible
TOP_ROW_BALL_BLUE = 150  # ball threshold on blue in the wall-blend row FIELD_TOP (elsewhere 100)
TOP_ROW_ORANGE_RED = 190  # opponent-paddle threshold on red in the wall-blend row (elsewhere 170)
MAX_BALL_PIXELS = 8
MAX_PADDLE_PIXELS = 24


@dataclass
class PongObjects:
    """Object positions for ``N`` frames, in pixels of the 64×64 frame (row, col); NaN where not visible.

    Attributes:
        ball: float64 ``(N, 2)`` (row, col) centroid of the ball.
        agent_y: float64 ``(N,)`` row of the agent's (right, green) paddle centre.
        opponent_y: float64 ``(N,)`` row of the opponent's (left, orange) paddle centre.
    """

    ball: np.ndarray
    agent_y: np.ndarray
    opponent_y: np.ndarray


def _centroid_rows(mask: np.ndarray, max_pixels: int | None = None) -> np.ndarray:
    """mask ``(N, H, W)`` bool → mean row of True pixels ``(N,)`` (NaN where empty or over ``max_pixels``)."""
    rows = np.arange(mask.shape[1], dtype=np.float64)[None, :, None]
    count = mask.sum(axis=(1, 2))
    ok = (count > 0) if max_pixels is None else (count > 0) & (count <= max_pixels)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, (mask * rows).sum(axis=(1, 2)) / np.maximum(count, 1), np.nan)


def locate_pong_objects(frames: np.ndarray) -> PongObjects:
    """Locate ball and paddles in uint8 frames ``(N, 3, 64, 64)`` (or one frame ``(3, 64, 64)``).

    Raises:
        ValueError: ``frames`` not of shape ``(N, 3, 64, 64)`` / ``(3, 64, 64)`` or not uint8.
    """
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[1:] != (3, 64, 64) or frames.dtype != np.uint8:
        raise ValueError(f"frames: expected uint8 (N, 3, 64, 64), got {frames.dtype} {frames.shape}")
    f = frames[:, :, FIELD_TOP:FIELD_BOTTOM].astype(np.int16)  # (N, 3, 49, 64)
    r, g, b = f[:, 0], f[:, 1], f[:, 2]
    cols = np.arange(64)[None, None, :]
    green = (g - r > 40) & (cols >= 48)
    orange = (r > 170) & (g > 95) & (g < 160) & (b < 110) & (cols <= 16)
    orange[:, 0] &= r[:, 0] > TOP_ROW_ORANGE_RED  # the wall blend of the top row is not the paddle
    ball = (b > 100) & ~(g - r > 40) & ~orange
    ball[:, 0] &= b[:, 0] > TOP_ROW_BALL_BLUE  # paddle/wall blends in the top row are not the ball
    agent_y = _centroid_rows(green, MAX_PADDLE_PIXELS) + FIELD_TOP
    opponent_y = _centroid_rows(orange, MAX_PADDLE_PIXELS) + FIELD_TOP
    ball_row = _centroid_rows(ball, MAX_BALL_PIXELS) + FIELD_TOP
    ball_col = _centroid_rows(ball.transpose(0, 2, 1), MAX_BALL_PIXELS)
    return PongObjects(ball=np.stack([ball_row, ball_col], axis=1), agent_y=agent_y, opponent_y=opponent_y)


def ball_reversals(ball_col: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where the ball turns round: at the agent's side (moving right, then left — a return by the agent's paddle)
    and at the opponent's side (moving left, then right).

    Args:
        ball_col: float ``(T,)`` ball column per consecutive frame of one episode (NaN where not visible).
    Returns:
        ``(agent, opponent)`` bool ``(T,)``: frame ``i`` is the apex, i.e. frames ``i−1, i, i+1`` all show the ball
        and its column rises then falls (agent) or falls then rises (opponent).
    Raises:
        ValueError: ``ball_col`` not one-dimensional.
    """
    c = np.asarray(ball_col, np.float64)
    if c.ndim != 1:
        raise ValueError(f"ball_col: expected shape (T,), got {c.shape}")
    agent, opponent = np.zeros(len(c), bool), np.zeros(len(c), bool)
    if len(c) >= 3:
        prev, mid, nxt = c[:-2], c[1:-1], c[2:]
        with np.errstate(invalid="ignore"):
            agent[1:-1] = (mid > prev) & (nxt < mid)
            opponent[1:-1] = (mid < prev) & (nxt > mid)
    return agent, opponent


def ball_columns(frames: np.ndarray, chunk: int = 20000) -> np.ndarray:
    """The ball's column per frame: float64 ``(R,)`` (NaN where not visible) of uint8 ``(R, 3, 64, 64)`` frames,
    located ``chunk`` frames at a time (bounds the masks' memory)."""
    parts = [locate_pong_objects(frames[i:i + chunk]).ball[:, 1] for i in range(0, len(frames), chunk)]
    return np.concatenate(parts) if parts else np.zeros(0)


def store_ball_columns(store) -> tuple[np.ndarray, np.ndarray]:
    """``(episode int64 (R,), ball column float64 (R,))`` of the readable rows of a
    :class:`~trainers.data.EpisodeStore`, sorted by episode then step as :meth:`~trainers.data.EpisodeStore.load`
    sorts them, located one chunk at a time: memory of one chunk's frames, not the whole store's."""
    parts = [(p["episode"], p["step"], ball_columns(p["obs"]))
             for p in map(store.read_chunk, store.chunk_paths()) if p is not None]
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0)
    episode, step, col = (np.concatenate(x) for x in zip(*parts))
    order = np.lexsort((step, episode))
    return episode[order], col[order]


def agent_return_rows(ball_col: np.ndarray, episode: np.ndarray) -> np.ndarray:
    """Rows where the agent's paddle returns the ball: the apex of :func:`ball_reversals` on the agent's side,
    found within each episode run (a reversal never spans two episodes).

    Args:
        ball_col: float ``(R,)`` ball column per row (:func:`ball_columns`), rows sorted by episode then step.
        episode: int ``(R,)`` episode id per row.
    Returns:
        bool ``(R,)``.
    Raises:
        ValueError: ``ball_col`` and ``episode`` of different lengths.
    """
    episode = np.asarray(episode)
    if len(ball_col) != len(episode):
        raise ValueError(f"episode: expected {len(ball_col)} rows (one per ball column), got {len(episode)}")
    out = ball_reversals(ball_col)[0]
    same = episode[1:] == episode[:-1]  # an apex needs its neighbours in its own episode
    out[1:] &= same
    out[:-1] &= same
    return out


def paddle_actions(action_meanings: list[str]) -> tuple[int, int, int]:
    """Indices of Pong's ``NOOP``, ``RIGHT`` (paddle up) and ``LEFT`` (paddle down) in ``action_meanings``.

    Raises:
        ValueError: ``action_meanings`` lacks one of them.
    """
    try:
        return tuple(list(action_meanings).index(n) for n in ("NOOP", "RIGHT", "LEFT"))
    except ValueError:
        raise ValueError(f"action_meanings: expected NOOP, RIGHT and LEFT (Pong), got {action_meanings}") from None


def track_actions(frames: np.ndarray, action_meanings: list[str], rng: np.random.Generator) -> np.ndarray:
    """Ball-tracking Pong actions for uint8 frames ``(N, 3, 64, 64)`` → int64 ``(N,)``.

    Moves the agent paddle (right, green) up (``RIGHT``) or down (``LEFT``) towards the ball's row, or towards the
    field's centre while no ball is visible; ``NOOP`` within 2 px. A random action where the paddle is not found.

    Raises:
        ValueError: ``action_meanings`` lacks ``NOOP``, ``RIGHT`` or ``LEFT``.
    """
    noop, up, down = paddle_actions(action_meanings)
    objs = locate_pong_objects(frames)
    target = np.where(np.isnan(objs.ball[:, 0]), CENTRE_ROW, objs.ball[:, 0])
    diff = objs.agent_y - target
    out = np.full(len(frames), noop, np.int64)
    out[diff > 2] = up
    out[diff < -2] = down
    lost = np.isnan(objs.agent_y)
    out[lost] = rng.integers(0, len(action_meanings), int(lost.sum()))
    return out
