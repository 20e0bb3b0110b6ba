"""Stable-Baselines3 adapter: a Gymnasium ``VectorEnv`` (SAME_STEP autoreset) seen as an SB3 ``VecEnv``.

SB3 expects the old batched protocol: ``reset() -> obs``, ``step_wait() -> (obs, rewards, dones, infos)`` with a
list of per-env info dicts, where an ended env carries ``info["terminal_observation"]`` (its last observation,
the returned one being the first of the next episode) and ``info["TimeLimit.truncated"]`` (ended by truncation,
not termination). This adapter translates Gymnasium's ``final_obs`` convention to that; the vector env keeps
making one batched call per step.
"""
from __future__ import annotations

from typing import Any, Sequence

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode
from stable_baselines3.common.vec_env.base_vec_env import VecEnv


class GymnasiumToSB3VecEnv(VecEnv):
    """SB3 ``VecEnv`` over a natively batched Gymnasium vector env. See :func:`to_sb3`."""

    def __init__(self, vec_env: gym.vector.VectorEnv) -> None:
        self.venv = vec_env
        self._actions: np.ndarray | None = None
        super().__init__(vec_env.num_envs, vec_env.single_observation_space, vec_env.single_action_space)

    def reset(self):
        seed = self._seeds[0]  # one seed for the batch: the vector env derives all per-env randomness from it
        obs, info = self.venv.reset(seed=seed, options=self._options[0] or None)
        self._reset_seeds()
        self._reset_options()
        self.reset_infos = [{} for _ in range(self.num_envs)]
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions).reshape(self.num_envs)

    def step_wait(self):
        obs, reward, terminated, truncated, info = self.venv.step(self._actions)
        dones = terminated | truncated
        infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        for i in np.flatnonzero(dones):
            infos[i]["terminal_observation"] = info["final_obs"][i]
            infos[i]["TimeLimit.truncated"] = bool(truncated[i] and not terminated[i])
        return obs, reward.astype(np.float32), dones, infos

    def close(self) -> None:
        self.venv.close()

    def get_attr(self, attr_name: str, indices: Any = None) -> list[Any]:
        return [getattr(self.venv, attr_name) for _ in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: Any = None) -> None:
        setattr(self.venv, attr_name, value)

    def env_method(self, method_name: str, *args: Any, indices: Any = None, **kwargs: Any) -> list[Any]:
        return [getattr(self.venv, method_name)(*args, **kwargs) for _ in self._get_indices(indices)]

    def env_is_wrapped(self, wrapper_class: type, indices: Any = None) -> list[bool]:
        return [False for _ in self._get_indices(indices)]

    def get_images(self) -> Sequence[np.ndarray | None]:
        frames = self.venv.render()
        return [None] * self.num_envs if frames is None else list(frames)


def to_sb3(vec_env: gym.vector.VectorEnv) -> GymnasiumToSB3VecEnv:
    """Wrap a Gymnasium vector env (e.g. ``gym.make_vec("DiTWM/Pong-v0", num_envs=16)``) as an SB3 ``VecEnv``.

    Works for PPO, A2C and DQN with ``CnnPolicy`` (pixel observations, channel-first uint8) or ``MlpPolicy``
    (latent observations).

    Raises:
        TypeError: ``vec_env`` is not a ``gymnasium.vector.VectorEnv``.
        ValueError: its autoreset mode is not SAME_STEP (SB3 needs the terminal observation in the same step).
    """
    if not isinstance(vec_env, gym.vector.VectorEnv):
        raise TypeError(f"vec_env: expected a gymnasium.vector.VectorEnv, got {type(vec_env).__name__}")
    mode = vec_env.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP)
    if mode != AutoresetMode.SAME_STEP:
        raise ValueError(f"vec_env.metadata['autoreset_mode']: expected SAME_STEP, got {mode}")
    return GymnasiumToSB3VecEnv(vec_env)
