"""What happens to the ball at the agent's paddle in closed-loop Pong play, imagined or real
(``python examples/reward_rates.py --fates``).

An agent trained in imagination exploits its world model where the model's ball does something the real ball never
does. Two such failures are counted here from the located objects (:func:`trainers.pong_objects.locate_pong_objects`)
of consecutive frames:

- a **return**: the ball turns round (its column rises, then falls) at the agent's side, in a column ≥
  :data:`RETURN_COL`; a **phantom return** is one with the agent's paddle more than :data:`PHANTOM_GAP` pixels from
  the ball (or not visible): a return without the paddle. On the real game 99 % of returns meet the paddle within
  5.5 px of its centre (803 returns of a trained agent's 100k real steps, measured 2026-12-05), so the gap is set
  above that;
- a **vanished ball**: the ball, moving towards the agent, is seen in columns :data:`VANISH_COLS` and then in none of
  the next :data:`VANISH_FRAMES` frames, with no reward on the way: it neither came back nor cost a point. On the
  real game a ball that passes the paddle is seen up to the field's edge and costs a point.

Frames, rewards and ends are those of a vector env with SAME_STEP autoreset played for ``T`` steps: frame ``t`` is
the observation before step ``t``'s action and ``reward[:, t]`` / ``done[:, t]`` belong to that step (frame ``t + 1``
is the next episode's first after a ``done``), so a pattern that spans a ``done`` is not counted.
"""
from __future__ import annotations

import numpy as np

from trainers.pong_objects import ball_reversals

PHANTOM_GAP = 8.0  # pixels of the 64×64 frame between the ball's row and the paddle's centre at a return
RETURN_COL = 40.0  # a turn of the ball at this column or beyond (the agent's paddle is at 56) is a return
VANISH_COLS = (40.0, 56.0)  # columns where a coming ball may be seen last before it vanishes
VANISH_FRAMES = 3  # frames without the ball after it was seen


def ball_fates(ball: np.ndarray, paddle: np.ndarray, reward: np.ndarray, done: np.ndarray) -> dict[str, int]:
    """Count returns, phantom returns and vanished balls in ``N`` envs' ``T`` consecutive frames.

    Args:
        ball: float ``(N, T, 2)`` ball (row, col) per frame in pixels of the 64×64 frame, NaN where not visible.
        paddle: float ``(N, T)`` the agent's paddle centre row per frame, NaN where not visible.
        reward: float ``(N, T)`` reward of each step (the transition out of frame ``t``).
        done: bool ``(N, T)`` whether the episode ended at step ``t`` (frame ``t + 1`` starts a new one).
    Returns:
        ``{"returns", "phantom_returns", "vanished"}`` counts summed over envs (phantom returns are a subset of
        returns).
    Raises:
        ValueError: shapes that do not match ``(N, T, 2)`` / ``(N, T)``, or ``done`` not bool.
    """
    ball, paddle, reward, done = (np.asarray(x) for x in (ball, paddle, reward, done))
    if ball.ndim != 3 or ball.shape[2] != 2:
        raise ValueError(f"ball: expected shape (N, T, 2), got {ball.shape}")
    for name, x in (("paddle", paddle), ("reward", reward), ("done", done)):
        if x.shape != ball.shape[:2]:
            raise ValueError(f"{name}: expected shape {ball.shape[:2]}, got {x.shape}")
    if done.dtype != bool:
        raise ValueError(f"done: expected bool, got {done.dtype}")
    out = {"returns": 0, "phantom_returns": 0, "vanished": 0}
    n_frames = ball.shape[1]
    for b, p, r, d in zip(ball, paddle, reward, done):
        # episode index of every frame: frame t + 1 starts a new episode after a done at step t
        ep = np.concatenate([[0], np.cumsum(d[:-1])])
        apex = np.flatnonzero(ball_reversals(b[:, 1])[0])
        apex = apex[(ep[apex - 1] == ep[apex]) & (ep[apex + 1] == ep[apex]) & (b[apex, 1] >= RETURN_COL)]
        gap = np.abs(b[apex, 0] - p[apex])
        out["returns"] += len(apex)
        out["phantom_returns"] += int((~(gap <= PHANTOM_GAP)).sum())  # NaN (no paddle) counts as phantom
        col = b[:, 1]
        with np.errstate(invalid="ignore"):
            seen = ~np.isnan(col)
            coming = np.zeros(n_frames, bool)
            coming[1:] = seen[1:] & seen[:-1] & (col[1:] > col[:-1])
            coming &= (col >= VANISH_COLS[0]) & (col <= VANISH_COLS[1])
        for t in np.flatnonzero(coming[1:n_frames - VANISH_FRAMES]) + 1:
            span = slice(t - 1, t + VANISH_FRAMES + 1)
            if ((ep[span] == ep[t]).all() and not seen[t + 1:t + VANISH_FRAMES + 1].any()
                    and not (r[span] != 0).any()):
                out["vanished"] += 1
    return out
