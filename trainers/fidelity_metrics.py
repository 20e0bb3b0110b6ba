"""Pure metric functions of the fidelity evaluation (DESIGN.md §4), on numpy arrays.

Every function returns plain Python numbers (``None`` where a figure is undefined, e.g. a precision without
predicted events), ready for JSON.
"""
from __future__ import annotations

import math

import numpy as np

MAX_PSNR = 100.0
"""PSNR (dB) reported for a pixel-identical frame (whose PSNR is infinite); ~MSE 6.5e-6 in 0..255 units."""

EVENT_THRESHOLD = 0.5
"""A predicted reward is an event when ``|r| >= EVENT_THRESHOLD`` (Pong's rewards are ±1); a real one when ≠ 0."""


def num(x: float | np.floating | None) -> float | None:
    """A finite float, or None for None/NaN/inf (JSON has no NaN)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def psnr(pred: np.ndarray, real: np.ndarray) -> np.ndarray:
    """Per-frame PSNR in dB of uint8 frames against real frames (peak 255), capped at :data:`MAX_PSNR`.

    Args:
        pred, real: uint8 ``(N, 3, 64, 64)`` (any equal shapes ``(N, ...)``).
    Returns:
        float64 ``(N,)``.
    Raises:
        ValueError: shapes differ.
    """
    if pred.shape != real.shape:
        raise ValueError(f"pred: expected the shape of real {real.shape}, got {pred.shape}")
    err = (pred.astype(np.float64) - real.astype(np.float64)) ** 2
    mse = err.reshape(len(err), -1).mean(1)
    with np.errstate(divide="ignore"):
        out = 10.0 * np.log10(255.0**2 / mse)
    return np.minimum(out, MAX_PSNR)


def position_stats(pred: np.ndarray, real: np.ndarray) -> dict[str, float | int | None]:
    """Localisation error of one object over frames, positions in pixels with NaN where not visible.

    The error of a frame is the Euclidean distance of the positions (row, col), or the absolute row difference
    for paddles. Only frames where the object is visible in the real frame count; among them a frame whose
    prediction shows no object is a *miss* (counted in ``miss_rate`` only), the others give the error figures.

    Args:
        pred, real: float ``(N, 2)`` (row, col) or ``(N,)`` (row), NaN = not visible.
    Returns:
        ``visible`` (real frames showing the object), ``miss_rate`` (misses / visible), ``ghost_rate``
        (predictions showing the object where the real frame has none / real frames without it),
        ``median_px``, ``within_2px``, ``within_3px`` (fractions of the visible, non-missed frames).
    Raises:
        ValueError: shapes differ.
    """
    if pred.shape != real.shape:
        raise ValueError(f"pred: expected the shape of real {real.shape}, got {pred.shape}")
    p, r = pred.reshape(len(pred), -1), real.reshape(len(real), -1)
    vis_r, vis_p = ~np.isnan(r).any(1), ~np.isnan(p).any(1)
    both = vis_r & vis_p
    err = np.sqrt(((p[both] - r[both]) ** 2).sum(1))
    n_vis, n_hidden = int(vis_r.sum()), int((~vis_r).sum())
    return {
        "visible": n_vis,
        "miss_rate": num((vis_r & ~vis_p).sum() / n_vis) if n_vis else None,
        "ghost_rate": num((~vis_r & vis_p).sum() / n_hidden) if n_hidden else None,
        "median_px": num(np.median(err)) if len(err) else None,
        "within_2px": num((err <= 2.0).mean()) if len(err) else None,
        "within_3px": num((err <= 3.0).mean()) if len(err) else None,
    }


def reward_event_stats(pred: np.ndarray, real: np.ndarray) -> dict[str, float | int | None]:
    """Precision/recall of reward events, matched at the same context and step with the same sign.

    Args:
        pred: float ``(N, T)`` predicted rewards (event: ``|r| >= EVENT_THRESHOLD``).
        real: float ``(N, T)`` real rewards (event: ``r != 0``).
    Returns:
        ``real_events``, ``predicted_events``, ``matched``, ``precision`` (matched / predicted, None without
        predicted events), ``recall`` (matched / real, None without real events).
    Raises:
        ValueError: shapes differ.
    """
    if pred.shape != real.shape:
        raise ValueError(f"pred: expected the shape of real {real.shape}, got {pred.shape}")
    p_sign = np.where(np.abs(pred) >= EVENT_THRESHOLD, np.sign(pred), 0.0)
    r_sign = np.sign(real)
    n_pred, n_real = int((p_sign != 0).sum()), int((r_sign != 0).sum())
    matched = int(((p_sign == r_sign) & (r_sign != 0)).sum())
    return {
        "real_events": n_real,
        "predicted_events": n_pred,
        "matched": matched,
        "precision": matched / n_pred if n_pred else None,
        "recall": matched / n_real if n_real else None,
    }


def sensitivity_stats(y_up: np.ndarray, y_down: np.ndarray, min_px: float = 2.0) -> dict[str, float | int | None]:
    """Action sensitivity from the agent paddle row after constant UP vs constant DOWN (NaN = not found).

    Args:
        y_up, y_down: float ``(N,)`` paddle rows of the final decoded frame of each context's two rollouts.
        min_px: the separation that counts as "apart".
    Returns:
        ``contexts``; ``fraction_apart`` (|Δ| ≥ ``min_px``, over all contexts: a missing paddle counts as not
        apart); ``fraction_correct_direction`` (DOWN's row ≥ UP's + ``min_px``; rows grow downwards);
        ``paddle_missing_rate`` (paddle absent in either frame); ``mean_down_minus_up_px`` (over found pairs).
    Raises:
        ValueError: shapes differ.
    """
    if y_up.shape != y_down.shape:
        raise ValueError(f"y_up: expected the shape of y_down {y_down.shape}, got {y_up.shape}")
    n = len(y_up)
    found = ~np.isnan(y_up) & ~np.isnan(y_down)
    diff = y_down[found] - y_up[found]
    return {
        "contexts": n,
        "fraction_apart": num((np.abs(diff) >= min_px).sum() / n) if n else None,
        "fraction_correct_direction": num((diff >= min_px).sum() / n) if n else None,
        "paddle_missing_rate": num((~found).sum() / n) if n else None,
        "mean_down_minus_up_px": num(diff.mean()) if len(diff) else None,
    }
