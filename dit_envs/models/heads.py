"""Reward and termination head of a latent transition ``(z_t, a_t, z_{t+1})``.

Reward is a classification over two-hot symlog bins (DreamerV3, Hafner et al. 2023), termination a Bernoulli
logit. In Pong the reward is ±1 when a point is scored and 0 otherwise, and the episode terminates when a side
reaches 21 points — both are visible in the transition between the two frames.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dit_envs.models.distributions import TwoHotSymlog, symexp


@dataclass
class HeadsConfig:
    """Sizes of :class:`RewardTermHead` (saved inside every bundle as plain JSON).

    Attributes:
        latent_dim: ``d_z``.
        num_actions: size of the action set (the action enters one-hot).
        hidden: MLP width.
        layers: hidden layers (Linear → LayerNorm → SiLU each).
        num_bins, low, high: :class:`TwoHotSymlog` bins; the range must be symmetric and ``num_bins`` odd so
            that one bin is exactly 0 (needed by the ``"event"`` reward decoding).
    Raises:
        ValueError: sizes < 1 or bins without an exact zero bin.
    """

    latent_dim: int
    num_actions: int
    hidden: int = 256
    layers: int = 2
    num_bins: int = 255
    low: float = -20.0
    high: float = 20.0

    def __post_init__(self) -> None:
        for name in ("latent_dim", "num_actions", "hidden", "layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.num_bins % 2 == 0 or self.low != -self.high:
            raise ValueError(
                f"num_bins/low/high: expected odd num_bins and low == -high (a bin at exactly 0), "
                f"got num_bins={self.num_bins}, low={self.low}, high={self.high}"
            )


class RewardTermHead(nn.Module):
    """MLP on ``concat(z_t, onehot(a_t), z_{t+1})`` → reward logits over two-hot symlog bins + termination logit.

    Latents are the raw frozen-autoencoder latents (not the world model's normalised ones). Inputs may have any
    leading dims ``(...)``, e.g. ``(N,)`` or ``(B, T)``. The output weights start at zero (DreamerV3) with a bias
    that gives the zero-reward bin probability just above 1/2, so a fresh head predicts reward 0 and never
    terminates.

    Args:
        config: :class:`HeadsConfig`.
    """

    def __init__(self, config: HeadsConfig) -> None:
        super().__init__()
        self.config = config
        self.twohot = TwoHotSymlog(config.num_bins, config.low, config.high)
        self.zero_bin = config.num_bins // 2
        layers: list[nn.Module] = []
        width = 2 * config.latent_dim + config.num_actions
        for _ in range(config.layers):
            layers += [nn.Linear(width, config.hidden), nn.LayerNorm(config.hidden), nn.SiLU()]
            width = config.hidden
        self.mlp = nn.Sequential(*layers)
        self.out = nn.Linear(width, config.num_bins + 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        with torch.no_grad():  # prior P(reward = 0) slightly above 1/2: sparse rewards, "event" decode gives 0
            self.out.bias[self.zero_bin] = math.log(config.num_bins)

    def forward(
        self, z: torch.Tensor, action: torch.Tensor, z_next: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of one transition.

        Args:
            z: float ``(..., d_z)`` latent at time t.
            action: int64 ``(...)`` in ``[0, num_actions)``, taken at time t.
            z_next: float ``(..., d_z)`` latent at time t+1.
        Returns:
            ``(reward_logits (..., num_bins), term_logit (...))`` in the model dtype.
        """
        dtype = self.out.weight.dtype
        a = F.one_hot(action, self.config.num_actions).to(dtype)
        h = self.mlp(torch.cat([z.to(dtype), a, z_next.to(dtype)], dim=-1))  # (..., hidden)
        out = self.out(h)  # (..., num_bins + 1)
        return out[..., :-1], out[..., -1]

    def loss(
        self,
        z: torch.Tensor,
        action: torch.Tensor,
        z_next: torch.Tensor,
        reward: torch.Tensor,
        terminated: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Two-hot cross-entropy of the reward plus binary cross-entropy of termination.

        Args:
            z, action, z_next: as in :meth:`forward`, leading dims ``(...)``.
            reward: float ``(...)`` raw (unclipped) reward of the transition.
            terminated: bool or float ``(...)``.
            mask: optional ``(...)``; only masked-in transitions count.
        Returns:
            ``(loss scalar, metrics)`` with ``loss``, ``reward_loss``, ``term_loss``, ``reward_mae`` (of the
            expected reward) and ``term_acc``.
        """
        r_logits, t_logit = self(z, action, z_next)
        r_loss = self.twohot.loss(r_logits.float(), reward.float())  # (...)
        term = terminated.float()
        t_loss = F.binary_cross_entropy_with_logits(t_logit.float(), term, reduction="none")  # (...)
        m = torch.ones_like(r_loss) if mask is None else mask.float()
        denom = m.sum().clamp(min=1.0)
        r_mean, t_mean = (r_loss * m).sum() / denom, (t_loss * m).sum() / denom
        loss = r_mean + t_mean
        with torch.no_grad():
            mae = ((self.twohot.mean(r_logits.float()) - reward.float()).abs() * m).sum() / denom
            acc = (((t_logit > 0).float() == term).float() * m).sum() / denom
        metrics = {
            "loss": loss.item(),
            "reward_loss": r_mean.item(),
            "term_loss": t_mean.item(),
            "reward_mae": mae.item(),
            "term_acc": acc.item(),
        }
        return loss, metrics

    @torch.no_grad()
    def predict(
        self, z: torch.Tensor, action: torch.Tensor, z_next: torch.Tensor, *, reward_decode: str = "event"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reward and termination of transitions, deterministically.

        ``reward_decode="event"`` (default): the reward is exactly 0 when the head gives the zero bin
        probability ≥ 0.5, otherwise the expected reward given that it is non-zero,
        ``symexp(Σ p_j·b_j / (1 − p_0))`` — so sparse games like Pong emit clean 0 / ±1 events rather than a
        small expected reward on every step. ``"mean"``: DreamerV3's expected value ``symexp(Σ p_j·b_j)``.
        Terminated is ``sigmoid(logit) > 0.5``.

        Args:
            z, action, z_next: as in :meth:`forward`.
            reward_decode: ``"event"`` or ``"mean"``.
        Returns:
            ``(reward float32 (...), terminated bool (...))``.
        Raises:
            ValueError: unknown ``reward_decode``.
        """
        r_logits, t_logit = self(z, action, z_next)
        p = r_logits.float().softmax(-1)  # (..., num_bins)
        y = (p * self.twohot.bins.float()).sum(-1)  # (...) expected symlog reward
        if reward_decode == "event":
            p0 = p[..., self.zero_bin]
            y_nz = y - p0 * self.twohot.bins[self.zero_bin].float()  # linspace puts the middle bin at ~1e-7
            reward = torch.where(p0 < 0.5, symexp(y_nz / (1.0 - p0).clamp(min=1e-6)), torch.zeros_like(y))
        elif reward_decode == "mean":
            reward = symexp(y)
        else:
            raise ValueError(f"reward_decode: expected 'event' or 'mean', got {reward_decode!r}")
        return reward.float(), t_logit > 0
