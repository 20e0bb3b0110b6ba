"""Rectified flow (Liu et al. 2022; Lipman et al. 2023) with the conventions of DESIGN.md §2.

* ``t = 0`` is data, ``t = 1`` is noise, ``x_t = (1 − t)·x0 + t·ε`` with ``ε ~ N(0, I)``.
* The network predicts the velocity ``v = dx_t/dt = ε − x0``; the loss is its mean squared error.
* Training times are logit-normal, ``t = sigmoid(m + s·n)``, ``n ~ N(0, 1)`` (SD3, Esser et al. 2024, §3.1).
* One sampler, :func:`sample`, Euler-integrates ``dx/dt = v`` along any decreasing list of times from 1 to 0,
  so 1, 2, 4 or 32 steps (and distilled few-step students) share it.

Times may have any shape that broadcasts against the leading dims of ``x`` (``(B,)`` per sample, ``(B, T)`` per
token for diffusion forcing, Chen et al. 2024).
"""
from __future__ import annotations

import math

from typing import Callable, Sequence

import torch


def logit_normal_times(
    shape: Sequence[int] | torch.Size,
    *,
    mean: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Draw training times ``t = sigmoid(mean + std·n)``, ``n ~ N(0, 1)`` (SD3 logit-normal sampling).

    Args:
        shape: output shape, e.g. ``(B,)`` or ``(B, T)``.
        mean, std: location and scale in logit space (SD3 default 0, 1).
        generator: RNG on ``device`` (None: torch's global RNG).
        device: where to create the tensor.
    Returns:
        float32 tensor of ``shape`` with values in ``(0, 1)``.
    """
    n = torch.randn(tuple(shape), generator=generator, device=device, dtype=torch.float32)
    return torch.sigmoid(mean + std * n)


def _expand(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Append singleton dims so that ``t`` (leading dims of ``x``) broadcasts against ``x``."""
    return t.reshape(*t.shape, *([1] * (x.ndim - t.ndim))).to(x.dtype)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 − t)·x0 + t·noise``; ``t`` has the leading dims of ``x0`` (or is a scalar). Shape of ``x0``."""
    t = _expand(torch.as_tensor(t, device=x0.device), x0)
    return (1.0 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The regression target ``v = noise − x0`` (same shape as ``x0``)."""
    return noise - x0


def flow_matching_loss(
    velocity: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rectified-flow loss ``mean ‖velocity − (noise − x0)‖²``.

    Args:
        velocity: network output, float ``(..., d)``.
        x0: clean data, same shape.
        noise: the flow's ``t = 1`` end used to build ``x_t`` (``ε``, or any other source), same shape.
        mask: optional bool/float of the leading dims ``(...)``; only masked-in positions count (e.g. the
            padded steps of a sequence), averaged over them.
        weight: optional non-negative float per element, same shape as ``velocity``: each position's error is
            then the weighted mean ``Σ w·e / Σ w`` over the last dim instead of the plain mean.
    Returns:
        Scalar float32 tensor, mean over elements (and over the last dim).
    """
    se = (velocity.float() - velocity_target(x0, noise).float()).square()  # (..., d)
    if weight is None:
        err = se.mean(-1)  # (...)
    else:
        w = weight.float()
        err = (se * w).sum(-1) / w.sum(-1).clamp(min=1e-12)  # (...)
    if mask is None:
        return err.mean()
    m = mask.to(err.dtype)
    return (err * m).sum() / m.sum().clamp(min=1.0)


def uniform_times(steps: int, shift: float = 1.0) -> list[float]:
    """Decreasing sampling times ``[1, …, 0]`` for ``steps`` Euler steps.

    With ``shift = s ≠ 1`` each uniform time ``u`` is mapped to ``s·u / (1 + (s − 1)·u)`` (SD3's resolution
    shift; ``s > 1`` spends more steps at high noise).

    Args:
        steps: number of Euler steps ≥ 1 (the list has ``steps + 1`` entries).
        shift: time shift ``s > 0``.
    Raises:
        ValueError: ``steps < 1`` or ``shift`` not a finite number > 0.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
    if not math.isfinite(shift) or shift <= 0:
        raise ValueError(f"shift: expected a finite number > 0, got {shift}")
    us = [1.0 - i / steps for i in range(steps + 1)]
    inner = [shift * u / (1.0 + (shift - 1.0) * u) for u in us[1:-1]]
    return [1.0, *inner, 0.0]  # the end points exactly: s·1 / (1 + (s − 1)) can round to 1 − 1e-16


def sample(
    velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    times: Sequence[float],
) -> torch.Tensor:
    """Euler-integrate ``dx/dt = velocity_fn(x, t)`` from ``t = times[0] = 1`` (noise) to ``times[-1] = 0``.

    Each step ``x ← x + (t_next − t)·velocity_fn(x, t)``; one step from ``t = 1`` gives ``noise − v``.

    Args:
        velocity_fn: ``(x (N, ...), t float32 (N,)) -> v`` shaped like ``x``.
        noise: ``ε``, float ``(N, ...)``.
        times: strictly decreasing floats from 1.0 to 0.0, e.g. :func:`uniform_times`.
    Returns:
        The sample ``x0``, shape and dtype of ``noise``.
    Raises:
        ValueError: ``times`` has fewer than 2 entries, does not start at 1.0 / end at 0.0, or increases.
    """
    times = [float(t) for t in times]
    if len(times) < 2 or times[0] != 1.0 or times[-1] != 0.0:
        raise ValueError(f"times: expected a list from 1.0 down to 0.0 with >= 2 entries, got {times}")
    if any(not b < a for a, b in zip(times[:-1], times[1:])):  # also refuses NaN
        raise ValueError(f"times: expected strictly decreasing values, got {times}")
    x = noise
    for t_cur, t_next in zip(times[:-1], times[1:]):
        t = torch.full((x.shape[0],), t_cur, device=x.device, dtype=torch.float32)
        x = x + (t_next - t_cur) * velocity_fn(x, t).to(x.dtype)
    return x
