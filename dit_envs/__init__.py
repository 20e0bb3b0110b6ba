"""DiT-WM runtime: learned world models served as Gymnasium environments, and the real game under one protocol.

``import dit_envs`` registers every id of the :mod:`registry` catalog (``DiTWM/Pong-v0``, ...) with Gymnasium,
using string entry points, so importing is cheap: torch models load only when an env is made.

>>> import gymnasium as gym, dit_envs  # doctest: +SKIP
>>> env = gym.make("DiTWM/Pong-v0")                       # single env
>>> envs = gym.make_vec("DiTWM/Pong-v0", num_envs=256)    # one batched model call per step
"""
from __future__ import annotations

from typing import Any

import gymnasium as gym

import registry

__all__ = ["make_real_env", "register_envs"]

SINGLE_ENTRY_POINT = "dit_envs.envs.single:DiTWMEnv"
VECTOR_ENTRY_POINT = "dit_envs.envs.imagination:DiTWMVectorEnv"


def _register_entry(entry: registry.CatalogEntry) -> None:
    """Register (or re-register) one catalog entry with Gymnasium's registry."""
    gym.registry.pop(entry.env_id, None)
    gym.register(id=entry.env_id, entry_point=SINGLE_ENTRY_POINT, vector_entry_point=VECTOR_ENTRY_POINT,
                 max_episode_steps=entry.max_episode_steps, kwargs={"env_id": entry.env_id})


def _unregister_entry(env_id: str) -> None:
    gym.registry.pop(env_id, None)


def register_envs() -> list[str]:
    """Register every catalog entry with Gymnasium (idempotent); returns the registered ids.

    Entries added later with :func:`registry.register` are registered automatically (catalog listener).
    """
    for entry in registry.entries():
        _register_entry(entry)
    return [e.env_id for e in registry.entries()]


def make_real_env(*args: Any, **kwargs: Any):
    """The real game as a natively batched vector env; see :func:`dit_envs.envs.real.make_real_env`."""
    from dit_envs.envs.real import make_real_env as _make

    return _make(*args, **kwargs)


register_envs()
if hasattr(registry, "add_listener"):
    registry.add_listener(on_register=_register_entry, on_unregister=_unregister_entry)
