"""``gym.make("DiTWM/<Game>-v<k>")``: the single (unbatched) imagination env, for checkers and simple agents."""
from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.error import ResetNeeded

from dit_envs.envs.imagination import CoreSamplingSteps, ImaginationCore
from dit_envs.envs.loading import load_for_env


class DiTWMEnv(CoreSamplingSteps, gym.Env):
    """One imagined game; the same model, spaces and arguments as :class:`DiTWMVectorEnv` with ``num_envs=1``.

    Observation: uint8 ``(3, 64, 64)`` (``obs_type="pixels"``) or float32 ``(K, d_z)`` (``"latent"``). Action:
    ``Discrete(A)``. ``step`` after an episode ended raises :class:`gymnasium.error.ResetNeeded` until ``reset``.
    Registered ``max_episode_steps`` applies through Gymnasium's ``TimeLimit``; the env itself truncates earlier
    only where a resample rule undoes a step (``ImaginationCore.set_resample_rule``'s ``truncate_rejected``).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 15}

    def __init__(self, *, env_id: str | None = None, checkpoint: Any = None, obs_type: str = "pixels",
                 sampling_steps: int | None = None, temperature: float | None = None,
                 sampling_shift: float | None = None, start_contexts: tuple[Any, Any] | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
                 render_mode: str | None = None,
                 allow_unpinned: bool = False, **expect: Any) -> None:
        bundle, _ = load_for_env(env_id, checkpoint, device=device, dtype=dtype, sampling_steps=sampling_steps,
                                 temperature=temperature, sampling_shift=sampling_shift,
                                 allow_unpinned=allow_unpinned, **expect)
        # Truncation is TimeLimit's job for the single env, so the core's own horizon is effectively infinite.
        self.core = ImaginationCore(bundle, 1, obs_type, max_episode_steps=np.iinfo(np.int64).max,
                                    start_contexts=start_contexts)
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode: expected None or 'rgb_array', got {render_mode!r}")
        self.render_mode, self.bundle = render_mode, bundle
        self.observation_space = self.core.single_observation_space
        self.action_space = self.core.single_action_space
        self._needs_reset = True

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None or self.core.state is None:
            self.core.seed(seed)
        self.core.reset_envs()
        self._needs_reset = False
        return self.core.observe()[0], {}

    def step(self, action):
        if self._needs_reset:
            raise ResetNeeded("step: expected reset() to be called before step() (at start or after an episode end)")
        if isinstance(action, (bool, np.bool_)) or not isinstance(action, (int, np.integer)) and not (
                isinstance(action, np.ndarray) and action.shape == () and np.issubdtype(action.dtype, np.integer)):
            raise TypeError(f"action: expected an integer in [0, {self.core.num_actions}), got {action!r} "
                            f"of type {type(action).__name__}")
        if not 0 <= int(action) < self.core.num_actions:
            raise ValueError(f"action: expected an integer in [0, {self.core.num_actions}), got {int(action)}")
        reward, terminated, truncated = self.core.step(torch.tensor([int(action)], device=self.core.device))
        self._needs_reset = bool(terminated[0] or truncated[0])
        return self.core.observe()[0], float(reward[0]), bool(terminated[0]), bool(truncated[0]), {}

    def render(self):
        if self.render_mode != "rgb_array":
            return None
        return self.core.frames()[0]
