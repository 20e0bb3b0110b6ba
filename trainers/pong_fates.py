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
import torch

from trainers.pong_objects import ball_reversals, locate_pong_objects

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


LOST_BALL_COLS = (10.0, 60.0)  # from past the opponent's paddle to past the agent's: the real ball stays in view


class LostBallRule:
    """Pong's object permanence as a rule for :meth:`~dit_envs.envs.imagination.ImaginationCore.set_resample_rule`
    (``ditwm train-agent --keep-ball R``): an imagined step is rejected when the ball, seen in columns
    :data:`LOST_BALL_COLS` of the last frame, is nowhere in the next and no point was scored; with
    ``phantom_returns`` also when the ball turns round at the agent's side (moving right, then left, at a column
    ≥ :data:`RETURN_COL`) with the agent's paddle more than :data:`PHANTOM_GAP` pixels from it, or not in view.

    On the real game the ball is lost so in 8 of 9 330 frames of a trained agent's play that show it there (0.09 %;
    ``ppo1_best``, 32 games × 400 steps, measured 2026-12-06; a ball that passes the paddle stays in view until its
    point is scored). In the DiT's imagination of such play it happens in 26 % of the frames with the ball in
    columns 10–52: the model loses the ball, and a policy trained there learns to steer into the states where it
    does, where no point is lost.

    Args:
        decode: ``latents float (n, d_z) -> uint8 frames (n, 3, 64, 64)`` (the world model's ``decode``).
        phantom_returns: also reject returns without the paddle.
    Returns (call with ``history float (n, K, d_z)``, ``next_z (n, d_z)``, ``reward (n,)``, ``terminated (n,)``):
        bool numpy ``(n,)``: True where the step loses the ball (or makes a phantom return). A step with
        ``|reward| >= 0.5`` scores a point and is never rejected (the head's events are 0 / ±1; an RSSM's expected
        reward is small but not 0 between points).
    Raises (call):
        ValueError: ``phantom_returns`` with a context of fewer than 2 latents (``history.shape[1] < 2``).
    """

    def __init__(self, decode, phantom_returns: bool = False) -> None:
        self.decode, self.phantom_returns = decode, phantom_returns

    def __call__(self, history, next_z, reward, terminated) -> np.ndarray:
        n, k = len(history), 2 if self.phantom_returns else 1
        if history.shape[1] < k:
            raise ValueError(f"history: expected at least 2 latents per env for phantom returns, got "
                             f"{history.shape[1]}")
        # The core checks the R candidates of a rejected env against R copies of its history: decode each once.
        rows, inverse = torch.unique(history[:, -k:].reshape(n, -1), dim=0, return_inverse=True)
        seen = locate_pong_objects(self.decode(rows.reshape(len(rows) * k, -1)).cpu().numpy())
        ball = seen.ball.reshape(len(rows), k, 2)[inverse.cpu().numpy()]
        paddle = seen.agent_y.reshape(len(rows), k)[inverse.cpu().numpy(), -1]
        before = ball[:, -1, 1]
        quiet = (np.abs(np.asarray(reward.float().cpu())) < 0.5) & ~np.asarray(terminated.cpu())
        with np.errstate(invalid="ignore"):
            inside = (before >= LOST_BALL_COLS[0]) & (before <= LOST_BALL_COLS[1])
            coming = (before > ball[:, 0, 1]) & (before >= RETURN_COL) if self.phantom_returns else np.zeros(n, bool)
            far = ~(np.abs(ball[:, -1, 0] - paddle) <= PHANTOM_GAP)  # NaN (no paddle) counts as far
        check = quiet & (inside | (coming & far))
        out = np.zeros(n, bool)
        if check.any():  # decode only the next frames that could break the rule
            sel = np.flatnonzero(check)
            after = locate_pong_objects(self.decode(next_z[sel]).cpu().numpy()).ball[:, 1]
            with np.errstate(invalid="ignore"):
                out[sel] = (inside[sel] & np.isnan(after)) | (coming[sel] & far[sel] & (after < before[sel]))
        return out


def keep_ball(envs, max_resamples: int, lost_ball_reward: float | None = None,
              phantom_returns: bool = False, truncate_lost: bool = False, rejection_penalty: float = 0.0) -> None:
    """Attach :class:`LostBallRule` to a Pong imagination vector env (``envs.unwrapped.core``), drawing a step
    that loses the ball up to ``max_resamples`` times (0: off); ``lost_ball_reward`` (e.g. -1, a point lost) is
    the reward of a step the rule rejects in every draw (None: the model's own); ``phantom_returns``: also
    reject returns without the paddle (:class:`LostBallRule`), so a phantom return rejected in every draw gets
    ``lost_ball_reward`` too; ``truncate_lost``: such a step is undone and ends the imagined episode as a
    truncation (``ImaginationCore.set_resample_rule``'s ``truncate_rejected``); ``rejection_penalty`` is subtracted
    from the reward of every step whose first draw the rule rejects, on top of ``lost_ball_reward`` (MOPO-style).

    Raises:
        ValueError: not an imagination env (with any option set), not a Pong model (with ``max_resamples`` >= 1),
            ``max_resamples`` not an integer >= 0, a non-finite ``lost_ball_reward``, a ``rejection_penalty`` that is
            not a finite number >= 0, or ``lost_ball_reward`` / ``phantom_returns`` / ``truncate_lost`` /
            ``rejection_penalty`` without ``max_resamples`` >= 1; each message starts with the parameter's name.
    """
    core = getattr(envs.unwrapped, "core", None)
    if not (max_resamples or lost_ball_reward is not None or phantom_returns or truncate_lost or rejection_penalty
            or core is not None):
        return  # off, and nothing to switch off
    if core is None or not hasattr(core, "set_resample_rule"):
        raise ValueError(f"envs: expected an imagination env, got {type(envs.unwrapped).__name__}")
    if isinstance(max_resamples, bool) or not isinstance(max_resamples, (int, np.integer)) or max_resamples < 0:
        raise ValueError(f"max_resamples: expected an integer >= 0, got {max_resamples!r}")
    game = core.bundle.config.get("game")
    if max_resamples and game != "Pong":
        raise ValueError(f"max_resamples: expected 0 for a world model of another game than Pong, got "
                         f"{max_resamples} for game {game!r}")
    if lost_ball_reward is not None and not np.isfinite(lost_ball_reward):
        raise ValueError(f"lost_ball_reward: expected a finite number, got {lost_ball_reward!r}")
    if not isinstance(truncate_lost, (bool, np.bool_)):  # checked here too, to name this function's parameter
        raise ValueError(f"truncate_lost: expected a bool, got {truncate_lost!r}")
    for name, value in (("lost_ball_reward", lost_ball_reward is not None), ("phantom_returns", phantom_returns),
                        ("truncate_lost", truncate_lost), ("rejection_penalty", rejection_penalty)):
        if value and not max_resamples:
            raise ValueError(f"{name}: expected it only with max_resamples >= 1, got max_resamples {max_resamples}")
    rule = LostBallRule(core.model.decode, phantom_returns) if max_resamples else None
    core.set_resample_rule(rule, max_resamples, lost_ball_reward, truncate_lost, rejection_penalty)
