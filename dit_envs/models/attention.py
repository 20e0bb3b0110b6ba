"""Sliding-window self-attention with learned relative position embeddings, for streaming DiT students.

A streaming DiT (``DiTConfig.streaming``) lets every token attend to itself and the ``W − 1`` tokens before it, with
no absolute position in the keys and values: the position of a key relative to its query enters as learned
embeddings added to the key and the value (Shaw et al. 2018, "Self-Attention with Relative Position
Representations"; the windowed form of Longformer / Mistral's sliding-window attention). A token's keys and values
then never change once computed, so an env can keep a rolling per-layer cache and pay one token per env step for
its context instead of re-encoding the whole window (Transformer-XL's segment recurrence, Dai et al. 2019).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_k: torch.Tensor, rel_v: torch.Tensor,
                     *, offset: int = 0, key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of ``T`` queries over keys at relative offsets ``0 .. W − 1`` (the query itself and ``W − 1`` keys
    before it), logits ``q·(k_j + rel_k[i − j]) / √d_h`` and output ``Σ_j p_ij (v_j + rel_v[i − j])``.

    Args:
        q: float ``(B, H, T, d_h)`` queries; query ``i`` sits at key index ``offset + i``.
        k, v: float ``(B, H, P + T, d_h)`` keys and values of ``P = offset`` earlier tokens (e.g. a cache) followed
            by the queries' own.
        rel_k, rel_v: float ``(W, H·d_h)`` embeddings of offsets ``0 .. W − 1`` (row ``o``: a key ``o`` tokens
            before its query).
        offset: ``P``.
        key_valid: optional bool ``(B, P + T)``, False for padding keys (e.g. history rows before an episode
            start); a query always sees itself, so every row of the softmax stays finite.
    Returns:
        ``(B, H, T, d_h)`` in ``q``'s dtype (``rel_k``, ``rel_v`` are cast to it; the softmax runs in float32).
    Raises:
        ValueError: keys that do not hold ``offset + T`` tokens, ``rel_k``/``rel_v`` not ``(W, H·d_h)`` each, or
            ``key_valid`` not ``(B, offset + T)``.
    """
    B, H, T, dh = q.shape
    W = rel_k.shape[0]
    if k.shape[2] != offset + T or v.shape != k.shape:
        raise ValueError(f"k, v: expected {offset + T} tokens (offset {offset} + {T} queries), got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if rel_v.shape != rel_k.shape or rel_k.shape[1] != H * dh:
        raise ValueError(f"rel_k, rel_v: expected ({W}, {H * dh}) each, got {tuple(rel_k.shape)}, {tuple(rel_v.shape)}")
    if key_valid is not None and tuple(key_valid.shape) != (B, offset + T):
        raise ValueError(f"key_valid: expected shape ({B}, {offset + T}), got {tuple(key_valid.shape)}")
    dev = q.device
    if T == 1 and key_valid is None and offset < W:  # one query seeing every key (an env step): plain attention
        rk = rel_k[: offset + 1].flip(0).view(offset + 1, H, dh).transpose(0, 1).to(q.dtype)  # (H, P+1, d_h)
        rv = rel_v[: offset + 1].flip(0).view(offset + 1, H, dh).transpose(0, 1).to(q.dtype)
        return F.scaled_dot_product_attention(q, k + rk, v + rv)  # (B, H, 1, d_h)
    idx = offset + torch.arange(T, device=dev)[:, None] - torch.arange(W, device=dev)[None]  # (T, W) key index
    ok = idx >= 0  # (T, W)
    idx = idx.clamp(min=0)
    rk = rel_k.view(W, H, dh).transpose(0, 1)[:, None].to(q.dtype)  # (H, 1, W, d_h)
    rv = rel_v.view(W, H, dh).transpose(0, 1)[:, None].to(q.dtype)
    logits = torch.einsum("bhtd,bhtwd->bhtw", q, k[:, :, idx] + rk) * dh ** -0.5  # (B, H, T, W)
    mask = ok[None, None]  # (1, 1, T, W)
    if key_valid is not None:
        mask = mask & (key_valid[:, idx] | (torch.arange(W, device=dev) == 0))[:, None]  # (B, 1, T, W)
    p = torch.softmax(logits.float().masked_fill(~mask, float("-inf")), dim=-1).to(q.dtype)
    return torch.einsum("bhtw,bhtwd->bhtd", p, v[:, :, idx] + rv)  # (B, H, T, d_h)
