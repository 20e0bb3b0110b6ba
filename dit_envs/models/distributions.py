"""Symlog transform and the two-hot symlog distribution of DreamerV3 (Hafner et al. 2023, §"Robust predictions").

Used by every reward head (RSSM and DiT) and by the critic, so that returns of any scale are learned with a
classification loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def symlog(x: torch.Tensor) -> torch.Tensor:
    """``sign(x)·log(1+|x|)``, elementwise, any shape and float dtype."""
    return torch.sign(x) * torch.log1p(x.abs())


def symexp(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`symlog`: ``sign(x)·(exp(|x|)−1)``."""
    return torch.sign(x) * torch.expm1(x.abs())


class TwoHotSymlog(torch.nn.Module):
    """Two-hot encoding over ``num_bins`` equally spaced bins in symlog space (DreamerV3).

    Args:
        num_bins: number of bins (DreamerV3: 255).
        low, high: bin range in symlog space (DreamerV3: −20, 20).
    Raises:
        ValueError: ``num_bins`` < 2 or ``low`` ≥ ``high``.
    """

    def __init__(self, num_bins: int = 255, low: float = -20.0, high: float = 20.0) -> None:
        super().__init__()
        if num_bins < 2:
            raise ValueError(f"num_bins: expected >= 2, got {num_bins}")
        if low >= high:
            raise ValueError(f"low/high: expected low < high, got low={low}, high={high}")
        self.num_bins = num_bins
        self.register_buffer("bins", torch.linspace(low, high, num_bins), persistent=False)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Targets ``(...)`` float → two-hot probabilities ``(..., num_bins)`` in symlog space."""
        y = symlog(x).clamp(self.bins[0], self.bins[-1])
        idx = torch.bucketize(y, self.bins).clamp(1, self.num_bins - 1)  # right bin index
        lo, hi = self.bins[idx - 1], self.bins[idx]
        w_hi = ((y - lo) / (hi - lo)).clamp(0.0, 1.0)
        out = torch.zeros(*y.shape, self.num_bins, dtype=y.dtype, device=y.device)
        out.scatter_(-1, (idx - 1).unsqueeze(-1), (1.0 - w_hi).unsqueeze(-1))
        out.scatter_add_(-1, idx.unsqueeze(-1), w_hi.unsqueeze(-1))
        return out

    def mean(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits ``(..., num_bins)`` → expected value ``(...)`` in the original (symexp) space."""
        return symexp((logits.softmax(-1) * self.bins).sum(-1))

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of logits ``(..., num_bins)`` against two-hot targets of ``target (...)``; shape ``(...)``."""
        return -(self.encode(target) * F.log_softmax(logits, -1)).sum(-1)
