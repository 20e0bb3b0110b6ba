"""Prioritised window sampling for stage-2 training: by error (prioritised experience replay, Schaul et al. 2016)
or by reward event (:func:`event_probabilities`, class-balanced by reward sign), or by any flagged row
(:func:`flag_probabilities`, e.g. Pong's returns of the ball).

Rare dynamics are rare in an episode store: in our stage-1 Pong store the agent's paddle returns the ball in under
1 % of the windows, and a DiT trained on uniform windows learns that the ball passes through the paddle. Like
prioritised replay, ``ditwm pretrain --priority-fraction f`` draws a fraction ``f`` of every batch with
probability proportional to ``error^α``, where ``error`` is the model's own one-step error on the window, and the
rest uniformly (so every window keeps a floor probability and the bias towards hard windows stays bounded; no
importance weights, as the aim is to learn the rare transitions, not an unbiased average).

The error of the window starting at row ``s`` is the mean squared error, in standardised latent units, of the EMA
model's one-step sample of row ``s + K`` from the clean real context ``s .. s+K−1`` and the real action: the
prediction the flow term trains. It is recomputed for every window every ``--priority-every`` steps.
"""
from __future__ import annotations

import numpy as np
import torch

from dit_envs.models.dit import DiT


@torch.no_grad()
def one_step_errors(dit: DiT, x: torch.Tensor, prev_action: torch.Tensor, starts: np.ndarray, *, context_len: int,
                    sampling_steps: int, clamp, seed: int, batch: int = 4096) -> np.ndarray:
    """One-step prediction error of every window.

    Args:
        dit: the model (evaluated without gradient, in its current mode).
        x: float ``(R, d_z)`` standardised latents of every row; prev_action: int64 ``(R,)`` (null = num_actions).
        starts: int64 ``(N,)`` window starts; rows ``s .. s+K`` must lie in one episode.
        context_len: ``K``. sampling_steps: Euler steps of the sample.
        clamp: standardised ``(B, d_z)`` → standardised, as inference maps a sample into the encoder's range.
        seed: seed of the sampler's noise (the same seed gives the same errors).
        batch: windows per forward pass.
    Returns:
        float64 ``(N,)`` mean squared error per window.
    """
    K, dev = context_len, x.device
    gen = torch.Generator(device=dev).manual_seed(seed)
    out = np.empty(len(starts), np.float64)
    offsets = torch.arange(K + 1, device=dev)
    for i in range(0, len(starts), batch):
        rows = torch.from_numpy(starts[i:i + batch]).to(dev)[:, None] + offsets  # (B, K+1)
        ctx, target = x[rows[:, :K]].float(), x[rows[:, K]].float()  # (B, K, d_z), (B, d_z)
        cache = dit.context_cache(ctx, prev_action[rows[:, :K]])
        noise = torch.randn(target.shape, generator=gen, device=dev)
        pred = clamp(dit.sample_next(noise, prev_action[rows[:, K]], cache, sampling_steps,
                                     x_prev=ctx[:, -1]))  # (B, d_z)
        out[i:i + batch] = ((pred - target) ** 2).mean(dim=1).double().cpu().numpy()
    return out


def priority_probabilities(errors: np.ndarray, alpha: float) -> np.ndarray:
    """Sampling probabilities ``∝ (error + ε)^α`` (``ε = 1e-3·mean error`` keeps every window drawable).

    Args:
        errors: float ``(N,)`` non-negative window errors. alpha: ``α ≥ 0`` (0 = uniform).
    Returns:
        float64 ``(N,)`` summing to 1.
    Raises:
        ValueError: empty, negative or non-finite errors, or ``alpha < 0``.
    """
    e = np.asarray(errors, np.float64)
    if e.size == 0 or not np.isfinite(e).all() or (e < 0).any():
        raise ValueError(f"errors: expected a non-empty array of finite numbers >= 0, got {e.size} values "
                         f"(min {e.min() if e.size else None})")
    if alpha < 0:
        raise ValueError(f"alpha: expected >= 0, got {alpha}")
    p = (e + 1e-3 * e.mean() + 1e-12) ** alpha
    return p / p.sum()


def event_probabilities(reward: np.ndarray, episode: np.ndarray, starts: np.ndarray, *, first_target: int,
                        length: int, horizon: int) -> np.ndarray:
    """Sampling probabilities that draw windows ending in or shortly before a reward event, balanced by sign.

    Rewards are rare and one sign rarer still (our Pong stores: one point won for every 8 to 56 lost), and a model
    trained on uniform windows learns that the rare event never happens: from real contexts 3 steps before a
    point won, a DiT fine-tuned on 500k rows imagined the point in 2 % of rollouts (the point lost: 42 %). A window
    starting at row ``s`` is an event window of sign ``σ`` when a row in ``[s + first_target, s + length − 1 +
    horizon]`` of the same episode has a reward of sign ``σ`` (the window predicts the event or the approach to
    it). Each sign present gets the same total mass, spread uniformly over its windows (a window with both signs
    gets both shares), as in class-balanced sampling (Cui et al. 2019; Kang et al. 2020).

    Args:
        reward: float ``(R,)`` reward of the transition reaching each row; episode: int ``(R,)``; rows sorted by
            episode then step.
        starts: int64 ``(N,)`` window starts (:meth:`SequenceSampler.all_window_starts`).
        first_target: offset of the window's first predicted row (``K``); length: ``L`` rows per window.
        horizon: ``h ≥ 0`` extra rows after the window in which an event still counts.
    Returns:
        float64 ``(N,)`` summing to 1.
    Raises:
        ValueError: ``first_target``/``length``/``horizon`` out of range, or no window near any reward event.
    """
    reward = np.asarray(reward)
    masks = [m for m in (flagged_windows(np.sign(reward) == sign, episode, starts, first_target=first_target,
                                         length=length, horizon=horizon) for sign in (1, -1)) if m.any()]
    if not masks:
        raise ValueError("reward: expected at least one reward event within reach of a window, got none")
    probs = np.zeros(len(masks[0]), np.float64)
    for mask in masks:
        probs[mask] += 1.0 / (len(masks) * mask.sum())
    return probs


def flagged_windows(flags: np.ndarray, episode: np.ndarray, starts: np.ndarray, *, first_target: int, length: int,
                    horizon: int) -> np.ndarray:
    """Which windows predict a flagged row or lead to one: the window starting at row ``s`` is flagged when a row
    in ``[s + first_target, s + length − 1 + horizon]`` of the same episode run is.

    Args:
        flags: bool ``(R,)`` per row; episode: int ``(R,)``; rows sorted by episode then step.
        starts: int64 ``(N,)`` window starts. first_target, length, horizon: as for :func:`event_probabilities`.
    Returns:
        bool ``(N,)``.
    Raises:
        ValueError: ``first_target``/``length``/``horizon`` out of range, or ``flags``/``episode`` lengths differ.
    """
    if not 0 <= first_target < length or horizon < 0:
        raise ValueError(f"first_target, length, horizon: expected 0 <= first_target < length and horizon >= 0, got "
                         f"{first_target}, {length}, {horizon}")
    flags, episode = np.asarray(flags, bool), np.asarray(episode)
    if len(flags) != len(episode):
        raise ValueError(f"flags: expected {len(episode)} rows (one per episode row), got {len(flags)}")
    R, starts = len(flags), np.asarray(starts, np.int64)
    bounds = np.concatenate([np.flatnonzero(episode[1:] != episode[:-1]) + 1, [R]])  # end of each episode run
    run_end = bounds[np.searchsorted(bounds, starts, side="right")]  # (N,) first row after the window's episode
    cum = np.concatenate([[0], np.cumsum(flags)])  # flagged rows in [a, b) = cum[b] − cum[a]
    lo = starts + first_target
    hi = np.minimum(starts + length + horizon, run_end)
    return cum[hi] - cum[np.minimum(lo, hi)] > 0


def flag_probabilities(flags: np.ndarray, episode: np.ndarray, starts: np.ndarray, *, first_target: int,
                       length: int, horizon: int, name: str = "flags") -> np.ndarray:
    """Sampling probabilities uniform over the windows :func:`flagged_windows` marks, zero elsewhere — e.g. the
    windows around a return of the ball by the agent's paddle (:func:`trainers.pong_objects.agent_return_rows`),
    which a stage-1 Pong store holds in under 1 % of its windows.

    Returns:
        float64 ``(N,)`` summing to 1.
    Raises:
        ValueError: as :func:`flagged_windows`, or no flagged window (the message names ``name``).
    """
    mask = flagged_windows(flags, episode, starts, first_target=first_target, length=length, horizon=horizon)
    if not mask.any():
        raise ValueError(f"{name}: expected at least one flagged row within reach of a window, got none")
    return mask / mask.sum()


def lift(probs: np.ndarray, flags: np.ndarray) -> float:
    """How many times more often windows with ``flags`` (bool ``(N,)``) are drawn under ``probs`` than uniformly."""
    flags = np.asarray(flags, bool)
    return float(probs[flags].sum() / flags.mean()) if flags.any() else float("nan")
