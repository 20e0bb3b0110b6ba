"""Error-prioritised window sampling for stage-2 training (prioritised experience replay, Schaul et al. 2016).

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
        pred = clamp(dit.sample_next(noise, prev_action[rows[:, K]], cache, sampling_steps))  # (B, d_z)
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


def lift(probs: np.ndarray, flags: np.ndarray) -> float:
    """How many times more often windows with ``flags`` (bool ``(N,)``) are drawn under ``probs`` than uniformly."""
    flags = np.asarray(flags, bool)
    return float(probs[flags].sum() / flags.mean()) if flags.any() else float("nan")
