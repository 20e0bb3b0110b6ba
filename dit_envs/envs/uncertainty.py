"""Draw disagreement: the uncertainty of a sampled world model's imagined step, and a pessimistic penalty on it.

A diffusion (or any sampled) world model gives a distribution over the next latent, not one latent. Drawn ``M``
times from the same state and action, its draws agree where the model knows what comes next and spread where it
does not. Atari under the Atari-100k protocol (no sticky actions) is deterministic, so the spread is the model's
own uncertainty, not the game's noise. On held-out real Pong contexts, the one-step spread of 8 draws of the shipped
model ranks the error of their mean with a Spearman correlation of 0.88 (README, results).

:class:`UncertaintyPenalty` turns the spread into a pessimistic reward, as model-based offline RL does with the
disagreement of an ensemble. MOReL (Kidambi et al. 2020) penalises the state-actions whose disagreement passes a
threshold, MOPO (Yu et al. 2020) subtracts an uncertainty estimate from the reward. Here the draws of the one model
stand in for the ensemble: a step whose spread passes a threshold, calibrated on real start contexts, costs a fixed
penalty. A policy trained in imagination is steered away from the states where the model does not know the game,
which are where it would otherwise find rewards the real game does not give.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dit_envs.models.world_model import check_draws

State = dict[str, torch.Tensor]


@torch.no_grad()
def draw_spread(model: Any, state: State, actions: torch.Tensor, draws: int, generator: torch.Generator,
                first: torch.Tensor | None = None) -> torch.Tensor:
    """Spread of ``draws`` next latents drawn from the same states and actions.

    Args:
        model: a world model with ``step(state, actions, generator, draws=M) -> (state, z, reward, terminated)``
            (:class:`~dit_envs.models.world_model.WorldModel`: ``M`` draws per env, rows ``i·M + j``).
        state: the model's state of ``N`` envs (tensors with leading ``N``); not modified.
        actions: int64 ``(N,)``.
        draws: ``M >= 2`` draws in all; with ``first`` (one draw already made, e.g. the env's kept step), ``M - 1``
            fresh ones are made, in one batched call of ``N·(M - 1)`` steps.
        generator: the sampling generator.
        first: float ``(N, d_z)`` or None.
    Returns:
        float32 ``(N,)``: the per-element variance across the ``M`` draws (unbiased), averaged over ``d_z``, in
        squared latent units.
    Raises:
        ValueError: ``draws`` not an integer >= 2.
    """
    fresh = check_draws(draws, 2) - (first is not None)
    _, z, _, _ = model.step(state, actions, generator, draws=fresh)  # rows i·fresh + j
    z = z.float().view(len(actions), fresh, -1)
    if first is not None:
        z = torch.cat([first.float()[:, None], z], dim=1)
    return spread_of(z)


def spread_of(drawn: torch.Tensor) -> torch.Tensor:
    """float ``(N, M, d_z)`` draws → float32 ``(N,)``: their per-element variance across the ``M`` (unbiased),
    averaged over ``d_z``, in squared latent units."""
    return drawn.float().var(dim=1).mean(dim=1)


def check_quantile(quantile: float) -> None:
    """Raise ValueError naming ``quantile`` unless it is a number in ``(0, 1)``."""
    if isinstance(quantile, bool) or not isinstance(quantile, (int, float, np.number)) or not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile: expected a number in (0, 1), got {quantile!r}")


@torch.no_grad()
def calibrate_threshold(model: Any, start_z: torch.Tensor, start_a: torch.Tensor, quantile: float, draws: int,
                        num_actions: int, seed: int = 0, contexts: int = 1024, chunk: int = 256) -> float:
    """The ``quantile`` of the draw spread over one step from real start contexts, with uniform random actions.

    Args:
        model: the world model (see :func:`draw_spread`), with ``initial_state(z, prev_action)``.
        start_z: float ``(S, K, d_z)`` real contexts; start_a: int64 ``(S, K)`` the actions that led to them.
        quantile: in ``(0, 1)``; draws: ``M >= 2``; num_actions: the game's ``A``.
        seed: seed of the context choice, the actions and the draws (the env's own generator is not used, so
            calibrating does not change the env's random stream); contexts: at most this many contexts;
            chunk: contexts per batched call.
    Returns:
        The threshold, in squared latent units (:func:`draw_spread`).
    Raises:
        ValueError: ``quantile`` outside ``(0, 1)``; ``draws`` < 2; no start context, or ``contexts`` / ``chunk`` < 1.
    """
    check_quantile(quantile)
    if len(start_z) < 1 or contexts < 1 or chunk < 1:
        raise ValueError(f"start_z: expected >= 1 context (and contexts, chunk >= 1), got {len(start_z)} contexts, "
                         f"contexts={contexts}, chunk={chunk}")
    rng = np.random.default_rng(seed)
    pick = torch.as_tensor(rng.permutation(len(start_z))[:contexts], device=start_z.device)
    actions = torch.as_tensor(rng.integers(0, num_actions, len(pick)), device=start_z.device)
    gen = torch.Generator(device=start_z.device).manual_seed(seed)
    spreads = []
    for i in range(0, len(pick), chunk):
        idx = pick[i:i + chunk]
        state = model.initial_state(start_z[idx], start_a[idx])
        spreads.append(draw_spread(model, state, actions[i:i + chunk], draws, gen))
    return float(torch.quantile(torch.cat(spreads), float(quantile)))


class UncertaintyPenalty:
    """A fixed reward penalty on imagined steps whose draw spread passes a threshold (MOReL/MOPO-style), and/or the
    end of their imagined episode there.

    Args:
        penalty: reward units subtracted from an uncertain step's reward, a finite number >= 0 (> 0 without
            ``truncate``).
        draws: ``M >= 2`` draws per step, made in one model call from one context pass (the first is the env's
            step): at 64 envs and 4 sampling steps, 4 draws cost about 2.3 single steps.
        threshold: spread (squared latent units, :func:`draw_spread`) above which a step is uncertain, >= 0.
        truncate: an uncertain step (not a terminal one) also truncates its episode, so a learner bootstraps from
            its critic there instead of learning from what the model imagines after it (model-based RL's
            truncation at unreliable model states, e.g. MBPO, Janner et al. 2019; MOReL's halting). The step is
            kept: ``final_obs`` is the uncertain successor, the learner bootstraps from it (unlike Pong's
            ``truncate_rejected``, which undoes a broken step).
    Raises:
        ValueError: a value out of range, naming the parameter.

    ``counts`` holds the steps seen, the uncertain ones and the sum of their spreads since the last reset.
    """

    def __init__(self, penalty: float, draws: int, threshold: float, truncate: bool = False) -> None:
        if not isinstance(truncate, (bool, np.bool_)):
            raise ValueError(f"truncate: expected a bool, got {truncate!r}")
        low = ">= 0" if truncate else "> 0"
        for name, v, ok in (("penalty", penalty, lambda x: x > 0 or (truncate and x == 0)),
                            ("threshold", threshold, lambda x: x >= 0)):
            if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not np.isfinite(v) or not ok(v):
                raise ValueError(f"{name}: expected a finite number {low if name == 'penalty' else '>= 0'}, "
                                 f"got {v!r}")
        self.penalty, self.draws, self.threshold = float(penalty), check_draws(draws, 2), float(threshold)
        self.truncate = bool(truncate)
        self.counts = {"steps": 0, "uncertain": 0, "spread_sum": 0.0}

    def apply(self, reward: torch.Tensor, drawn: torch.Tensor, skip: np.ndarray | None = None
              ) -> tuple[torch.Tensor, np.ndarray]:
        """Where the spread of a step's ``drawn`` draws (float ``(N, draws, d_z)``, made in one model call as
        :meth:`ImaginationCore.step` does) passes the threshold → ``(reward with the penalty taken off there,
        uncertain bool (N,) numpy)``; ``reward`` float ``(N,)`` is not modified. ``skip`` (bool ``(N,)``): steps
        neither charged nor counted (e.g. undone ones).

        Raises:
            ValueError: ``drawn`` not of shape ``(N, draws, d_z)``.
        """
        if drawn.ndim != 3 or tuple(drawn.shape[:2]) != (len(reward), self.draws):
            raise ValueError(f"drawn: expected shape ({len(reward)}, {self.draws}, d_z), got {tuple(drawn.shape)}")
        spread = spread_of(drawn)
        if skip is not None:
            keep = ~torch.as_tensor(skip, device=spread.device)
            spread = torch.where(keep, spread, torch.zeros_like(spread))
        uncertain = spread > self.threshold
        mask = uncertain.cpu().numpy()  # one device transfer for the counts and the caller
        c = self.counts
        c["steps"] += len(mask) - (0 if skip is None else int(np.asarray(skip).sum()))
        c["uncertain"] += int(mask.sum())
        c["spread_sum"] += float(spread.sum())
        if self.penalty:
            reward = reward - self.penalty * uncertain.to(reward.dtype)
        return reward, mask

    def rates(self) -> dict[str, float]:
        """``{"uncertain_rate", "spread_mean"}`` since the last call (``{}`` without steps); resets the counts."""
        c = self.counts
        if not c["steps"]:
            return {}
        out = {"uncertain_rate": c["uncertain"] / c["steps"], "spread_mean": c["spread_sum"] / c["steps"]}
        self.counts = {"steps": 0, "uncertain": 0, "spread_sum": 0.0}
        return out


def build_penalty(model: Any, start_z: torch.Tensor, start_a: torch.Tensor, num_actions: int, penalty: float,
                  draws: int = 4, quantile: float = 0.9, threshold: float | None = None,
                  truncate: bool = False) -> UncertaintyPenalty | None:
    """Validate the settings and build the :class:`UncertaintyPenalty` of an env (None when off: ``penalty`` 0
    without ``truncate``), its threshold calibrated by :func:`calibrate_threshold` when ``threshold`` is None.

    Args:
        model, start_z, start_a, num_actions: as :func:`calibrate_threshold` takes them (the env's model and its
            start contexts); penalty, draws, threshold, truncate: as :class:`UncertaintyPenalty` takes them;
            quantile: in ``(0, 1)``, checked whenever the penalty is on.
    Raises:
        ValueError: a value out of range, naming the parameter (``penalty``, ``truncate``, ``draws``, ``quantile``,
            ``threshold``), before any model call.
    """
    if isinstance(penalty, bool) or not isinstance(penalty, (int, float, np.number)) or not np.isfinite(penalty) \
            or penalty < 0:
        raise ValueError(f"penalty: expected a finite number >= 0, got {penalty!r}")
    if not isinstance(truncate, (bool, np.bool_)):
        raise ValueError(f"truncate: expected a bool, got {truncate!r}")
    if not penalty and not truncate:
        return None
    unc = UncertaintyPenalty(penalty, draws, 0.0 if threshold is None else threshold, bool(truncate))
    check_quantile(quantile)  # every setting is checked before the calibration's model calls
    if threshold is None:
        unc.threshold = calibrate_threshold(model, start_z, start_a, quantile, draws, num_actions)
    return unc
