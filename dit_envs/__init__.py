"""DiT-WM runtime: world models served as Gymnasium environments, and the real game under the same protocol.

Importing is cheap: heavy modules load on first use.
"""
from __future__ import annotations

from typing import Any

__all__ = ["make_real_env"]


def make_real_env(*args: Any, **kwargs: Any):
    """The real game as a natively batched vector env; see :func:`dit_envs.envs.real.make_real_env`."""
    from dit_envs.envs.real import make_real_env as _make

    return _make(*args, **kwargs)
