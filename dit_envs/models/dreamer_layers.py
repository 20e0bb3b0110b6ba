"""Building blocks shared by the DreamerV3 RSSM (``rssm.py``) and the actor-critic (``trainers/agent.py``).

Source: Hafner et al. 2023, "Mastering Diverse Domains through World Models" (DreamerV3), §2 and appendix B:
MLPs with LayerNorm + SiLU, a LayerNorm GRU, categorical distributions mixed with 1% uniform ("unimix"),
straight-through one-hot samples, and the KL between factorised categoricals used by the KL balancing loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """``layers`` × (Linear without bias → LayerNorm → SiLU), then an optional Linear output layer.

    Args:
        in_dim: input features.
        out_dim: output features, or ``None`` for no output layer (the output is then ``hidden`` wide).
        hidden: width of the hidden layers.
        layers: number of hidden layers (0 gives a single Linear ``in_dim → out_dim``).
        zero_init_out: zero the output layer, so a fresh head predicts exactly zero logits (DreamerV3 does this
            for the reward head and the critic, so early predictions are 0 and not large random values).
    Shapes: ``(..., in_dim) → (..., out_dim or hidden)``.
    Raises:
        ValueError: ``layers`` < 0, or ``layers`` = 0 with ``out_dim=None``.
    """

    def __init__(self, in_dim: int, out_dim: int | None, hidden: int, layers: int,
                 zero_init_out: bool = False) -> None:
        super().__init__()
        if layers < 0:
            raise ValueError(f"layers: expected >= 0, got {layers}")
        if layers == 0 and out_dim is None:
            raise ValueError("out_dim: expected an int when layers == 0, got None")
        mods: list[nn.Module] = []
        dim = in_dim
        for _ in range(layers):
            mods += [nn.Linear(dim, hidden, bias=False), nn.LayerNorm(hidden), nn.SiLU()]
            dim = hidden
        if out_dim is not None:
            out = nn.Linear(dim, out_dim)
            if zero_init_out:
                nn.init.zeros_(out.weight)
                nn.init.zeros_(out.bias)
            mods.append(out)
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (..., out_dim)


class LayerNormGRUCell(nn.Module):
    """GRU cell with LayerNorm on the gate pre-activations and an update-gate bias of −1 (DreamerV2/V3).

    The bias makes a fresh cell keep most of its previous state (update gate ≈ 0.27), which stabilises long
    sequences early in training.

    Args:
        input_size: features of ``x``.
        hidden_size: features of ``h``.
        update_bias: added to the update-gate pre-activation.
    Shapes: ``x (B, input_size)``, ``h (B, hidden_size)`` → new ``h (B, hidden_size)``.
    """

    def __init__(self, input_size: int, hidden_size: int, update_bias: float = -1.0) -> None:
        super().__init__()
        self.linear = nn.Linear(input_size + hidden_size, 3 * hidden_size, bias=False)
        self.norm = nn.LayerNorm(3 * hidden_size)
        self.update_bias = update_bias

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        gates = self.norm(self.linear(torch.cat([x, h], -1)))  # (B, 3H)
        reset, cand, update = gates.float().chunk(3, -1)  # (B, H) each
        reset = torch.sigmoid(reset)
        cand = torch.tanh(reset * cand)
        update = torch.sigmoid(update + self.update_bias)
        return update * cand + (1.0 - update) * h.float()  # (B, H)


def unimix_logits(raw: torch.Tensor, unimix: float = 0.01) -> torch.Tensor:
    """Mix a categorical with ``unimix`` of the uniform distribution; return the mixture's log-probabilities.

    ``p = (1 − unimix)·softmax(raw) + unimix / C`` along the last axis (DreamerV3: 1%), so no class ever has
    probability below ``unimix / C`` and KL / log-prob terms stay bounded.

    Args:
        raw: unnormalised logits ``(..., C)``, any float dtype (computed in float32).
        unimix: mixing weight in ``[0, 1)``.
    Returns:
        float32 ``(..., C)`` log-probabilities (usable as logits: ``softmax`` of them gives back ``p``).
    Raises:
        ValueError: ``unimix`` outside ``[0, 1)``.
    """
    if not 0.0 <= unimix < 1.0:
        raise ValueError(f"unimix: expected a value in [0, 1), got {unimix}")
    probs = raw.float().softmax(-1)
    if unimix > 0.0:
        probs = (1.0 - unimix) * probs + unimix / raw.shape[-1]
    return torch.log(probs)


def sample_onehot(logits: torch.Tensor, generator: torch.Generator | None = None,
                  straight_through: bool = True) -> torch.Tensor:
    """One-hot sample of a categorical along the last axis, with straight-through gradients.

    The forward value is an exact one-hot; with ``straight_through`` its gradient is that of the probabilities
    (``onehot + p − sg(p)``, Bengio et al. 2013, as used by DreamerV2/V3).

    Args:
        logits: ``(..., C)`` logits or log-probabilities.
        generator: ``torch.Generator`` on ``logits.device``; the sample is reproducible for a seeded one.
    Returns:
        float32 ``(..., C)`` one-hot vectors.
    """
    probs = logits.float().softmax(-1)
    flat = probs.reshape(-1, probs.shape[-1])
    idx = torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
    onehot = F.one_hot(idx, probs.shape[-1]).to(probs.dtype)
    # Parenthesised so the forward value is exactly one-hot: (p − sg(p)) is exactly 0 in floating point.
    return onehot + (probs - probs.detach()) if straight_through else onehot


def mode_onehot(logits: torch.Tensor) -> torch.Tensor:
    """Most likely class as a float32 one-hot ``(..., C)`` (no gradient)."""
    return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()


def categorical_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """``KL(p ‖ q)`` of factorised categoricals, summed over the last two axes (variables and classes).

    Args:
        p_logits, q_logits: ``(..., S, C)`` logits of ``S`` independent categoricals with ``C`` classes.
    Returns:
        float32 ``(...)`` KL in nats.
    Raises:
        ValueError: the shapes differ.
    """
    if p_logits.shape != q_logits.shape:
        raise ValueError(f"q_logits: expected shape {tuple(p_logits.shape)}, got {tuple(q_logits.shape)}")
    logp = p_logits.float().log_softmax(-1)
    logq = q_logits.float().log_softmax(-1)
    return (logp.exp() * (logp - logq)).sum((-2, -1))


def categorical_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of the categorical(s) along the last axis: ``(..., C) → (...)`` float32."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)
