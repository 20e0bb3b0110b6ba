"""Causal Diffusion Transformer over latent time steps (DiT, Peebles & Xie 2023; diffusion forcing, Chen et al. 2024).

Each time step ``i`` is ONE token (by default; see spatial tokens below): ``Linear(concat(embed_z(x_i),
embed_a(prev_action_i))) + pos_i``, where ``prev_action_i`` is the action that led to latent ``i`` (index
``num_actions`` = null action, used for the first frame of an episode and for action dropout). Every token carries its
own noise level ``t_i ∈ [0, 1]``, which enters each block through adaLN-Zero: the conditioning ``c_i =
timestep_emb(t_i) [+ action_emb(prev_action_i)]`` (like DiT's ``t + y`` and DIAMOND's noise + action conditioning) is
mapped to shift/scale/gate vectors for the attention and MLP branches. Self-attention is causal, so one forward pass
with independent per-token noise levels trains every position (diffusion forcing), and at inference ``K`` clean
context tokens (``t = 0``) plus one noisy token predict the velocity of the next latent. Because the context does not
attend to the noisy token, its per-layer keys/values can be computed once per env step (:meth:`DiT.context_cache`) and
reused by every sampling step (:meth:`DiT.predict_next`; the whole sampler is :meth:`DiT.sample_next`).

Step-size conditioning (``DiTConfig.shortcut_steps = N > 0``, set by ``ditwm distill``): the noisy token's
conditioning also gets ``step_emb(d)`` for the Euler step size ``d`` the sampler will take, so a distilled
student can jump along its teacher's ``N``-step trajectory in ``1, 2, … N`` steps (shortcut models, Frans et al.
2024; :mod:`trainers.distill`). ``step_emb`` ends in a zero-initialised layer, so a student copied from its teacher
starts as exactly the teacher; step sizes below ``1/N`` use the ``1/N`` embedding (the teacher's own field).

Streaming (``DiTConfig.streaming``, set by ``ditwm distill --streaming``): every token attends to itself and the
``K`` tokens before it through :func:`~dit_envs.models.attention.window_attention` (relative position embeddings,
no absolute position besides "context" ``pos_embed[K-1]`` vs "the token being denoised" ``pos_embed[K]``), so the
per-layer keys/values of a context token never change: an env keeps them in a rolling cache
(:meth:`DiT.extend_cache`) and encodes one new token per env step instead of the whole window. The next latent
depends on up to ``depth·K`` past tokens since the last :meth:`DiT.context_cache` (a reset), as in Transformer-XL's
recurrence. A streaming :meth:`DiT.forward` embeds every token but the last as context: only the last one's velocity
is meaningful.

Spatial tokens (``DiTConfig.patch_size = p > 0``): a time step is ``G = (H/p)·(W/p)`` tokens instead of one, each a
``p × p`` patch of the ``(C, H, W)`` latent grid (the patch embedding of DiT and ViT) with a learned patch position
added to its time position; attention is block-causal (a token sees its own time step and the earlier ones), every
token of a step shares that step's noise level and action, and each patch token outputs its own patch of the
velocity. The patch weights can then share how a small object (Pong's ball) moves across positions (for shifts by
whole patches; the patch positions and attention keep tokens position-aware), which a single token per frame has to
learn position by position; it costs ``G`` times the tokens. The interface is unchanged:
latents stay flat ``(…, d_z)`` vectors outside the model, and a cache holds ``G`` tokens per context step.

Convolutional branches (``DiTConfig.conv_width = c > 0``, one token per time step): a small conv path on the latent
grid is added to the token embedding and to the output velocity (:mod:`dit_envs.models.dit_conv`), local features
at the cost of a few convolutions on a ``H × W`` grid per token instead of ``G`` times the tokens.

Previous-latent source (``DiTConfig.prev_source = σ > 0``): the flow of latent ``i`` runs from ``x_{i−1} + σ·ε``
(the latent before it plus noise; a stochastic-interpolant coupling, Albergo & Vanden-Eijnden 2023, as InDI or
image-to-image flows start from the degraded image) instead of from ``ε``, so at high noise the token already holds
the last frame and the velocity is mostly its change. The sampler then needs the newest context latent
(``sample_next(..., x_prev=)``, :meth:`flow_source`); a window's first token, with no latent before it in the window,
keeps the ``N(0, I)`` source in training and is not counted.
"""
from __future__ import annotations

import warnings

import torch
from einops import rearrange
from torch import nn

from dit_envs.models.dit_block import DiTBlock, modulate, timestep_features
from dit_envs.models.dit_config import DIT_PRESETS, DiTConfig  # noqa: F401 (re-exported)
from dit_envs.models.dit_conv import ConvEmbed, ConvHead
from dit_envs.models.flow import sample, uniform_times

_WARNED: set[tuple[int, int]] = set()  # (shortcut_steps, sampling steps) already warned about

KVCache = list[tuple[torch.Tensor, torch.Tensor]]
"""Per-layer ``(keys, values)``, each float ``(N, heads, L, width/heads)`` for ``L`` context tokens
(``L·G`` with ``G`` spatial tokens per time step)."""


class DiT(nn.Module):
    """Causal DiT predicting the rectified-flow velocity of every latent token (see module docstring).

    Args:
        config: :class:`DiTConfig`.
    """

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        D, A, G = config.width, config.num_actions, config.frame_tokens
        self.z_embed = nn.Linear(config.token_dim, D)
        self.a_embed = nn.Embedding(A + 1, D)
        self.in_proj = nn.Linear(2 * D, D)
        self.pos_embed = nn.Parameter(torch.zeros(config.seq_len, D))
        self.patch_pos = nn.Parameter(torch.zeros(G, D)) if G > 1 else None
        self.t_embed = nn.Sequential(nn.Linear(config.freq_dim, D), nn.SiLU(), nn.Linear(D, D))
        self.a_cond = nn.Embedding(A + 1, D) if config.action_cond else None
        self.step_embed = (nn.Sequential(nn.Linear(config.freq_dim, D), nn.SiLU(), nn.Linear(D, D))
                           if config.shortcut_steps else None)
        window = config.context_len + 1 if config.streaming else 0
        self.blocks = nn.ModuleList(DiTBlock(D, config.heads, config.mlp_ratio, window, G)
                                    for _ in range(config.depth))
        self.norm_final = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        self.final_linear = nn.Linear(D, config.token_dim)
        cw, shape = config.conv_width, config.latent_shape
        self.conv_embed = ConvEmbed(shape, cw, D) if cw else None
        self.conv_head = ConvHead(shape, cw, D) if cw else None
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT initialisation: Xavier linears, N(0, 0.02) embeddings, and adaLN-Zero — every modulation layer
        and the output layer zero, so a freshly initialised model outputs exactly zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for emb in (self.a_embed, self.a_cond):
            if emb is not None:
                nn.init.normal_(emb.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)
        if self.patch_pos is not None:
            nn.init.normal_(self.patch_pos, std=0.02)
        nn.init.normal_(self.t_embed[0].weight, std=0.02)
        nn.init.normal_(self.t_embed[2].weight, std=0.02)
        zero = [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_modulation[-1], self.final_linear]
        if self.step_embed is not None:
            nn.init.normal_(self.step_embed[0].weight, std=0.02)
            zero.append(self.step_embed[2])
        for layer in zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        for branch in (self.conv_embed, self.conv_head):
            if branch is not None:
                branch.zero_output()

    def _embed(
        self, x: torch.Tensor, noise_level: torch.Tensor, prev_action: torch.Tensor, offset: int,
        step_size: torch.Tensor | None = None, cond: bool = True, denoised_last: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token and conditioning embeddings, each ``(B, T, D)``, for positions ``offset .. offset+T-1`` (streaming:
        ``pos_embed[K-1]`` for context tokens, ``pos_embed[K]`` for the last one when ``denoised_last``);
        ``step_size`` ``(B, T)`` (0 = none for that token) is ignored by models without step conditioning;
        ``cond=False`` skips the conditioning (returned as None). With spatial tokens both are ``(B, T·G, D)``, the
        ``G`` tokens of each time step in a row."""
        T, dtype = x.shape[1], self.pos_embed.dtype
        if self.config.streaming:
            K = self.config.context_len
            pos = self.pos_embed[K - 1].expand(T, -1)
            if denoised_last:
                pos = torch.cat([pos[:-1], self.pos_embed[K:]])  # (T, D)
        elif offset + T > self.config.seq_len:
            raise ValueError(f"x: expected at most {self.config.seq_len} time steps, got {offset + T}")
        else:
            pos = self.pos_embed[offset : offset + T]  # (T, D)
        G = self.config.frame_tokens
        a = self.a_embed(prev_action)[:, :, None].expand(-1, -1, G, -1)  # (B, T, G, D)
        x = x.to(dtype)
        emb = self.z_embed(self.patches(x))  # (B, T, G, D)
        if self.conv_embed is not None:
            emb = emb + self.conv_embed(x)[:, :, None]
        tok = self.in_proj(torch.cat([emb, a], dim=-1)) + pos[:, None]
        if self.patch_pos is not None:
            tok = tok + self.patch_pos  # (B, T, G, D)
        tok = tok.flatten(1, 2)  # (B, T·G, D)
        if not cond:
            return tok, None
        c = self.t_embed(timestep_features(noise_level, self.config.freq_dim).to(dtype))  # (B, T, D)
        if self.a_cond is not None:
            c = c + self.a_cond(prev_action)  # (B, T, D)
        if self.step_embed is not None and step_size is not None:
            d = step_size.float().clamp(min=1.0 / self.config.shortcut_steps)  # (B, T)
            e = self.step_embed(timestep_features(d, self.config.freq_dim).to(dtype))  # (B, T, D)
            c = c + torch.where((step_size > 0)[..., None], e, torch.zeros_like(e))  # (B, T, D)
        return tok, (c if G == 1 else c.repeat_interleave(G, dim=1))  # (B, T·G, D)

    def _output(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.final_modulation(c).chunk(2, dim=-1)  # (B, T·G, D) each
        return self._head(h, shift, scale)  # (B, T, d_z)

    def _head(self, h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Final adaLN (``shift``, ``scale`` broadcastable to ``h`` ``(B, T·G, D)``), the linear output layer (plus
        the conv head) and the patch layout: velocity ``(B, T, d_z)``."""
        m = modulate(self.norm_final(h), shift, scale)  # (B, T·G, D)
        y = self.final_linear(m)
        if self.conv_head is not None:
            y = y + self.conv_head(m)
        return self._latents(y)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """Flat latents ``(B, T, d_z)`` as the patches of spatial tokens ``(B, T, G, C·p²)`` (patch ``g`` = row
        ``g // (W/p)``, column ``g % (W/p)`` of the ``(H/p) × (W/p)`` grid of patches, row-major); :meth:`_latents`
        inverts it. One token per time step: ``(B, T, 1, d_z)``."""
        if self.config.frame_tokens == 1:
            return x[:, :, None]
        C, H, W = self.config.latent_shape
        p = self.config.patch_size
        return rearrange(x, "b t (c h p w q) -> b t (h w) (c p q)", c=C, p=p, q=p, w=W // p)

    def _latents(self, y: torch.Tensor) -> torch.Tensor:
        """Per-token outputs ``(B, T·G, token_dim)`` as flat latents ``(B, T, d_z)`` (the inverse patch layout)."""
        if self.config.frame_tokens == 1:
            return y
        C, H, W = self.config.latent_shape
        p = self.config.patch_size
        return rearrange(y, "b (t h w) (c p q) -> b t (c h p w q)", c=C, p=p, q=p, h=H // p, w=W // p)

    def forward(self, x: torch.Tensor, noise_level: torch.Tensor, prev_action: torch.Tensor,
                step_size: torch.Tensor | None = None, key_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity of every token under causal attention (streaming: windowed, and only the last token is
        embedded as the one being denoised — a sequence of any length ending in the noisy latent).

        Args:
            x: float ``(B, T, d_z)`` noisy (normalised) latents, ``T <= context_len + 1`` (any ``T`` streaming).
            noise_level: float ``(B, T)`` in ``[0, 1]``, the flow time of each token (0 = clean).
            prev_action: int64 ``(B, T)`` in ``[0, num_actions]``, action preceding each latent.
            step_size: optional float ``(B, T)`` Euler step size of each token's next sampler step (0 = none,
                e.g. clean context tokens); used only when ``config.shortcut_steps > 0``.
            key_valid: optional bool ``(B, T)``, streaming only: False for padding tokens (history before an
                episode start), which no later token attends to.
        Returns:
            float ``(B, T, d_z)`` predicted velocity ``ε − x0`` (model dtype).
        Raises:
            ValueError: shapes that disagree, ``T`` too long, or ``key_valid`` for a non-streaming model.
        """
        if x.ndim != 3 or x.shape[2] != self.config.latent_dim:
            raise ValueError(f"x: expected (B, T, {self.config.latent_dim}), got {tuple(x.shape)}")
        if noise_level.shape != x.shape[:2] or prev_action.shape != x.shape[:2]:
            raise ValueError(
                f"noise_level/prev_action: expected shape {tuple(x.shape[:2])}, "
                f"got {tuple(noise_level.shape)} and {tuple(prev_action.shape)}"
            )
        if step_size is not None and step_size.shape != x.shape[:2]:
            raise ValueError(f"step_size: expected shape {tuple(x.shape[:2])}, got {tuple(step_size.shape)}")
        if key_valid is not None and (not self.config.streaming or key_valid.shape != x.shape[:2]):
            raise ValueError(f"key_valid: expected None or, streaming, shape {tuple(x.shape[:2])}, got "
                             f"{tuple(key_valid.shape)} (streaming {self.config.streaming})")
        h, c = self._embed(x, noise_level, prev_action, offset=0, step_size=step_size, denoised_last=True)
        for block in self.blocks:
            h, _ = block(h, c, key_valid=key_valid)  # (B, T·G, D)
        return self._output(h, c)  # (B, T, d_z)

    def context_cache(self, z: torch.Tensor, prev_action: torch.Tensor,
                      key_valid: torch.Tensor | None = None) -> KVCache:
        """Per-layer keys/values of ``L`` clean context tokens (noise level 0), computed once per env step (and,
        with gradients, once per distillation batch for every jump of it).

        Args:
            z: float ``(N, L, d_z)`` clean normalised latents, ``1 <= L <= context_len`` (streaming: any ``L``, e.g.
                history rows before a context; only the tokens the last ``context_len`` depend on are computed).
            prev_action: int64 ``(N, L)``.
            key_valid: optional bool ``(N, L)``, streaming only: False for padding rows, as in :meth:`forward`. It
                masks keys inside this pass only: the cache carries no mask, so its last ``min(L, context_len)``
                rows must be valid ones.
        Returns:
            :data:`KVCache` with one ``(k, v)`` pair per block, of the last ``min(L, context_len)`` tokens (``G``
            per time step with spatial tokens).
        Raises:
            ValueError: ``L > context_len`` or ``key_valid`` for a non-streaming model, or ``key_valid`` of
                another shape.
        """
        N, L = prev_action.shape
        K, streaming = self.config.context_len, self.config.streaming
        if L > K and not streaming:
            raise ValueError(f"z: expected at most {K} context steps, got {L}")
        if key_valid is not None and (not streaming or key_valid.shape != prev_action.shape):
            raise ValueError(f"key_valid: expected None or, streaming, shape {tuple(prev_action.shape)}, got "
                             f"{tuple(key_valid.shape)} (streaming {streaming})")
        return self._clean_pass(z, prev_action, key_valid=key_valid)

    def _clean_pass(self, z: torch.Tensor, prev_action: torch.Tensor, *, past: KVCache | None = None,
                    key_valid: torch.Tensor | None = None) -> KVCache:
        """Per-layer keys/values of the last ``min(L, K)`` of ``L`` clean tokens ``z`` ``(N, L, d_z)`` attending to
        ``past`` (a cache, or none); a streaming model computes block ``i`` only on the last ``K·(depth − i)`` rows,
        all that the last ``K`` outputs depend on (windows of ``K + 1``), and the last block only keys and values."""
        K, depth, G = self.config.context_len, len(self.blocks), self.config.frame_tokens
        h, _ = self._embed(z, None, prev_action, offset=0, cond=False)  # (N, L·G, D)
        table, index = self._cond_table(0.0, None, prev_action)
        index = index if G == 1 else index.repeat_interleave(G, dim=1)  # (N, L·G)
        cache: KVCache = []
        for i, block in enumerate(self.blocks):
            if self.config.streaming:
                keep = K * (depth - i)
                h, index = h[:, -keep:], index[:, -keep:]
                key_valid = None if key_valid is None else key_valid[:, -keep:]
            mod = block.adaLN_modulation(table)[index]  # (N, L', 6D)
            if i == depth - 1:  # its outputs feed nothing
                cache.append(block.keys_values(h[:, -K * G:], mod[:, -K * G:]))
            else:
                h, (k, v) = block(h, None, past=None if past is None else past[i], mod=mod, key_valid=key_valid)
                cache.append((k[:, :, -K * G:], v[:, :, -K * G:]))
        return cache

    def extend_cache(self, cache: KVCache, z: torch.Tensor, prev_action: torch.Tensor) -> KVCache:
        """Streaming only: the rolling cache one env step later (``min(L + 1, context_len)`` tokens), arguments and
        errors as :meth:`new_token_cache`, whose token it appends: one token's work, not :meth:`context_cache`'s K."""
        K = self.config.context_len
        return [(torch.cat([p[0], n[0]], 2)[:, :, -K:], torch.cat([p[1], n[1]], 2)[:, :, -K:])
                for p, n in zip(cache, self.new_token_cache(cache, z, prev_action))]

    def new_token_cache(self, cache: KVCache, z: torch.Tensor, prev_action: torch.Tensor) -> KVCache:
        """Streaming only: per-layer keys/values ``(N, heads, 1, width/heads)`` of one new clean context token
        attending to ``cache`` (from :meth:`context_cache` or :meth:`extend_cache`, ``L <= context_len`` tokens).

        Args:
            z: float ``(N, d_z)`` the new clean normalised latent. prev_action: int64 ``(N,)`` the action before it.
        Raises:
            ValueError: a non-streaming model (its keys/values depend on positions that shift every step).
        """
        if not self.config.streaming:
            raise ValueError("config.streaming: expected True for extend_cache, got False (use context_cache)")
        return self._clean_pass(z[:, None], prev_action[:, None], past=cache)

    def _cond_table(self, noise_level: float, step_size: float | None,
                    prev_action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The distinct conditionings ``c`` of tokens sharing one noise level (and step size): one row per
        action index when ``action_cond`` (else one row), float ``(R, D)``, and each token's row, int64 like
        ``prev_action``. Inference evaluates every adaLN layer on these ``R ≤ num_actions + 1`` rows and gathers,
        instead of on every token — the same values, a third fewer multiply-adds per token at ``D = 256``."""
        dtype, dev = self.pos_embed.dtype, prev_action.device
        t = torch.full((1,), float(noise_level), device=dev)
        c = self.t_embed(timestep_features(t, self.config.freq_dim).to(dtype))  # (1, D)
        if self.step_embed is not None and step_size is not None and step_size > 0:
            d = torch.full((1,), max(float(step_size), 1.0 / self.config.shortcut_steps), device=dev)
            c = c + self.step_embed(timestep_features(d, self.config.freq_dim).to(dtype))  # (1, D)
        if self.a_cond is None:
            return c, torch.zeros_like(prev_action)
        return c + self.a_cond.weight, prev_action  # (A+1, D)

    def predict_next(
        self, x: torch.Tensor, noise_level: torch.Tensor, prev_action: torch.Tensor, cache: KVCache,
        step_size: torch.Tensor | None = None, shared_level: bool = False, per_token: bool = False,
    ) -> torch.Tensor:
        """Velocity of one noisy token placed right after a cached context; equals the last position of
        :meth:`forward` on ``concat(context, x)`` with context noise 0 (streaming: on ``concat(every token the
        rolling cache has seen since its context_cache, x)``).

        Args:
            x: float ``(N, d_z)`` noisy normalised latent of the next step.
            noise_level: float ``(N,)`` flow time of ``x``.
            prev_action: int64 ``(N,)`` action taken at the newest context frame.
            cache: from :meth:`context_cache` (streaming: or :meth:`extend_cache`) on the same ``N`` envs.
            step_size: optional float ``(N,)`` size of the sampler step about to be taken (step-conditioned
                models only, see the module docstring).
            shared_level: the caller guarantees one noise level (and one step size) for all ``N`` tokens, as a
                sampler does; skips the check (a device sync) that otherwise picks the conditioning-table path.
            per_token: the caller knows the levels differ (e.g. every jump of a distillation batch): the per-token
                path without the check.
        Returns:
            float ``(N, d_z)`` velocity (model dtype).
        """
        L = cache[0][0].shape[2] // self.config.frame_tokens  # context time steps
        d = None if step_size is None else step_size[:, None]
        uniform = x.shape[0] > 0 and not per_token and (shared_level or (
            bool((noise_level == noise_level[0]).all()) and (d is None or bool((d == d[0]).all()))))
        if not uniform:  # general path: every token its own conditioning
            h, c = self._embed(x[:, None], noise_level[:, None], prev_action[:, None], offset=L, step_size=d,
                               denoised_last=True)
            for block, past in zip(self.blocks, cache):
                h, _ = block(h, c, past=past)  # (N, G, D)
            return self._output(h, c)[:, 0]  # (N, d_z)
        h, _ = self._embed(x[:, None], noise_level[:, None], prev_action[:, None], offset=L, cond=False,
                           denoised_last=True)  # (N, G, D)
        table, index = self._cond_table(float(noise_level[0]), None if d is None else float(d[0]), prev_action)
        for block, past in zip(self.blocks, cache):
            h, _ = block(h, None, past=past, mod=block.adaLN_modulation(table)[index][:, None])  # (N, G, D)
        shift, scale = self.final_modulation(table)[index][:, None].chunk(2, dim=-1)  # (N, 1, D) each
        return self._head(h, shift, scale)[:, 0]  # (N, d_z)

    def flow_source(self, noise: torch.Tensor, x_prev: torch.Tensor | None = None) -> torch.Tensor:
        """The flow's start ``x_1`` for a token: ``noise`` itself (rectified flow's ``N(0, I)`` source), or with
        ``config.prev_source = σ > 0`` the latent before it plus noise, ``x_prev + σ·noise``.

        Args:
            noise: float ``(..., d_z)`` ``ε`` (already scaled by a sampling temperature, if any).
            x_prev: float ``(..., d_z)`` the normalised latent one step before the token (the newest context
                latent at inference); ignored when ``prev_source`` is 0.
        Returns:
            Float ``(..., d_z)`` in ``noise``'s dtype, on its device.
        Raises:
            ValueError: ``prev_source > 0`` and ``x_prev`` missing or not shaped like ``noise``.
        """
        s = self.config.prev_source
        if not s:
            return noise
        if x_prev is None or x_prev.shape != noise.shape:
            got = None if x_prev is None else tuple(x_prev.shape)
            raise ValueError(f"x_prev: expected the latent before the token, shape {tuple(noise.shape)}, for a DiT "
                             f"with prev_source {s}, got {got}")
        return x_prev.to(noise) + s * noise  # noise's dtype and device

    def sample_next(self, noise: torch.Tensor, prev_action: torch.Tensor, cache: KVCache, steps: int,
                    shift: float = 1.0, x_prev: torch.Tensor | None = None) -> torch.Tensor:
        """Sample the next normalised latent with :func:`~dit_envs.models.flow.sample` on ``steps`` Euler steps
        (uniform in time, or time-shifted by ``shift``: :func:`~dit_envs.models.flow.uniform_times`), passing the
        step size ``1/steps`` to step-conditioned models.

        Args:
            noise: float ``(N, d_z)`` initial noise ``ε`` (the flow starts there, or with ``prev_source = σ`` at
                ``x_prev + σ·ε``).
            prev_action: int64 ``(N,)`` action taken at the newest context frame.
            cache: from :meth:`context_cache` (streaming: or :meth:`extend_cache`).
            steps: Euler steps ≥ 1.
            shift: time shift ``s > 0`` of the steps; ``s > 1`` spends more of them at high noise.
            x_prev: float ``(N, d_z)`` the newest context latent (normalised), required when
                ``config.prev_source > 0``: the flow starts at :meth:`flow_source` ``(noise, x_prev)``.
        Returns:
            float32 ``(N, d_z)`` sample (normalised units, not clamped).
        Raises:
            ValueError: ``steps`` < 1, ``shift`` ≤ 0, ``shift`` ≠ 1 for a step-conditioned student (it was
                distilled for uniform steps of size ``1/steps``), or ``x_prev`` missing or not shaped like ``noise``
                where it is required.
        """
        if self.config.shortcut_steps and shift != 1.0:
            raise ValueError(f"sampling_shift: expected 1 for a distilled (step-conditioned) student, got {shift}")
        n = self.config.shortcut_steps
        if n and steps < n and n % steps and (n, steps) not in _WARNED:
            _WARNED.add((n, steps))
            trained = sorted(n >> k for k in range(n.bit_length()))
            warnings.warn(f"sampling_steps: this student was distilled for {trained} steps (or more than {n}), got "
                          f"{steps}: an untrained step size, expect lower fidelity", stacklevel=2)
        times = uniform_times(steps, shift)
        d = torch.full((noise.shape[0],), 1.0 / steps, device=noise.device)
        x = sample(lambda xx, t: self.predict_next(xx, t, prev_action, cache, step_size=d, shared_level=True),
                   self.flow_source(noise, x_prev), times)
        return x.float()
