"""Imagination environments: a world-model bundle served as a natively batched Gymnasium ``VectorEnv``.

Modelled on Gymnasium's ``CartPoleVectorEnv`` (own ``metadata`` with ``autoreset_mode``, batched spaces) and on
DIAMOND's ``WorldModelEnv`` (rolling context, start states from real data, horizon truncation, no grad).
"""
from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.error import ResetNeeded
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space

from dit_envs.envs.loading import load_for_env, set_sampling_shift, set_temperature
from dit_envs.envs.uncertainty import UncertaintyPenalty, build_penalty

OBS_TYPES = ("pixels", "latent")


class ImaginationCore:
    """Batched world-model state shared by the vector env and the single env (no Gymnasium API here).

    Args:
        bundle: a loaded :class:`dit_envs.bundle.Bundle` (model + real start contexts ``start_z (M, K, d_z)``,
            ``start_a (M, K)``).
        num_envs: ``N`` >= 1.
        obs_type: ``"pixels"`` (uint8 ``(3, 64, 64)``, the decoded newest latent) or ``"latent"`` (float32
            ``(K, d_z)``, the last ``K`` latents, oldest first).
        max_episode_steps: truncation horizon (>= 1).
        start_contexts: optional ``(z float (M, K, d_z), prev_action int (M, K))`` real contexts that resets draw
            from instead of the bundle's (see :meth:`set_start_contexts`).
    Raises:
        ValueError: ``num_envs`` < 1, unknown ``obs_type``, ``max_episode_steps`` < 1, bad ``start_contexts``.
    """

    def __init__(self, bundle: Any, num_envs: int, obs_type: str, max_episode_steps: int,
                 start_contexts: tuple[Any, Any] | None = None) -> None:
        if isinstance(num_envs, bool) or not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
            raise ValueError(f"num_envs: expected an integer >= 1, got {num_envs!r}")
        if obs_type not in OBS_TYPES:
            raise ValueError(f"obs_type: expected one of {OBS_TYPES}, got {obs_type!r}")
        if isinstance(max_episode_steps, bool) or not isinstance(max_episode_steps, (int, np.integer)) \
                or max_episode_steps < 1:
            raise ValueError(f"max_episode_steps: expected an integer >= 1, got {max_episode_steps!r}")
        self.bundle, self.model = bundle, bundle.model
        self.num_envs, self.obs_type, self.max_episode_steps = int(num_envs), obs_type, int(max_episode_steps)
        self.device = bundle.start_z.device
        self.num_actions = int(self.model.num_actions)
        K, d_z = self.model.context_len, self.model.latent_dim
        if obs_type == "pixels":
            self.single_observation_space = gym.spaces.Box(0, 255, (3, 64, 64), np.uint8)
        else:
            # The frozen encoder ends in tanh, so every latent lies in [-1, 1].
            self.single_observation_space = gym.spaces.Box(-1.0, 1.0, (K, d_z), np.float32)
        self.single_action_space = gym.spaces.Discrete(self.num_actions)
        self.generator = torch.Generator(device=self.device)
        self.rng = np.random.default_rng()
        self.state: dict[str, torch.Tensor] | None = None
        self.elapsed = np.zeros(self.num_envs, np.int64)
        self._last_z: torch.Tensor | None = None  # (N, d_z) newest latent, for pixels and render
        self.start_z, self.start_a = bundle.start_z, bundle.start_a
        if start_contexts is not None:
            self.set_start_contexts(*start_contexts)
        self.resample_rule: Any = None
        self.max_resamples, self.rejected_reward, self.truncate_rejected, self.rejection_penalty = 0, None, False, 0.0
        self.resample_counts = {"steps": 0, "rejected": 0, "resampled": 0, "still_rejected": 0}
        self.uncertainty: UncertaintyPenalty | None = None

    def set_resample_rule(self, rule: Any, max_resamples: int, rejected_reward: float | None = None,
                          truncate_rejected: bool = False, rejection_penalty: float = 0.0) -> None:
        """Rejection sampling of imagined steps: a step the rule rejects is drawn again ``max_resamples`` times,
        with fresh noise from the same state and action, in one batched call; the first accepted draw is kept (the
        last one if every draw is rejected, unless ``truncate_rejected`` undoes the step). It samples the model's
        next-step distribution conditioned on an invariant the game never breaks, e.g. Pong's ball does not vanish
        without a point (:class:`trainers.pong_fates.LostBallRule`). ``resample_counts`` counts steps, first-draw
        rejections, redraws and steps rejected in every draw; seeded envs stay reproducible.

        Args:
            rule: None (off) or a callable ``(history float (n, K, d_z), next_z float (n, d_z), reward float (n,),
                terminated bool (n,)) -> bool (n,)`` (tensor or numpy), True where the step must be drawn again;
                ``history`` holds the last ``K`` latents before the step, oldest first.
            max_resamples: draws after the first (all made at once), >= 1 with a rule.
            rejected_reward: the reward of a step whose every draw is rejected (None: its last draw's own), e.g. a
                pessimistic penalty where the model cannot keep the invariant (MOReL, Kidambi et al. 2020).
            truncate_rejected: a step rejected in every draw is undone and ends the episode as a truncation: the
                env keeps its state from before the step (``final_obs``), the reward is ``rejected_reward`` or 0,
                so a learner bootstraps from the last state the model could continue (model-based RL's
                truncation at unreliable model states, e.g. MBPO, Janner et al. 2019); none of the broken
                successor reaches the policy.
            rejection_penalty: subtracted from the reward of every step whose first draw the rule rejects, kept
                or not (after ``rejected_reward`` or an undone step's 0 are set): a penalty on states where the
                model breaks the invariant, which steers a policy away from the model's errors (reward minus a
                model-error estimate: MOPO, Yu et al. 2020).
        Raises:
            ValueError: ``max_resamples`` not an integer >= 1 with a rule, ``rule`` not callable, a non-finite
                ``rejected_reward``, a ``truncate_rejected`` that is not a bool, or a ``rejection_penalty`` that is
                not a finite number >= 0 (or > 0 without a rule).
        """
        if rule is not None and not callable(rule):
            raise ValueError(f"rule: expected None or a callable, got {type(rule).__name__}")
        if rule is not None and (isinstance(max_resamples, bool) or not isinstance(max_resamples, (int, np.integer))
                                 or max_resamples < 1):
            raise ValueError(f"max_resamples: expected an integer >= 1 with a rule, got {max_resamples!r}")
        if rejected_reward is not None and not np.isfinite(rejected_reward):
            raise ValueError(f"rejected_reward: expected None or a finite number, got {rejected_reward!r}")
        if not isinstance(truncate_rejected, (bool, np.bool_)):
            raise ValueError(f"truncate_rejected: expected a bool, got {truncate_rejected!r}")
        if isinstance(rejection_penalty, bool) or not isinstance(rejection_penalty, (int, float, np.number)) \
                or not np.isfinite(rejection_penalty) or rejection_penalty < 0:
            raise ValueError(f"rejection_penalty: expected a finite number >= 0, got {rejection_penalty!r}")
        if rule is None and rejection_penalty:
            raise ValueError(f"rejection_penalty: expected 0 without a rule, got {rejection_penalty!r}")
        self.resample_rule, self.max_resamples = rule, int(max_resamples) if rule is not None else 0
        self.rejected_reward = None if rule is None or rejected_reward is None else float(rejected_reward)
        self.truncate_rejected = bool(truncate_rejected) and rule is not None
        self.rejection_penalty = float(rejection_penalty)

    def set_uncertainty_penalty(self, penalty: float, draws: int = 4, quantile: float = 0.9,
                                threshold: float | None = None, truncate: bool = False) -> float | None:
        """Charge ``penalty`` on every imagined step whose draw spread passes a threshold, and with ``truncate``
        end its episode there (:class:`~dit_envs.envs.uncertainty.UncertaintyPenalty`: ``draws`` draws from the
        same state and action in one model call; MOReL/MOPO-style pessimism). ``threshold``
        None calibrates it as the ``quantile`` of the spread over one step from this env's start contexts with
        random actions (seeded, so the same contexts give the same threshold); ``penalty`` 0 without ``truncate``
        turns it off. Returns the threshold (None: off).

        Raises:
            ValueError: a penalty that is not a finite number >= 0, ``draws`` < 2, ``quantile`` outside (0, 1), a
                negative or non-finite ``threshold``, or a ``truncate`` that is not a bool; each message names the
                parameter.
        """
        self.uncertainty = build_penalty(self.model, self.start_z, self.start_a, self.num_actions, penalty, draws,
                                         quantile, threshold, truncate)
        return None if self.uncertainty is None else self.uncertainty.threshold

    def set_start_contexts(self, z: Any, prev_action: Any) -> None:
        """Replace the real start contexts that later resets draw from (e.g. DIAMOND's imagination starts from
        the replay buffer, Alonso et al. 2024; `ditwm train-agent --start-data` draws them from an episode store).

        Args:
            z: float ``(M, K, d_z)`` encoded real frames (this model's frozen encoder), ``M >= 1``.
            prev_action: int ``(M, K)`` action that led to each frame, ``num_actions`` = null (episode start).
        Raises:
            ValueError: a shape other than ``(M, K, d_z)`` / ``(M, K)``, non-finite latents, or actions outside
                ``[0, num_actions]``.
        """
        K, d_z = self.model.context_len, self.model.latent_dim
        z = torch.as_tensor(z)
        a = torch.as_tensor(prev_action)
        if z.ndim != 3 or z.shape[0] < 1 or tuple(z.shape[1:]) != (K, d_z):
            raise ValueError(f"start_contexts: expected z of shape (M >= 1, {K}, {d_z}), got {tuple(z.shape)}")
        if tuple(a.shape) != tuple(z.shape[:2]) or a.is_floating_point():
            raise ValueError(f"start_contexts: expected integer actions of shape {tuple(z.shape[:2])}, got "
                             f"{a.dtype} {tuple(a.shape)}")
        if not bool(torch.isfinite(z).all()):
            raise ValueError("start_contexts: expected finite latents, got NaN or inf")
        if int(a.min()) < 0 or int(a.max()) > self.num_actions:
            raise ValueError(f"start_contexts: expected actions in [0, {self.num_actions}], got min {int(a.min())}, "
                             f"max {int(a.max())}")
        self.start_z = z.to(self.device, self.bundle.start_z.dtype, copy=True)  # never the caller's memory
        self.start_a = a.to(self.device, torch.int64, copy=True)

    def seed(self, seed: int | None) -> None:
        """Seed start-context choice (numpy) and all sampling (``torch.Generator``); None draws fresh entropy."""
        if seed is None:
            seed = int(np.random.SeedSequence().generate_state(1, np.uint64)[0] >> np.uint64(1))
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed: expected a non-negative integer or None, got {seed!r}")
        self.rng = np.random.default_rng(int(seed))
        self.generator.manual_seed(int(seed))

    @torch.no_grad()
    def reset_envs(self, mask: np.ndarray | None = None) -> None:
        """Start new episodes from random real start contexts in the envs where ``mask`` (bool ``(N,)``) is True."""
        n_start = self.start_z.shape[0]
        if self.state is None or mask is None:
            idx = torch.as_tensor(self.rng.integers(0, n_start, self.num_envs), device=self.device)
            self.state = self.model.initial_state(self.start_z[idx], self.start_a[idx])
            self.elapsed[:] = 0
        else:
            if not mask.any():
                return
            idx = torch.as_tensor(self.rng.integers(0, n_start, int(mask.sum())), device=self.device)
            fresh = self.model.initial_state(self.start_z[idx], self.start_a[idx])
            m = torch.as_tensor(mask, device=self.device)
            for k, v in fresh.items():
                self.state[k][m] = v
            self.elapsed[mask] = 0
        self._last_z = self.model.latent_history(self.state)[:, -1]

    def check_actions(self, actions: Any) -> torch.Tensor:
        """Validate a batch of actions → int64 tensor ``(N,)``. Raises TypeError/ValueError naming ``actions``."""
        a = np.asarray(actions)
        if a.shape != (self.num_envs,):
            raise ValueError(f"actions: expected shape ({self.num_envs},), got {a.shape}")
        if not np.issubdtype(a.dtype, np.integer):
            raise TypeError(f"actions: expected an integer dtype, got {a.dtype}")
        if a.min() < 0 or a.max() >= self.num_actions:
            raise ValueError(f"actions: expected values in [0, {self.num_actions}), got min {a.min()}, max {a.max()}")
        return torch.as_tensor(a, dtype=torch.int64, device=self.device)

    @torch.no_grad()
    def step(self, actions: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Advance every env one imagined step → ``(reward float32 (N,), terminated bool (N,), truncated bool (N,))``."""
        if self.state is None:
            raise ResetNeeded("step: expected reset() to be called before step()")
        prev, cut, unc, drawn = self.state, None, self.uncertainty, None
        if unc is None:
            self.state, z, reward, term = self.model.step(prev, actions, self.generator)
        else:  # all M draws in one call (one context pass): the first of each env is its step, all M its spread
            state, z, reward, term = self.model.step(prev, actions, self.generator, draws=unc.draws)
            drawn, first = z.view(len(actions), unc.draws, -1), slice(None, None, unc.draws)
            self.state = {k: v[first].contiguous() for k, v in state.items()}
            z, reward, term = z[first].contiguous(), reward[first], term[first]
        if self.resample_rule is not None:
            z, reward, term, cut = self._resample(prev, actions, z, reward, term)
        uncertain = None
        if unc is not None:
            reward, uncertain = unc.apply(reward, drawn=drawn, skip=cut)
        self._last_z = z
        self.elapsed += 1
        terminated = term.cpu().numpy().astype(bool)
        truncated = (self.elapsed >= self.max_episode_steps) & ~terminated
        if cut is not None:
            truncated |= cut
        if uncertain is not None and unc.truncate:
            truncated |= uncertain & ~terminated
        return reward.float().cpu().numpy(), terminated, truncated

    def _rejected(self, history: torch.Tensor, z: torch.Tensor, reward: torch.Tensor, term: torch.Tensor
                  ) -> torch.Tensor:
        bad = torch.as_tensor(self.resample_rule(history, z, reward, term), device=self.device)
        if bad.dtype != torch.bool or tuple(bad.shape) != (len(z),):
            raise ValueError(f"resample_rule: expected a bool mask of shape ({len(z)},), got {bad.dtype} "
                             f"{tuple(bad.shape)}")
        return bad

    def _resample(self, prev: dict, actions: torch.Tensor, z: torch.Tensor, reward: torch.Tensor,
                  term: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray | None]:
        """Redraw the rejected envs' steps (see :meth:`set_resample_rule`): ``max_resamples`` candidates each in one
        batched model call, the first accepted one kept (else the last); updates ``self.state`` in place. Returns
        ``(z, reward, term, cut)``, ``cut`` bool ``(N,)`` where ``truncate_rejected`` undid the step, else None."""
        history, n_draws = self.model.latent_history(prev), self.max_resamples
        bad = self._rejected(history, z, reward, term)
        c = self.resample_counts
        c["steps"] += len(z)
        idx = bad.nonzero().squeeze(1)
        c["rejected"] += len(idx)
        cut = None
        if len(idx):
            rep = idx.repeat_interleave(n_draws)
            state, z2, r2, t2 = self.model.step({k: v[idx] for k, v in prev.items()}, actions[idx], self.generator,
                                                draws=n_draws)  # rows j·n_draws + d: draw d of env idx[j]
            ok = ~self._rejected(history[rep], z2, r2, t2).view(-1, n_draws)
            first = torch.where(ok.any(1), ok.float().argmax(1), torch.full_like(idx, n_draws - 1))
            pick = torch.arange(len(idx), device=self.device) * n_draws + first
            for k, v in state.items():
                self.state[k][idx] = v[pick]
            z[idx], reward[idx], term[idx] = z2[pick], r2[pick], t2[pick]
            lost = ~ok.any(1)
            if self.truncate_rejected and lost.any():  # undo the step: the env stays where it was, and ends
                gone = idx[lost]
                for k, v in prev.items():
                    self.state[k][gone] = v[gone]
                z[gone], reward[gone], term[gone] = history[gone, -1].to(z.dtype), 0.0, False
                cut = np.zeros(len(z), bool)
                cut[gone.cpu().numpy()] = True
            if self.rejected_reward is not None:
                reward[idx[lost]] = self.rejected_reward
            if self.rejection_penalty:
                reward[idx] -= self.rejection_penalty
            c["resampled"] += len(rep)
            c["still_rejected"] += int(lost.sum())
        return z, reward, term, cut

    @torch.no_grad()
    def observe(self, mask: np.ndarray | None = None) -> np.ndarray:
        """Observations of all envs (or of the envs where ``mask`` is True), batched numpy."""
        sel = slice(None) if mask is None else torch.as_tensor(mask, device=self.device)
        if self.obs_type == "pixels":
            return self.model.decode(self._last_z[sel]).cpu().numpy()
        return self.model.latent_history(self.state)[sel].float().clamp(-1.0, 1.0).cpu().numpy()

    @torch.no_grad()
    def frames(self) -> np.ndarray:
        """Decoded newest frames as uint8 HWC ``(N, 64, 64, 3)`` for rendering."""
        return self.model.decode(self._last_z).permute(0, 2, 3, 1).cpu().numpy()


class CoreSamplingSteps:
    """``env.sampling_steps``, ``env.temperature`` and ``env.sampling_shift``: get/set the sampler settings of the
    env's world model (validated by the model; ``temperature`` / ``sampling_shift`` are None for a model without
    one, which accepts no other value)."""

    core: ImaginationCore

    @property
    def sampling_steps(self) -> int:
        return self.core.model.sampling_steps

    @sampling_steps.setter
    def sampling_steps(self, value: int) -> None:
        self.core.model.sampling_steps = value

    @property
    def temperature(self) -> float | None:
        return getattr(self.core.model, "temperature", None)

    @temperature.setter
    def temperature(self, value: float) -> None:
        set_temperature(self.core.model, value)

    @property
    def sampling_shift(self) -> float | None:
        return getattr(self.core.model, "sampling_shift", None)

    @sampling_shift.setter
    def sampling_shift(self, value: float) -> None:
        set_sampling_shift(self.core.model, value)


class DiTWMVectorEnv(CoreSamplingSteps, gym.vector.VectorEnv):
    """## Description
    A learned world model of an Atari game served as a natively batched Gymnasium vector env: every ``step``
    is one batched world-model call for all ``num_envs`` envs (no loop over single envs).

    ## Action Space
    ``MultiDiscrete([A] * num_envs)``; per env ``Discrete(A)``, the game's minimal action set (Pong: 6 —
    NOOP, FIRE, RIGHT (up), LEFT (down), RIGHTFIRE, LEFTFIRE).

    ## Observation Space
    ``obs_type="pixels"``: uint8 ``(num_envs, 3, 64, 64)``, the same format as :func:`dit_envs.make_real_env`.
    ``obs_type="latent"``: float32 ``(num_envs, K, d_z)``, the last ``K`` frozen-encoder latents.

    ## Rewards
    Predicted by the bundle's reward head (Pong: ±1 when a point is scored, else 0).

    ## Starting State
    A context of ``K`` real encoded frames drawn uniformly from the bundle's start contexts, or from
    ``start_contexts`` when given.

    ## Episode End
    ``terminated`` when the termination head fires (Pong: a player reaches 21); ``truncated`` after
    ``max_episode_steps`` steps, or where a resample rule undid a step (``core.set_resample_rule``'s
    ``truncate_rejected``). Autoreset SAME_STEP (default): the returned observation of an ended env is the
    first of its next episode, ``info["final_obs"]`` / ``info["final_info"]`` (object arrays, masks
    ``info["_final_obs"]``) hold the ended episode's last ones. NEXT_STEP: the step after the end resets.

    ## Arguments
    ``num_envs``; ``checkpoint`` (bundle directory, ``hf://org/repo@<commit>``, ``bundled:<name>``; default: the
    id's catalog entry); ``obs_type``; ``max_episode_steps``; ``sampling_steps`` (denoising steps per env step,
    default from the bundle); ``temperature`` (standard deviation of the sampler's initial noise, default from
    the bundle; lower is more faithful and less diverse, 0 deterministic); ``sampling_shift`` (time shift of the
    sampler's steps, default from the bundle: > 1 spends more of them at high noise, see
    :attr:`~dit_envs.models.dit_world_model.DiTWorldModel.sampling_shift`); ``start_contexts`` (``(z (M, K, d_z),
    prev_action (M, K))`` real contexts to start episodes from instead of the bundle's, e.g. the agent's replay
    buffer); ``device``; ``dtype`` (float dtype of the model: float32 by default; ``"auto"`` runs bfloat16 where
    matmuls are native in it, AMX CPUs and bf16 GPUs, :func:`~dit_envs.envs.loading.fast_dtype`); ``render_mode``
    (``"rgb_array"``); ``autoreset_mode``; ``allow_unpinned`` (accept a Hub branch instead of a commit).

    ## Version History
    * v0: initial release.

    >>> import gymnasium as gym, dit_envs  # doctest: +SKIP
    >>> envs = gym.make_vec("DiTWM/Pong-v0", num_envs=4)  # doctest: +SKIP
    >>> envs.reset(seed=0)[0].shape  # doctest: +SKIP
    (4, 3, 64, 64)
    """

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP, "render_modes": ["rgb_array"], "render_fps": 15}

    def __init__(self, num_envs: int = 1, *, env_id: str | None = None, checkpoint: Any = None,
                 obs_type: str = "pixels", max_episode_steps: int | None = None, sampling_steps: int | None = None,
                 temperature: float | None = None, sampling_shift: float | None = None,
                 start_contexts: tuple[Any, Any] | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
                 render_mode: str | None = None, autoreset_mode: AutoresetMode | str = AutoresetMode.SAME_STEP,
                 allow_unpinned: bool = False, **expect: Any) -> None:
        bundle, horizon = load_for_env(env_id, checkpoint, device=device, dtype=dtype,
                                       sampling_steps=sampling_steps, temperature=temperature,
                                       sampling_shift=sampling_shift, allow_unpinned=allow_unpinned, **expect)
        self.core = ImaginationCore(bundle, num_envs, obs_type,
                                    horizon if max_episode_steps is None else max_episode_steps, start_contexts)
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode: expected None or 'rgb_array', got {render_mode!r}")
        try:
            mode = AutoresetMode(autoreset_mode)
        except ValueError:
            raise ValueError(f"autoreset_mode: expected SAME_STEP or NEXT_STEP, got {autoreset_mode!r}") from None
        if mode not in (AutoresetMode.SAME_STEP, AutoresetMode.NEXT_STEP):
            raise ValueError(f"autoreset_mode: expected SAME_STEP or NEXT_STEP, got {mode}")
        self.metadata = {**type(self).metadata, "autoreset_mode": mode}
        self.num_envs, self.render_mode, self.bundle = self.core.num_envs, render_mode, bundle
        self.single_observation_space = self.core.single_observation_space
        self.single_action_space = self.core.single_action_space
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self._autoreset = np.zeros(self.num_envs, bool)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is not None or self.core.state is None:
            self.core.seed(seed)
        self.core.reset_envs()
        self._autoreset[:] = False
        return self.core.observe(), {}

    def step(self, actions):
        a = self.core.check_actions(actions)
        if self.core.state is None:
            raise ResetNeeded("step: expected reset() to be called before step()")
        if self.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP and self._autoreset.any():
            return self._step_next_step(a)
        reward, terminated, truncated = self.core.step(a)
        done = terminated | truncated
        info: dict[str, Any] = {}
        if self.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP:
            self._autoreset = done
            return self.core.observe(), reward, terminated, truncated, info
        if done.any():
            final = self.core.observe(done)
            final_obs = np.full(self.num_envs, None, dtype=object)
            final_obs[np.flatnonzero(done)] = list(final)
            final_info = np.full(self.num_envs, None, dtype=object)
            final_info[np.flatnonzero(done)] = [{} for _ in range(int(done.sum()))]
            info.update(final_obs=final_obs, _final_obs=done.copy(), final_info=final_info, _final_info=done.copy())
            self.core.reset_envs(done)
        return self.core.observe(), reward, terminated, truncated, info

    def _step_next_step(self, a: torch.Tensor):
        """NEXT_STEP: envs that ended last step are reset (their action ignored); the others step."""
        ended = self._autoreset.copy()
        reward, terminated, truncated = self.core.step(a)  # batched; ended envs' transitions are discarded
        self.core.reset_envs(ended)
        reward[ended], terminated[ended], truncated[ended] = 0.0, False, False
        self._autoreset = terminated | truncated
        return self.core.observe(), reward, terminated, truncated, {}

    def render(self):
        if self.render_mode != "rgb_array":
            return None
        return self.core.frames()

    def close(self, **kwargs: Any) -> None:
        self.core.state = None
