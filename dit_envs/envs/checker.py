"""A checker for natively batched Gymnasium vector envs (Gymnasium's ``check_env`` covers single envs only).

It runs random actions and asserts, at every step: spaces and dtypes of observations, rewards and flags; the
autoreset contract of the env's ``metadata["autoreset_mode"]`` (SAME_STEP: ``final_obs``/``final_info`` object
arrays with masks equal to ``terminated | truncated``, each final observation inside the single observation
space; NEXT_STEP: the step after an end returns reward 0 and no end flags); seeded determinism.
"""
from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode


def _check_obs(env: gym.vector.VectorEnv, obs: np.ndarray, where: str) -> None:
    space = env.single_observation_space
    if not isinstance(obs, np.ndarray) or obs.shape != (env.num_envs, *space.shape):
        raise AssertionError(f"{where}: observation expected shape {(env.num_envs, *space.shape)}, "
                             f"got {getattr(obs, 'shape', type(obs))}")
    if obs.dtype != space.dtype:
        raise AssertionError(f"{where}: observation expected dtype {space.dtype}, got {obs.dtype}")
    if obs not in env.observation_space:
        raise AssertionError(f"{where}: observation outside observation_space")


def check_vector_env(env: gym.vector.VectorEnv, steps: int = 1000, seed: int = 0) -> dict[str, int]:
    """Run ``steps`` random steps on ``env`` and assert the vector-env contract; returns counts of ends seen.

    Raises:
        AssertionError: the first violation, with the step and field.
    """
    mode = env.metadata.get("autoreset_mode")
    if not isinstance(mode, AutoresetMode):
        raise AssertionError(f"metadata['autoreset_mode']: expected an AutoresetMode, got {mode!r}")
    if env.observation_space.shape != (env.num_envs, *env.single_observation_space.shape):
        raise AssertionError("observation_space: expected the batched single_observation_space")
    obs, info = env.reset(seed=seed)
    _check_obs(env, obs, "reset")
    obs_again, _ = env.reset(seed=seed)
    if not np.array_equal(obs, obs_again):
        raise AssertionError("reset(seed): expected the same observations for the same seed")
    env.action_space.seed(seed)
    counts = {"terminated": 0, "truncated": 0}
    prev_done = np.zeros(env.num_envs, bool)
    for t in range(steps):
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        where = f"step {t}"
        _check_obs(env, obs, where)
        for name, arr, dtype in (("reward", reward, np.floating), ("terminated", terminated, np.bool_),
                                 ("truncated", truncated, np.bool_)):
            if not isinstance(arr, np.ndarray) or arr.shape != (env.num_envs,) or not np.issubdtype(arr.dtype, dtype):
                raise AssertionError(f"{where}: {name} expected {dtype.__name__} ({env.num_envs},), got "
                                     f"{getattr(arr, 'dtype', type(arr))} {getattr(arr, 'shape', '')}")
        done = terminated | truncated
        if mode == AutoresetMode.SAME_STEP:
            if done.any():
                for key in ("final_obs", "final_info"):
                    if key not in info or not np.array_equal(info[f"_{key}"], done):
                        raise AssertionError(f"{where}: info['_{key}'] expected to equal terminated | truncated")
                for i in np.flatnonzero(done):
                    if info["final_obs"][i] not in env.single_observation_space:
                        raise AssertionError(f"{where}: info['final_obs'][{i}] outside single_observation_space")
                    if not isinstance(info["final_info"][i], dict):
                        raise AssertionError(f"{where}: info['final_info'][{i}] expected a dict")
            elif "final_obs" in info and info["_final_obs"].any():
                raise AssertionError(f"{where}: final_obs present although no env ended")
        elif mode == AutoresetMode.NEXT_STEP:
            if (reward[prev_done] != 0).any() or done[prev_done].any():
                raise AssertionError(f"{where}: NEXT_STEP reset step expected reward 0 and no end flags")
        prev_done = done if mode == AutoresetMode.NEXT_STEP else np.zeros_like(done)
        counts["terminated"] += int(terminated.sum())
        counts["truncated"] += int(truncated.sum())
    return counts
