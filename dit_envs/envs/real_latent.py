"""The real game seen through a frozen frame encoder: the imagination env's latent observations on real frames.

A policy trained in imagination with ``obs_type="latent"`` acts on the last ``K`` encoder latents. On the real game
:class:`RealLatentVectorEnv` serves exactly that observation, float32 ``(N, K, d_z)``, so the same training loop,
rollout code and policy run on either env: ``ditwm train-agent --world-model real:STAGE1_DIR`` trains the
imagination learner on the real game (the "perfect world model" ceiling of a training budget), and the SB3
example scores its policies through it. At an episode's first frame all ``K`` slots hold that frame's latent (the
padding of :func:`dit_envs.models.rssm_world_model.stack_latents`).
"""
from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode


class LatentStack:
    """Per-env rolling stack of the last ``K`` latents: float32 ``(N, K, d_z)`` on ``device``.

    Args:
        num_envs: ``N``; k: ``K``; latent_dim: ``d_z``.
    """

    def __init__(self, num_envs: int, k: int, latent_dim: int, device: str | torch.device = "cpu") -> None:
        self.stack = torch.zeros(num_envs, k, latent_dim, device=device)

    def reset(self, z: torch.Tensor, mask: np.ndarray | torch.Tensor | None = None) -> None:
        """Fill all slots of the envs in ``mask`` (all if None) with their first latent ``z (n, d_z)``."""
        if mask is None:
            self.stack[:] = z[:, None]
        else:
            m = torch.as_tensor(mask, device=self.stack.device)
            self.stack[m] = z[:, None].expand(-1, self.stack.shape[1], -1)

    def push(self, z: torch.Tensor) -> None:
        """Append the newest latents ``z (N, d_z)``, dropping the oldest."""
        self.stack = torch.cat([self.stack[:, 1:], z[:, None]], dim=1)

    def flat(self) -> torch.Tensor:
        """float32 ``(N, K·d_z)``, the policy input."""
        return self.stack.flatten(1)


class RealLatentVectorEnv(gym.vector.VectorWrapper):
    """A real-game vector env seen through a frozen encoder: observations float32 ``(N, K, d_z)`` in ``[-1, 1]``.

    SAME_STEP autoreset, as the imagination env: on the step where env ``b`` ends, the observation is the stack of
    its next episode's first frame and ``info["final_obs"][b]`` the true last stack, float32 ``(K, d_z)``
    (``info["_final_obs"]`` marks the ended envs).

    Args:
        env: real vector env with uint8 ``(N, 3, 64, 64)`` observations and SAME_STEP autoreset
            (:func:`dit_envs.envs.real.make_real_env`).
        encoder: module with ``encode(uint8 (n, 3, 64, 64)) -> float (n, d_z)`` (the frozen autoencoder).
        k: ``K`` latents per observation (the policy's context length).
        latent_dim: ``d_z``.
        device: where the encoder runs (observations are returned as numpy on the CPU).
    Raises:
        ValueError: ``k`` or ``latent_dim`` < 1, or ``env`` without SAME_STEP autoreset.
    """

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP}

    def __init__(self, env: gym.vector.VectorEnv, encoder: Any, k: int, latent_dim: int,
                 device: str | torch.device = "cpu") -> None:
        for name, v in (("k", k), ("latent_dim", latent_dim)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {v!r}")
        mode = env.metadata.get("autoreset_mode")
        if mode != AutoresetMode.SAME_STEP:
            raise ValueError(f"env.metadata['autoreset_mode']: expected SAME_STEP, got {mode}")
        super().__init__(env)
        self.encoder, self.device = encoder, device
        self.stack = LatentStack(env.num_envs, int(k), int(latent_dim), device)
        self.single_observation_space = gym.spaces.Box(-1.0, 1.0, (int(k), int(latent_dim)), np.float32)
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, env.num_envs)

    @torch.no_grad()
    def _encode(self, frames: np.ndarray) -> torch.Tensor:
        return self.encoder.encode(torch.as_tensor(np.asarray(frames), device=self.device)).float()

    def _obs(self) -> np.ndarray:
        return self.stack.stack.clamp(-1.0, 1.0).cpu().numpy()

    def reset(self, *, seed: int | list[int] | None = None, options: dict | None = None):
        """Reset every env (``seed`` as the wrapped env takes it). Raises ValueError for ``options`` (a partial
        reset would leave the other envs' stacks unknown to this wrapper)."""
        if options:
            raise ValueError(f"options: expected None (every env resets), got {options!r}")
        obs, info = self.env.reset(seed=seed)
        self.stack.reset(self._encode(obs))
        return self._obs(), info

    def step(self, actions):
        obs, reward, term, trunc, raw = self.env.step(actions)
        z = self._encode(obs)
        self.stack.push(z)  # an ended env's slot -1 now holds its next episode's first frame
        done = np.asarray(term) | np.asarray(trunc)
        info = {key: v for key, v in raw.items() if key not in ("final_obs", "_final_obs")}  # frames, not latents
        if done.any():
            if "final_obs" not in raw:
                raise ValueError("env: expected info['final_obs'] (the last frames) on a step where an env ended, "
                                 "got none")
            idx = np.flatnonzero(done)
            rows = torch.as_tensor(idx, device=self.device)
            last = self.stack.stack[rows].clone()  # (n, K, d_z)
            last[:, -1] = self._encode(np.stack(list(raw["final_obs"][idx])))  # the true last frame
            final = np.full(self.num_envs, None, dtype=object)
            for j, i in enumerate(idx):
                final[i] = last[j].clamp(-1.0, 1.0).cpu().numpy()
            info["final_obs"], info["_final_obs"] = final, done.copy()
            self.stack.reset(z[rows], done)
        return self._obs(), reward, term, trunc, info
