"""On-policy rollouts in a natively batched vector env (SAME_STEP autoreset) and the DreamerV3 update on them.

Stage 3 trains the actor-critic of :mod:`trainers.agent` on imagined experience served through the Gymnasium
vector env (``gym.make_vec(..., obs_type="latent")``), not through the world model directly. The envs run on
across updates, so a rollout of ``T`` steps may contain episode ends. Source of the update: DreamerV3 (Hafner et
al. 2023, §2 "Actor critic learning": λ-returns, return normalisation, entropy bonus, slow critic).

Autoreset and returns. On the step where env ``b`` ends an episode, SAME_STEP returns the first observation of
its next episode; the true last observation is ``info["final_obs"][b]``. The :class:`Rollout` keeps both:
``traj.obs[t+1]`` is the observation the policy acts on next (the reset one after an end), ``final_obs[t]`` the
true successor of ``traj.obs[t]``. :func:`rollout_returns` cuts the λ-return recursion at every episode end so
nothing of the next episode leaks into the returns of the previous one:

* termination (``continues[t] = 0``): ``R_t = r_t``;
* truncation (time limit): ``R_t = r_t + γ·V(final_obs[t])`` (the episode goes on, unseen: bootstrap);
* otherwise the usual ``R_t = r_t + γ·((1−λ)·v_{t+1} + λ·R_{t+1})``, ``R_T = v_T``.

Every state of such a rollout is a live state (autoreset: none lies beyond a terminal), so the per-state loss
weights are 1 — DreamerV3's cumulative-discount weights exist to mask imagined states after a predicted end.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode

from dit_envs.models.dreamer_layers import categorical_entropy
from trainers.agent import (ActorCritic, Metrics, Trajectory, action_log_prob, actor_loss, critic_loss,
                            lambda_returns)


@dataclasses.dataclass
class Rollout:
    """``T`` batched steps of ``B`` envs.

    Fields: ``traj`` (:class:`Trajectory`; ``obs`` float32 ``(T+1, B, obs_dim)`` acted-on observations,
    ``continues = 1 − terminated``), ``truncated`` float32 ``(T, B)``, ``final_obs`` float32 ``(T, B, obs_dim)``
    (true successor of ``traj.obs[t]``: ``info["final_obs"]`` where an episode ended, else ``traj.obs[t+1]``),
    ``episode_returns`` (undiscounted returns of the episodes that ended in this rollout).
    """

    traj: Trajectory
    truncated: torch.Tensor
    final_obs: torch.Tensor
    episode_returns: list[float]


def latent_obs(obs: Any, k: int, device: torch.device | str) -> torch.Tensor:
    """Env latent observations ``(B, K_env, d_z)`` (numpy or tensor) → policy input float32 ``(B, k·d_z)``.

    The last ``k ≤ K_env`` latents are kept, so a policy with a shorter stack runs in a longer-context env.

    Raises:
        ValueError: ``obs`` is not 3-D or has fewer than ``k`` latents.
    """
    x = torch.as_tensor(np.asarray(obs) if not torch.is_tensor(obs) else obs, device=device, dtype=torch.float32)
    if x.dim() != 3 or x.shape[1] < k:
        raise ValueError(f"obs: expected latent observations (B, K>={k}, d_z), got shape {tuple(x.shape)}")
    return x[:, -k:].flatten(1)  # (B, k·d_z)


@torch.no_grad()
def collect_rollout(envs: gym.vector.VectorEnv, act: Callable[[torch.Tensor], torch.Tensor], obs: Any,
                    horizon: int, k: int, running_return: np.ndarray, device: torch.device | str = "cpu"
                    ) -> tuple[Rollout, Any]:
    """Roll ``act`` for ``horizon`` batched steps (one ``envs.step`` call per step).

    Args:
        envs: vector env with latent observations ``(B, K_env, d_z)`` and SAME_STEP autoreset.
        act: policy, float32 ``(B, k·d_z)`` → int64 ``(B,)`` actions (any device).
        obs: the current observations (from ``reset`` or the previous call). horizon: ``T`` ≥ 1. k: stack length.
        running_return: float64 ``(B,)`` undiscounted return so far of each env's episode; updated in place.
    Returns:
        ``(rollout, next_obs)``; pass ``next_obs`` to the next call.
    Raises:
        ValueError: ``horizon`` < 1, or an env whose autoreset mode is not SAME_STEP.
    """
    if horizon < 1:
        raise ValueError(f"horizon: expected >= 1, got {horizon}")
    mode = envs.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP)
    if mode != AutoresetMode.SAME_STEP:
        raise ValueError(f"envs.metadata['autoreset_mode']: expected SAME_STEP, got {mode}")
    x = latent_obs(obs, k, device)
    xs, finals, actions, rewards, conts, truncs, ended = [x], [], [], [], [], [], []
    for _ in range(horizon):
        a = act(x).to(torch.int64)  # (B,)
        obs, reward, term, trunc, info = envs.step(a.cpu().numpy())
        x = latent_obs(obs, k, device)
        done = np.asarray(term) | np.asarray(trunc)
        final = x.clone()
        if done.any():
            idx = np.flatnonzero(done)
            final[torch.as_tensor(idx, device=device)] = latent_obs(np.stack(info["final_obs"][idx]), k, device)
        running_return += reward
        ended.extend(running_return[done].tolist())
        running_return[done] = 0.0
        xs.append(x)
        finals.append(final)
        actions.append(a.to(device))
        rewards.append(torch.as_tensor(reward, dtype=torch.float32, device=device))
        conts.append(torch.as_tensor(1.0 - np.asarray(term, np.float32), device=device))
        truncs.append(torch.as_tensor(np.asarray(trunc, np.float32) * (1.0 - np.asarray(term, np.float32)),
                                      device=device))
    traj = Trajectory(torch.stack(xs), torch.stack(actions), torch.stack(rewards), torch.stack(conts))
    return Rollout(traj, torch.stack(truncs), torch.stack(finals), ended), obs


def rollout_returns(rewards: torch.Tensor, values: torch.Tensor, continues: torch.Tensor, truncated: torch.Tensor,
                    final_values: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """λ-returns of a rollout with episode ends inside it (see the module docstring).

    Implemented with :func:`trainers.agent.lambda_returns`: the recursion is cut (continue 0) at every end and a
    truncation's bootstrap ``γ·V(final_obs)`` is folded into its reward.

    Args:
        rewards, continues (``1 − terminated``), truncated, final_values (``V(final_obs[t])``): float ``(T, B)``.
        values: ``V(traj.obs[t])`` float ``(T+1, B)``. gamma, lam: in ``[0, 1]``.
    Returns:
        float ``(T, B)``.
    Raises:
        ValueError: mismatched shapes (from ``lambda_returns``), or ``truncated``/``final_values`` not ``(T, B)``.
    """
    for name, x in (("truncated", truncated), ("final_values", final_values)):
        if x.shape != rewards.shape:
            raise ValueError(f"{name}: expected shape {tuple(rewards.shape)}, got {tuple(x.shape)}")
    trunc = truncated * continues  # a step that terminates is never bootstrapped
    cut = continues * (1.0 - trunc)  # 0 at every episode end
    return lambda_returns(rewards + gamma * trunc * final_values, values, cut, gamma, lam)


def _check_rollout(ac: ActorCritic, rollout: Rollout) -> None:
    """Raise ValueError unless ``traj.obs`` is ``(T+1, B, obs_dim)`` and ``final_obs`` ``(T, B, obs_dim)``."""
    c, traj = ac.config, rollout.traj
    t_len, b = traj.actions.shape
    if tuple(traj.obs.shape) != (t_len + 1, b, c.obs_dim) or rollout.final_obs.shape != traj.obs[1:].shape:
        raise ValueError(f"rollout.traj.obs/final_obs: expected ({t_len + 1}, {b}, {c.obs_dim}) / "
                         f"({t_len}, {b}, {c.obs_dim}), got {tuple(traj.obs.shape)} / {tuple(rollout.final_obs.shape)}")


@torch.no_grad()
def _returns(ac: ActorCritic, rollout: Rollout, values: torch.Tensor) -> torch.Tensor:
    """:func:`rollout_returns` of a rollout with the fast critic's ``values`` ``(T+1, B)`` and its bootstraps
    ``V(final_obs)`` at truncations → ``(T, B)``."""
    c, traj = ac.config, rollout.traj
    final_values = torch.zeros_like(traj.rewards)  # (T, B)
    m = rollout.truncated > 0
    if bool(m.any()):
        final_values[m] = ac.critic.value(rollout.final_obs[m])
    return rollout_returns(traj.rewards, values, traj.continues, rollout.truncated, final_values, c.gamma, c.lam)


def rollout_loss(ac: ActorCritic, rollout: Rollout, update_normalizer: bool = True) -> tuple[torch.Tensor, Metrics]:
    """DreamerV3 actor + critic loss on a vector-env rollout (mirrors :func:`trainers.agent.actor_critic_loss`).

    Values, returns and bootstraps come from the fast critic (detached); the critic is also pulled towards the
    slow critic; advantages are divided by the return scale after ``ac.normalizer.update(returns)``.

    Returns:
        ``(loss, metrics)``: scalar loss (gradients reach ``ac.actor`` and ``ac.critic``); detached scalars
        ``actor_loss, actor_ent, adv_mean, adv_abs, critic_loss, value_mean, return_mean, return_scale``.
    Raises:
        ValueError: rollout fields of mismatched shapes.
    """
    c, traj = ac.config, rollout.traj
    _check_rollout(ac, rollout)
    critic_logits = ac.critic(traj.obs)  # (T+1, B, bins)
    values = ac.critic.twohot.mean(critic_logits).detach()  # (T+1, B)
    with torch.no_grad():
        slow_values = ac.slow_critic.value(traj.obs[:-1])  # (T, B)
        returns = _returns(ac, rollout, values)  # (T, B)
    weights = torch.ones_like(returns)
    if update_normalizer:
        ac.normalizer.update(returns)
    scale = ac.normalizer.scale()
    a_loss, a_m = actor_loss(ac.actor(traj.obs[:-1]), traj.actions, returns, values[:-1], weights, scale,
                             c.entropy_coef)
    c_loss, c_m = critic_loss(critic_logits[:-1], returns, slow_values, weights, ac.critic.twohot, c.slow_reg)
    return a_loss + c_loss, {**a_m, **c_m, "return_scale": scale.detach()}


@dataclasses.dataclass
class RolloutTargets:
    """What several gradient steps on one rollout keep fixed, each float32 ``(T, B)``: λ-returns, advantages divided
    by the return scale, the slow critic's values and the log-probability of each taken action under the policy
    that collected it."""

    returns: torch.Tensor
    advantages: torch.Tensor
    slow_values: torch.Tensor
    old_logp: torch.Tensor


@torch.no_grad()
def rollout_targets(ac: ActorCritic, rollout: Rollout, update_normalizer: bool = True) -> RolloutTargets:
    """Returns, advantages (as :func:`rollout_loss` computes them, normaliser updated first), slow values and the
    collecting policy's log-probabilities of a rollout, for :func:`clipped_loss`.

    Raises:
        ValueError: rollout fields of mismatched shapes.
    """
    traj = rollout.traj
    _check_rollout(ac, rollout)
    values = ac.critic.value(traj.obs)  # (T+1, B)
    returns = _returns(ac, rollout, values)  # (T, B)
    if update_normalizer:
        ac.normalizer.update(returns)
    logp = action_log_prob(ac.actor(traj.obs[:-1]), traj.actions)  # (T, B)
    return RolloutTargets(returns, (returns - values[:-1]) / ac.normalizer.scale(), ac.slow_critic.value(traj.obs[:-1]),
                          logp)


def reference_kl(actor: torch.nn.Module, reference: torch.nn.Module, obs: torch.Tensor) -> torch.Tensor:
    """Mean ``KL(π_ref(·|s) ‖ π(·|s))`` in nats over the observations ``obs`` float32 ``(..., obs_dim)``: the
    behaviour-regularisation term of ``train-agent --kl-coef`` (gradient to ``actor`` only; ``reference`` frozen).
    Forward KL, so the policy keeps mass on every action the reference plays (BREMEN, Matsushima et al. 2021, keeps
    each policy near the one that collected the data its models were trained on)."""
    with torch.no_grad():
        ref = reference(obs).float().log_softmax(-1)
    logp = actor(obs).float().log_softmax(-1)
    return (ref.exp() * (ref - logp)).sum(-1).mean()


def clipped_loss(ac: ActorCritic, rollout: Rollout, targets: RolloutTargets, envs: torch.Tensor, clip: float
                 ) -> tuple[torch.Tensor, Metrics]:
    """Actor + critic loss on the columns ``envs`` (int64 indices into ``B``) of a rollout, for several gradient
    steps on it: the actor's term is PPO's clipped surrogate (Schulman et al. 2017, eq. 7) on the fixed advantages,
    ``−mean(min(ρ·A, clip(ρ, 1 − ε, 1 + ε)·A) + η·H[π])`` with ``ρ = π(a|s) / π_old(a|s)``; the critic's is
    :func:`trainers.agent.critic_loss` towards the fixed returns. On a policy that has not moved yet (``ρ = 1``)
    its gradient is :func:`rollout_loss`'s.

    Returns:
        ``(loss, metrics)`` with detached ``actor_loss``, ``actor_ent``, ``clip_fraction``, ``critic_loss``.
    """
    traj = rollout.traj
    obs, actions = traj.obs[:-1, envs], traj.actions[:, envs]  # (T, b, ·)
    logits = ac.actor(obs)  # (T, b, A)
    logp = action_log_prob(logits, actions)  # (T, b)
    ratio = (logp - targets.old_logp[:, envs]).exp()
    adv = targets.advantages[:, envs]
    ent = categorical_entropy(logits)  # (T, b)
    a_loss = -(torch.min(ratio * adv, ratio.clamp(1.0 - clip, 1.0 + clip) * adv)
               + ac.config.entropy_coef * ent).mean()
    c_loss, c_m = critic_loss(ac.critic(obs), targets.returns[:, envs], targets.slow_values[:, envs],
                              torch.ones_like(adv), ac.critic.twohot, ac.config.slow_reg)
    clipped = ((ratio - 1.0).abs() > clip).float().mean()
    return a_loss + c_loss, {"actor_loss": a_loss.detach(), "actor_ent": ent.detach().mean(),
                             "clip_fraction": clipped.detach(), "critic_loss": c_m["critic_loss"]}
