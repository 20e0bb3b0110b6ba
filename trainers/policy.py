"""A latent-stack policy on the real game, and its evaluation (DESIGN.md §4 "Agent score").

The stage-1 actor (and every later policy trained in imagination with latent observations) acts on the
flattened stack of the last ``K`` frozen-encoder latents. On the real game the stack is built by
:class:`LatentStack` with the same "reset" padding as :func:`dit_envs.models.rssm_world_model.stack_latents`:
at an episode's first frame all ``K`` slots hold that frame.
"""
from __future__ import annotations

import numpy as np
import torch

from dit_envs.envs.real_latent import LatentStack


class StackedPolicy:
    """A latent-stack policy on real frames: frozen encoder → :class:`LatentStack` of ``K`` latents → actor.

    Args:
        encoder: module with ``encode(uint8 (N,3,64,64)) -> float32 (N, d_z)``. actor: module with
            ``act(obs (N, K·d_z), generator, greedy) -> int64 (N,)``. num_envs: ``N``; k: ``K``.
        seed: seed of the action sampling. device: where encoder and actor run.
    """

    def __init__(self, encoder, actor, num_envs: int, k: int, seed: int = 0,
                 device: str | torch.device = "cpu") -> None:
        self.encoder, self.actor, self.num_envs, self.k, self.device = encoder, actor, num_envs, k, device
        self.stack: LatentStack | None = None
        self.gen = torch.Generator(device=device).manual_seed(seed)

    @torch.no_grad()
    def _encode(self, frames: np.ndarray) -> torch.Tensor:
        return self.encoder.encode(torch.as_tensor(np.asarray(frames), device=self.device))

    def reset(self, obs: np.ndarray, seed: int | None = None) -> None:
        """Start every env's stack on its first frame: uint8 ``(N, 3, 64, 64)``; ``seed`` re-seeds the sampling."""
        if seed is not None:
            self.gen.manual_seed(seed)
        z = self._encode(obs)
        self.stack = LatentStack(self.num_envs, self.k, z.shape[1], self.device)
        self.stack.reset(z)

    def observe(self, obs: np.ndarray, done: np.ndarray) -> None:
        """Push the frames after a step; envs that autoreset (``done`` bool ``(N,)``, SAME_STEP: ``obs`` is the new
        episode's first frame) restart their stack on it."""
        z = self._encode(obs)
        self.stack.push(z)
        if done.any():
            self.stack.reset(z[torch.as_tensor(done, device=z.device)], done)

    @torch.no_grad()
    def act(self, greedy: bool = False) -> np.ndarray:
        """Actions for the current stacks: int64 ``(N,)`` (sampled, or argmax with ``greedy``)."""
        return self.actor.act(self.stack.flat(), self.gen, greedy=greedy).cpu().numpy()


@torch.no_grad()
def evaluate_policy(encoder, actor, context_len: int, game: str = "Pong", episodes: int = 10, seed: int = 0,
                    greedy: bool = True, device: str | torch.device = "cpu", max_steps: int = 27_000,
                    starts: list[int] | None = None) -> dict[str, float | list[float]]:
    """Play ``episodes`` real episodes (one per env, in parallel) and return the undiscounted returns.

    With sticky actions off a game is fixed by its start (the no-op count at reset), so a greedy policy has
    only the protocol's 30 distinct games: ``starts`` plays exactly one game per listed count
    (:func:`dit_envs.envs.real.parse_starts`; ``episodes`` is then ``len(starts)``), and over ``"all"`` of them
    the mean is the policy's exact expected return, free of the sampling error of random draws.

    Args:
        encoder: module with ``encode(uint8 (N,3,64,64)) -> (N, d_z)`` (the frozen autoencoder).
        actor: module with ``act(obs (N, K·d_z), generator, greedy) -> (N,)`` int64.
        context_len: ``K``. game, seed: real game and its reset seed (random draws of starts; with ``starts``
            only the seed of the policy's sampling). greedy: argmax actions (DESIGN.md §4).
        max_steps: per-episode cap in agent steps (the protocol's 108 000 frames = 27 000 steps); the real env
            truncates each episode at ``max_steps · frameskip`` frames, so short caps give short test episodes.
        starts: no-op counts, one game each (None: ``episodes`` games drawn at random with ``seed``).
    Returns:
        ``{"mean", "std", "returns", "lengths"}`` (with ``starts``: also ``"starts"``, aligned with the returns).
    Raises:
        ValueError: ``episodes`` or ``max_steps`` < 1, or bad ``starts``.
    """
    from dit_envs.envs.real import PROTOCOL, make_real_env, make_start_env

    if starts is not None:
        if not starts:
            raise ValueError("starts: expected at least one no-op count, got []")
        episodes = len(starts)
    if episodes < 1:
        raise ValueError(f"episodes: expected >= 1, got {episodes}")
    if max_steps < 1:
        raise ValueError(f"max_steps: expected >= 1, got {max_steps}")
    frames = min(PROTOCOL["max_num_frames_per_episode"], max_steps * PROTOCOL["frameskip"])
    if starts is None:
        env = make_real_env(game, num_envs=episodes, max_num_frames_per_episode=frames)
        obs, _ = env.reset(seed=seed)
    else:
        env, obs, _ = make_start_env(game, list(starts), max_num_frames_per_episode=frames)
    policy = StackedPolicy(encoder, actor, episodes, context_len, seed, device)
    policy.reset(obs)
    returns, lengths = np.zeros(episodes), np.zeros(episodes, np.int64)
    running = np.ones(episodes, bool)
    for _ in range(max_steps):
        obs, reward, term, trunc, _ = env.step(policy.act(greedy))
        returns[running] += reward[running]
        lengths[running] += 1
        running &= ~(term | trunc)
        if not running.any():
            break
        policy.observe(obs, term | trunc)
    env.close()
    res = {"mean": float(returns.mean()), "std": float(returns.std()), "returns": returns.tolist(),
           "lengths": lengths.tolist()}
    return res if starts is None else {**res, "starts": list(starts)}
