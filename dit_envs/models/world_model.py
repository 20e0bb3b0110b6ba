"""The one world-model interface shared by the RSSM (stage 1) and the DiT (stage 2).

The imagination env, the stage-3 agent trainer and the fidelity evaluator talk to world models only through
this protocol, so they never branch on the model type (DESIGN.md §3).

Conventions
-----------
* ``N`` envs, ``K`` context length (frames), ``d_z`` latent size of the frozen frame autoencoder.
* Latents ``z`` are float32 ``(N, d_z)``, frames are uint8 ``(N, 3, 64, 64)`` channel-first.
* A *context* is the last ``K`` latents of a real (or imagined) trajectory together with the action that
  **preceded** each of them: ``context_z[:, j]`` is the frame reached by taking ``context_a[:, j]``. The first
  frame of an episode is preceded by the null action index ``num_actions`` (used also for action dropout).
* A *state* is a ``dict[str, torch.Tensor]`` whose every tensor has leading dimension ``N``. The env resets a
  subset of envs with ``state[k][mask] = fresh[k]`` for every key, so a state must stay valid under that.
* ``step`` consumes the action taken *at* the newest frame of the state and returns the next latent with the
  reward and termination of that transition.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch

State = dict[str, torch.Tensor]


@runtime_checkable
class WorldModel(Protocol):
    """Structural type of every world model (RSSM and DiT alike).

    Attributes:
        num_actions: size of the game's minimal action set; valid actions are ``0 .. num_actions-1``.
        latent_dim: ``d_z``, size of one frozen-autoencoder latent.
        context_len: ``K``, number of past frames the model conditions on (and that ``initial_state`` takes).
    """

    num_actions: int
    latent_dim: int
    context_len: int

    def initial_state(self, context_z: torch.Tensor, context_a: torch.Tensor) -> State:
        """Build a state from a real context.

        Args:
            context_z: float32 ``(N, K, d_z)`` latents, oldest first.
            context_a: int64 ``(N, K)`` action that preceded each latent (``num_actions`` = null/unknown).
        Returns:
            A state dict of tensors with leading dimension ``N``.
        Raises:
            ValueError: a shape that does not match ``(N, K, d_z)`` / ``(N, K)``.
        """
        ...

    def step(
        self, state: State, action: torch.Tensor, generator: torch.Generator | None = None, draws: int = 1
    ) -> tuple[State, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Imagine one env step for every env.

        Args:
            state: from ``initial_state`` or a previous ``step``.
            action: int64 ``(N,)`` in ``[0, num_actions)``.
            generator: ``torch.Generator`` on the model's device driving all sampling (seeded → reproducible).
            draws: ``M`` independent next steps per env from the same state and action, as one batch of ``N·M``
                rows (row ``i·M + j`` is draw ``j`` of env ``i``; the same rows, and random stream, as stepping
                the state repeated by :func:`repeat_draws`); a model may share work between them (the DiT makes
                one context pass per env).
        Returns:
            ``(next_state, z_next (N·M, d_z) float32, reward (N·M,) float32, terminated (N·M,) bool)``.
        Raises:
            ValueError: ``draws`` not an integer >= 1 (:func:`check_draws`).
        """
        ...

    def latent_history(self, state: State) -> torch.Tensor:
        """The last ``K`` latents held by ``state``: float32 ``(N, K, d_z)``, oldest first (env observations)."""
        ...

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decode latents ``(N, d_z)`` to uint8 frames ``(N, 3, 64, 64)`` with the frozen decoder."""
        ...

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """Encode uint8 frames ``(N, 3, 64, 64)`` to float32 latents ``(N, d_z)`` with the frozen encoder."""
        ...


class SamplingStepsMixin:
    """The validated, runtime-settable ``sampling_steps`` every world model carries (denoising steps per env
    step; a model that samples once per step, like the RSSM, keeps it only so envs treat all models alike).

    Raises:
        ValueError: a value that is not an int >= 1 (names ``sampling_steps`` and the value).
    """

    @property
    def sampling_steps(self) -> int:
        return self._sampling_steps

    @sampling_steps.setter
    def sampling_steps(self, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"sampling_steps: expected an int >= 1, got {value!r}")
        self._sampling_steps = value


def check_draws(draws: int, minimum: int = 1) -> int:
    """``draws`` as an int; raises ValueError naming ``draws`` unless it is an integer >= ``minimum``."""
    if isinstance(draws, bool) or not isinstance(draws, (int, np.integer)) or draws < minimum:
        raise ValueError(f"draws: expected an integer >= {minimum}, got {draws!r}")
    return int(draws)


def repeat_draws(state: State, action: torch.Tensor, draws: int) -> tuple[State, torch.Tensor]:
    """Every env's state and action repeated ``draws`` times in place order (rows ``i·draws + j``): the batch that
    :meth:`WorldModel.step` with ``draws`` steps. Raises ValueError for a bad ``draws``."""
    draws = check_draws(draws)
    if draws == 1:
        return state, action
    rep = torch.arange(len(action), device=action.device).repeat_interleave(draws)
    return {k: v[rep.to(v.device)] for k, v in state.items()}, action[rep]
