"""The stage-3 actor-critic learns a task with delayed, sparse reward: Catch (bsuite, Osband et al. 2020).

A check of the RL itself, independent of any world model: the same :func:`collect_rollout` +
:func:`rollout_loss` update that ``ditwm train-agent`` runs must turn a random policy (about −0.5 per episode)
into one that catches nearly every ball within a few hundred updates on CPU. If the advantage sign, the λ-return
cut at episode ends or the autoreset bookkeeping were wrong, this test would fail.
"""
from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode

from trainers.agent import ActorCritic, AgentConfig
from trainers.rollout import collect_rollout, rollout_loss


class VectorCatch(gym.vector.VectorEnv):
    """``n`` Catch games: a ball falls one row per step from a random column of a ``rows × cols`` grid; the
    paddle on the bottom row moves left / stays / right (actions 0 / 1 / 2). When the ball reaches the bottom the
    episode terminates with reward +1 (caught) or −1. Observation float32 ``(n, 1, rows·cols)``: the one-hot
    ball and paddle cells (the ``(B, K, d_z)`` layout of latent observations, ``K = 1``). SAME_STEP autoreset
    with ``info["final_obs"]``, like the imagination env."""

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP}

    def __init__(self, n: int, rows: int = 10, cols: int = 5, seed: int = 0) -> None:
        self.num_envs, self.rows, self.cols = n, rows, cols
        self.rng = np.random.default_rng(seed)
        self.single_observation_space = gym.spaces.Box(0.0, 1.0, (1, rows * cols), np.float32)
        self.single_action_space = gym.spaces.Discrete(3)
        self.ball_x = np.zeros(n, np.int64)
        self.ball_y = np.zeros(n, np.int64)
        self.paddle = np.zeros(n, np.int64)

    def _start(self, idx: np.ndarray) -> None:
        self.ball_x[idx] = self.rng.integers(0, self.cols, len(idx))
        self.ball_y[idx] = 0
        self.paddle[idx] = self.rng.integers(0, self.cols, len(idx))

    def _obs(self) -> np.ndarray:
        grid = np.zeros((self.num_envs, self.rows, self.cols), np.float32)
        i = np.arange(self.num_envs)
        grid[i, self.ball_y, self.ball_x] = 1.0
        grid[i, self.rows - 1, self.paddle] = 1.0
        return grid.reshape(self.num_envs, 1, -1)

    def reset(self, *, seed=None, options=None):
        self._start(np.arange(self.num_envs))
        return self._obs(), {}

    def step(self, actions):
        self.paddle = np.clip(self.paddle + np.asarray(actions) - 1, 0, self.cols - 1)
        self.ball_y += 1
        term = self.ball_y >= self.rows - 1
        reward = np.where(term, np.where(self.paddle == self.ball_x, 1.0, -1.0), 0.0)
        info = {}
        if term.any():
            last, final = self._obs(), np.empty(self.num_envs, dtype=object)
            for j in np.flatnonzero(term):
                final[j] = last[j]
            info = {"final_obs": final, "_final_obs": term.copy()}
            self._start(np.flatnonzero(term))
        return self._obs(), reward, term, np.zeros_like(term), info


def test_actor_critic_learns_catch():
    torch.manual_seed(0)
    env = VectorCatch(64, seed=0)
    ac = ActorCritic(AgentConfig(obs_dim=50, num_actions=3, hidden=64, lr=3e-4))
    opt = torch.optim.Adam([*ac.actor.parameters(), *ac.critic.parameters()], lr=3e-4, eps=1e-5)
    gen = torch.Generator().manual_seed(0)
    obs, _ = env.reset()
    running, returns = np.zeros(64), []
    for _ in range(400):
        ro, obs = collect_rollout(env, lambda x: ac.act(x, gen), obs, 15, 1, running)
        loss, _ = rollout_loss(ac, ro)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ac.update_slow()
        returns.append(ro.episode_returns)
    first = np.mean([r for rs in returns[:20] for r in rs])
    last = np.mean([r for rs in returns[-50:] for r in rs])
    assert first < 0.0, first  # near random at the start
    assert last > 0.8, (first, last)  # catches > 90 % of the balls
