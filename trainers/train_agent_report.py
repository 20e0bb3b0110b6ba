"""Curves of a ``ditwm train-agent`` run: real-game and imagined returns against actor-critic updates (PNG)."""
from __future__ import annotations

import io
import os
from pathlib import Path


def plot_curves(history: list[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Draw the evaluation records of a run and write the PNG atomically.

    Args:
        history: records with ``updates``, ``eval_return_mean``, ``eval_return_std``, and
            ``imagined_return_mean`` when an imagined episode ended in that interval (else the point is skipped),
            as written by :mod:`trainers.train_agent`.
        path: destination ``.png``. title: figure title.
    Returns:
        ``Path(path)``.
    Raises:
        KeyError: a record without one of the fields above.
    """
    import matplotlib

    matplotlib.use("Agg")  # headless: no display needed
    import matplotlib.pyplot as plt

    from dit_envs.io import atomic_write_bytes

    x = [r["updates"] for r in history]
    mean = [r["eval_return_mean"] for r in history]
    std = [r["eval_return_std"] for r in history]
    imag = [(u, r["imagined_return_mean"]) for u, r in zip(x, history) if r.get("imagined_return_mean") is not None]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(x, mean, "o-", color="tab:blue", label="real game (greedy)")
    ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], color="tab:blue",
                    alpha=0.2)
    if imag:
        ax.plot([u for u, _ in imag], [v for _, v in imag], "s--", color="tab:orange",
                label="imagination (sampled, episodes ended in the interval)")
    ax.set_xlabel("actor-critic updates")
    ax.set_ylabel("undiscounted episode return")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
