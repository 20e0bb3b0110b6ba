"""Building blocks of :class:`~dit_envs.models.dit.DiT`: sinusoidal noise-level features, adaLN modulation and the
transformer block with adaLN-Zero conditioning (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers"),
causal or, for streaming students, sliding-window attention (:mod:`dit_envs.models.attention`)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dit_envs.models.attention import window_attention


def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of noise levels (DiT's ``TimestepEmbedder`` on ``1000·t``).

    Args:
        t: float ``(...)`` in ``[0, 1]``.
        dim: feature size.
    Returns:
        float32 ``(..., dim)``.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (1000.0 * t.float())[..., None] * freqs  # (..., half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation ``x·(1 + scale) + shift`` (all ``(B, T, D)``: per-token, not per-sequence)."""
    return x * (1.0 + scale) + shift


class DiTBlock(nn.Module):
    """Pre-LN transformer block with adaLN-Zero conditioning and causal self-attention (Peebles & Xie 2023); with
    ``window = W > 0`` (streaming) sliding-window attention over the token and the ``W − 1`` before it
    (:func:`~dit_envs.models.attention.window_attention`), relative embeddings ``rel_k``, ``rel_v`` float ``(W, width)``
    zero-initialised. With ``frame_tokens = G > 1`` (spatial tokens, ``G`` per time step) attention is block-causal:
    a token sees every token of its own time step and of the earlier ones (a frame-level causal mask)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, window: int = 0, frame_tokens: int = 1) -> None:
        super().__init__()
        self.heads, self.window, self.frame_tokens = heads, window, frame_tokens
        if window:  # streaming: relative position embeddings of keys and values (zero: none yet)
            self.rel_k = nn.Parameter(torch.zeros(window, width))
            self.rel_v = nn.Parameter(torch.zeros(window, width))
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(
        self, x: torch.Tensor, c: torch.Tensor | None, past: tuple[torch.Tensor, torch.Tensor] | None = None,
        mod: torch.Tensor | None = None, key_valid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Tokens ``x`` and conditioning ``c``, both ``(B, T, D)``; ``past`` = cached ``(k, v)`` of earlier tokens;
        ``mod`` = precomputed ``adaLN_modulation(c)`` ``(B, T, 6D)`` (then ``c`` is unused); ``key_valid`` bool
        ``(B, P + T)`` marks padding keys of a windowed (streaming) block.

        Returns ``(x_out (B, T, D), (k, v))`` with ``k, v`` ``(B, heads, T, D/heads)`` of these ``T`` tokens.
        """
        B, T, D = x.shape
        mod = self.adaLN_modulation(c) if mod is None else mod  # (B, T, 6D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        h = modulate(self.norm1(x), shift_msa, scale_msa)  # (B, T, D)
        q, k, v = self.qkv(h).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, T, D/H)
        P = 0 if past is None else past[0].shape[2]
        k_all, v_all = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))  # P+T
        if self.window:
            a = window_attention(q, k_all, v_all, self.rel_k, self.rel_v, offset=P, key_valid=key_valid)
        elif past is None and self.frame_tokens == 1:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D/H)
        elif T == self.frame_tokens and P % T == 0:  # one time step after whole ones (a sampler step): sees every key
            a = F.scaled_dot_product_attention(q, k_all, v_all)  # (B, H, T, D/H)
        else:  # token i (key index P + i) sees the keys of its own time step and earlier ones
            step = torch.arange(P + T, device=x.device) // self.frame_tokens  # (P+T,) time step of each key
            mask = step[None] <= step[P:, None]  # (T, P+T); G = 1: tril(diagonal=P)
            a = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)  # (B, H, T, D/H)
        x = x + gate_msa * self.proj(a.transpose(1, 2).reshape(B, T, D))  # (B, T, D)
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (B, T, D)
        return x, (k, v)

    def keys_values(self, x: torch.Tensor, mod: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Only the ``(k, v)`` of :meth:`forward` (``(B, heads, T, D/heads)`` each) for tokens ``x`` ``(B, T, D)``
        with precomputed modulation ``mod`` ``(B, T, 6D)`` — what the last block of a context pass needs: its
        queries, attention output and MLP would feed no later layer."""
        B, T, D = x.shape
        shift_msa, scale_msa = mod[..., :D], mod[..., D : 2 * D]
        h = modulate(self.norm1(x), shift_msa, scale_msa)  # (B, T, D)
        kv = F.linear(h, self.qkv.weight[D:], self.qkv.bias[D:])  # (B, T, 2D)
        k, v = kv.view(B, T, 2, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, T, D/H)
        return k, v
