"""Stage-2 objective: rectified flow with diffusion forcing on latent windows, multi-step rollouts, reward head.

Sources: rectified flow (Liu et al. 2022) with SD3's logit-normal times and velocity target (Esser et al. 2024),
conventions of :mod:`dit_envs.models.flow`; diffusion forcing (Chen et al. 2024): every token of a causal window
carries its own noise level, so one forward pass trains every position; classifier-free-guidance-style action
dropout to the null index (Ho & Salimans 2022; DiT's label dropout, Peebles & Xie 2023).

A training batch is ``B`` windows of ``L`` consecutive rows of one episode (:class:`Windows`). Three terms:

* **flow** — the first ``T = seq_len`` tokens. Per sample, with probability ``clean_context`` the ``T − 1``
  context tokens are clean (``t = 0``) and only the last is noisy — exactly what inference does — and the loss
  counts the last token only (a clean token's velocity ``ε − x0`` is unpredictable); otherwise every token gets
  an independent logit-normal ``t`` and every token counts (diffusion forcing). Each token's previous action is
  replaced by the null index ``num_actions`` with probability ``action_dropout``.
* **rollout** (optional, ``rollout_steps = N ≥ 2``; the proposal's ``z_{t+n}`` extension) — draw ``n ∈ [2, N]``,
  let the model itself imagine rows ``K .. K+n−2`` from the clean real context (no gradient, the inference
  sampler), then train the flow loss of the real row ``K+n−1`` given that partly imagined context. The model
  learns to predict ``z_{t+n}`` from its own ``n−1``-step rollout — to pull drifting rollouts back towards real
  dynamics instead of compounding their errors.
* **pixel** (optional, ``pixel_weight > 0``) — the flow term's last token and the multi-step target are
  decoded by the frozen stage-1 decoder from the model's clean estimate ``x̂0 = x_t − t·v`` and compared with
  the decoded real latent in pixel space, each pixel weighted ``1 + motion_boost`` where the real frame moved
  since the previous one (the ball, the paddles, the score), else 1, and each sample by ``1 − t``. A latent MSE
  barely notices a misplaced 2-pixel ball; this term makes the small moving objects count (the same idea as the
  stage-1 autoencoder's foreground weighting, and as perceptual/pixel losses on decoded latents, e.g. Rombach et
  al. 2022's decoder-space training).
* **latent motion** (optional, ``latent_motion_weight = W > 0``) — in the flow and multi-step terms each latent
  element of a target row whose raw value changed by more than ``latent_motion_threshold`` since the row before
  it is weighted ``1 + W`` (each token's error the weighted mean over its elements). On Pong the default
  threshold flags the latent cells of the ball, the paddles and the score where they changed and leaves the
  static field at weight 1: the same emphasis on what moves as the pixel term, in the latent space the fidelity
  is measured in, with no decoder pass.
* **heads** — :class:`~dit_envs.models.heads.RewardTermHead` on the real transitions ``(z_{i−1}, a_i, z_i)``
  of every window (rows ``i ≥ 1`` are always real transitions: windows never cross an episode start). Two-hot
  reward cross-entropy plus termination BCE with ``pos_weight = term_weight`` (terminations are rare: one per
  episode).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dit_envs.models.dit import DiT
from dit_envs.models.flow import flow_matching_loss, interpolate, logit_normal_times
from dit_envs.models.heads import RewardTermHead


@dataclass
class ObjectiveConfig:
    """Hyper-parameters of the stage-2 loss (saved in checkpoints and the model card).

    Attributes:
        seq_len: ``T`` tokens of the flow window, ``2 .. K + 1``.
        clean_context: fraction of samples whose context is clean and only the last token noisy.
        action_dropout: per-token probability of replacing the previous action by the null index.
        t_mean, t_std: logit-normal location / scale of the training times.
        term_weight: BCE ``pos_weight`` of termination; reward_weight scales the whole head loss.
        rollout_steps: ``N`` of the multi-step term (0 = off, else ≥ 2).
        rollout_weight: weight of the multi-step term.
        rollout_sampling_steps: Euler steps of each imagined step in the multi-step term.
        pixel_weight: weight of the decoded-pixel term (0 = off).
        motion_boost: extra weight of the pixels that moved, in the pixel term.
        motion_threshold: a pixel "moved" when a channel of the decoded real frame changed by more than this
            (units of [0, 1] intensity).
        latent_motion_weight: extra weight ``W`` of the latent elements that moved, in the flow terms (0 = off).
        latent_motion_threshold: an element "moved" when its raw latent changed by more than this (the latents
            lie in (−1, 1)).
    """

    seq_len: int = 5
    clean_context: float = 0.5
    action_dropout: float = 0.1
    t_mean: float = 0.0
    t_std: float = 1.0
    term_weight: float = 10.0
    reward_weight: float = 1.0
    rollout_steps: int = 0
    rollout_weight: float = 1.0
    rollout_sampling_steps: int = 1
    pixel_weight: float = 0.0
    motion_boost: float = 100.0
    motion_threshold: float = 0.1
    latent_motion_weight: float = 0.0
    latent_motion_threshold: float = 0.05


def latent_motion_weights(z: torch.Tensor, z_prev: torch.Tensor, weight: float, threshold: float) -> torch.Tensor:
    """float32 weights ``1 + weight·[|z − z_prev| > threshold]`` of raw latents ``z``, ``z_prev`` ``(..., d_z)``."""
    return 1.0 + weight * ((z.float() - z_prev.float()).abs() > threshold).float()


@dataclass
class Windows:
    """``B`` windows of ``L`` consecutive rows of one episode each, on one device.

    Attributes:
        x: float32 ``(B, L, d_z)`` standardised latents (what the DiT diffuses).
        z: float32 ``(B, L, d_z)`` raw autoencoder latents (what the head reads).
        prev_action: int64 ``(B, L)`` action that led to each row, ``num_actions`` (null) on an episode's first.
        reward: float32 ``(B, L)``, terminated: bool ``(B, L)`` — of the transition into each row.
    """

    x: torch.Tensor
    z: torch.Tensor
    prev_action: torch.Tensor
    reward: torch.Tensor
    terminated: torch.Tensor


def motion_weighted_mse(img: torch.Tensor, target: torch.Tensor, prev: torch.Tensor, *, motion_boost: float,
                        threshold: float, foreground: bool = False) -> torch.Tensor:
    """Per-sample pixel MSE of ``img`` against ``target`` (float ``(B, 3, H, W)`` in ``[0, 1]``), each pixel
    weighted ``1 + motion_boost`` where ``target`` differs from ``prev`` (the frame before it) by more than
    ``threshold`` in some channel — and, with ``foreground``, also where it differs that much from its own
    per-channel median colour (the background: a paddle pressed against a wall does not move but still counts) —
    else 1, so a 2-pixel ball or paddle counts (like the stage-1 autoencoder's foreground weighting).

    Returns:
        float32 ``(B,)``, the weighted mean over pixels.
    """
    with torch.no_grad():
        hot = (target - prev).abs().amax(dim=1, keepdim=True) > threshold  # (B, 1, H, W)
        if foreground:
            bg = target.flatten(2).median(dim=2).values[..., None, None]  # (B, 3, 1, 1)
            hot |= (target - bg).abs().amax(dim=1, keepdim=True) > threshold
        w = 1.0 + motion_boost * hot.float()
    sq = ((img.float() - target.float()) ** 2).mean(dim=1, keepdim=True)  # (B, 1, H, W)
    return (w * sq).sum(dim=(1, 2, 3)) / w.sum(dim=(1, 2, 3))


class PixelDecoder:
    """The frozen stage-1 decoder with the latent standardisation, for the pixel-space loss terms of
    :class:`PretrainNet` and :class:`trainers.distill_objective.DistillNet`. A plain object, not an ``nn.Module``:
    the module holding it keeps it outside its tree (not trained, not in the state dict, not seen by DDP).

    Args:
        decoder: the stage-1 autoencoder (frozen here: ``requires_grad_(False)``, ``eval()``).
        mean, std: float ``(d_z,)`` the latent standardisation (moved to the decoder's device).
        motion_boost, threshold: as in :func:`motion_weighted_mse`.
    """

    def __init__(self, decoder: nn.Module, mean: torch.Tensor, std: torch.Tensor, *, motion_boost: float = 100.0,
                 threshold: float = 0.1) -> None:
        self.decoder = decoder.requires_grad_(False).eval()
        dev = next(decoder.parameters()).device
        self.mean, self.std = mean.detach().float().to(dev), std.detach().float().to(dev)
        self.motion_boost, self.threshold = motion_boost, threshold

    def images(self, x: torch.Tensor, *, standardised: bool = True, clamp: bool = False) -> torch.Tensor:
        """Latents float ``(B, d_z)`` (standardised, or raw with ``standardised=False``; ``clamp`` to the encoder's
        range ``[-1, 1]`` as the env does) → decoded float32 images ``(B, 3, 64, 64)`` in ``[0, 1]``."""
        z = x.float() * self.std + self.mean if standardised else x.float()
        return self.decoder.decode(z.clamp(-1.0, 1.0) if clamp else z).float()

    def weighted_mse(self, img: torch.Tensor, target: torch.Tensor, prev: torch.Tensor, *,
                     foreground: bool = False) -> torch.Tensor:
        """:func:`motion_weighted_mse` with this object's boost and threshold, float32 ``(B,)``."""
        return motion_weighted_mse(img, target, prev, motion_boost=self.motion_boost, threshold=self.threshold,
                                   foreground=foreground)


class PretrainNet(nn.Module):
    """The trainable part of the DiT world model (DiT + head), with one ``forward`` that returns every loss term,
    so it can be wrapped by DDP / ``torch.compile`` as one module.

    Args:
        dit: :class:`DiT`. heads: :class:`RewardTermHead`.
        term_weight: termination BCE ``pos_weight``.
    """

    def __init__(self, dit: DiT, heads: RewardTermHead, term_weight: float = 10.0) -> None:
        super().__init__()
        self.dit, self.heads, self.term_weight = dit, heads, term_weight
        self.pixel: PixelDecoder | None = None  # a plain object: outside the module tree

    @property
    def decoder(self) -> nn.Module | None:
        """The frozen stage-1 decoder of the pixel term (None until :meth:`set_decoder`)."""
        return None if self.pixel is None else self.pixel.decoder

    def set_decoder(self, decoder: nn.Module, mean: torch.Tensor, std: torch.Tensor, *, motion_boost: float = 100.0,
                    motion_threshold: float = 0.1) -> None:
        """Enable the pixel term: ``decoder`` is the frozen stage-1 autoencoder (kept outside the module tree: not
        trained, not in the state dict, not seen by DDP); ``mean``/``std`` float ``(d_z,)`` the latent
        standardisation; ``motion_boost``/``motion_threshold`` as in :class:`ObjectiveConfig`."""
        self.pixel = PixelDecoder(decoder, mean, std, motion_boost=motion_boost,
                                 threshold=motion_threshold)

    def pixel_loss(self, x0_hat: torch.Tensor, t: torch.Tensor, z: torch.Tensor, z_prev: torch.Tensor) -> torch.Tensor:
        """Motion-weighted pixel MSE between decoded ``x0_hat`` (standardised ``(B, d_z)``) and the decoded real
        latent ``z`` (raw ``(B, d_z)``; ``z_prev`` the real latent before it), each sample weighted ``1 − t``
        (``t`` ``(B,)``). Returns a float32 scalar."""
        px = self.pixel
        img = px.images(x0_hat)  # (B, 3, 64, 64)
        with torch.no_grad():
            real, prev = px.images(z, standardised=False), px.images(z_prev, standardised=False)
        return ((1.0 - t.float()) * px.weighted_mse(img, real, prev)).mean()

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """All loss terms of one batch (see :func:`make_inputs` for the keys).

        Returns:
            float32 scalars ``flow``, ``reward``, ``term`` and, when the batch has ``ro_*`` keys, ``rollout``.
        """
        v = self.dit(inputs["xt"], inputs["t"], inputs["prev_action"])  # (B, T, d_z)
        out = {"flow": flow_matching_loss(v, inputs["x0"], inputs["noise"], inputs["mask"], inputs.get("lw"))}
        pixel = self.pixel is not None and "px_z" in inputs
        if pixel:
            t = inputs["t"][:, -1]  # (B,)
            out["pixel"] = self.pixel_loss(inputs["xt"][:, -1] - t[:, None] * v[:, -1], t, inputs["px_z"],
                                           inputs["px_prev"])
        if "ro_xt" in inputs:
            v_ro = self.dit(inputs["ro_xt"], inputs["ro_t"], inputs["ro_prev_action"])  # (B, K+1, d_z)
            out["rollout"] = flow_matching_loss(v_ro[:, -1], inputs["ro_x0"], inputs["ro_noise"],
                                                weight=inputs.get("ro_lw"))
            if pixel:
                t = inputs["ro_t"][:, -1]
                out["pixel"] = 0.5 * (out["pixel"] + self.pixel_loss(
                    inputs["ro_xt"][:, -1] - t[:, None] * v_ro[:, -1], t, inputs["ro_px_z"], inputs["ro_px_prev"]))
        m = inputs["h_mask"]  # (B, L-1) real transitions (a null previous action marks none)
        a = torch.where(m > 0, inputs["h_action"], torch.zeros_like(inputs["h_action"]))
        r_logits, t_logit = self.heads(inputs["h_z"], a, inputs["h_z_next"])  # (B, L-1, bins), (B, L-1)
        denom = m.sum().clamp(min=1.0)
        out["reward"] = (self.heads.twohot.loss(r_logits.float(), inputs["h_reward"]) * m).sum() / denom
        pos_weight = torch.tensor(self.term_weight, device=t_logit.device)
        term = F.binary_cross_entropy_with_logits(t_logit.float(), inputs["h_term"], pos_weight=pos_weight,
                                                  reduction="none")
        out["term"] = (term * m).sum() / denom
        return out


def total_loss(terms: dict[str, torch.Tensor], cfg: ObjectiveConfig) -> torch.Tensor:
    """``flow + rollout_weight·rollout + reward_weight·(reward + term) + pixel_weight·pixel``, a float32 scalar."""
    loss = terms["flow"] + cfg.reward_weight * (terms["reward"] + terms["term"])
    if "pixel" in terms:
        loss = loss + cfg.pixel_weight * terms["pixel"]
    if "rollout" in terms:
        loss = loss + cfg.rollout_weight * terms["rollout"]
    return loss


@torch.no_grad()
def imagine_context(dit: DiT, w: Windows, n: int, *, context_len: int, sampling_steps: int,
                    clamp, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Roll ``dit`` open-loop ``n − 1`` steps from the real context ``x[:, :K]`` with the real actions.

    Args:
        dit: the model being trained (used without gradient).
        w: windows with ``L ≥ K + n`` rows.
        n: the multi-step horizon (≥ 1; ``n = 1`` returns the real context).
        context_len: ``K``. sampling_steps: Euler steps per imagined step.
        clamp: standardised ``(B, d_z)`` → standardised, mapping a sample into the encoder's range as inference
            does (denormalise, clamp to [-1, 1], normalise).
        generator: draws the sampler's noise.
    Returns:
        ``(ctx float32 (B, K, d_z), ctx_action int64 (B, K))``: rows ``n−1 .. K+n−2`` of the window, the last
        ``n − 1`` of them imagined.
    """
    K = context_len
    ctx, ctx_a = w.x[:, :K], w.prev_action[:, :K]
    for j in range(n - 1):
        cache = dit.context_cache(ctx, ctx_a)
        a = w.prev_action[:, K + j]
        noise = torch.randn(ctx.shape[0], ctx.shape[2], generator=generator, device=ctx.device)
        x = clamp(dit.sample_next(noise, a, cache, sampling_steps, x_prev=ctx[:, -1]))  # (B, d_z)
        ctx = torch.cat([ctx[:, 1:], x[:, None]], dim=1)
        ctx_a = torch.cat([ctx_a[:, 1:], a[:, None]], dim=1)
    return ctx, ctx_a


def make_inputs(w: Windows, cfg: ObjectiveConfig, *, num_actions: int, generator: torch.Generator,
                dit: DiT | None = None, context_len: int = 0, clamp=None) -> dict[str, torch.Tensor]:
    """Draw the noise, times, clean-context choice and action dropout of one batch (all from ``generator``).

    Args:
        w: windows with ``L ≥ seq_len`` rows (``L ≥ K + rollout_steps`` when the multi-step term is on).
        cfg: the objective. num_actions: the null action index.
        generator: on ``w``'s device; the only randomness used.
        dit, context_len, clamp: needed for the multi-step term (see :func:`imagine_context`); ``dit`` also gives
            the flow's source (``DiTConfig.prev_source``; without ``dit``: ``N(0, I)``). With a previous-latent
            source a window's first token has no latent before it: it is noised from ``N(0, I)`` and not counted.
    Returns:
        Tensors for :meth:`PretrainNet.forward`: ``xt, t, prev_action, x0, noise, mask`` ``(B, T, ...)`` (``noise``
        and ``ro_noise`` hold each token's source, the flow's ``t = 1`` end: ``ε``, or the latent before it plus
        ``prev_source·ε``),
        ``h_z, h_action, h_z_next, h_reward, h_term, h_mask`` ``(B, L−1, ...)``, ``ro_*`` for the multi-step term,
        and ``lw`` ``(B, T, d_z)`` / ``ro_lw`` ``(B, d_z)`` latent-motion weights when that term is on.
    Raises:
        ValueError: windows shorter than required.
    """
    B, L, d = w.x.shape
    T, dev = cfg.seq_len, w.x.device
    need = max(T, context_len + cfg.rollout_steps if cfg.rollout_steps else 0)
    if L < need:
        raise ValueError(f"windows: expected >= {need} rows, got {L}")
    x0 = w.x[:, :T]
    t = logit_normal_times((B, T), mean=cfg.t_mean, std=cfg.t_std, generator=generator, device=dev)  # (B, T)
    clean = torch.rand(B, generator=generator, device=dev) < cfg.clean_context  # (B,)
    is_ctx = torch.arange(T, device=dev) < T - 1  # (T,)
    clean_ctx = clean[:, None] & is_ctx[None]  # (B, T)
    t = torch.where(clean_ctx, torch.zeros_like(t), t)
    noise = torch.randn(B, T, d, generator=generator, device=dev)
    mask = (~clean_ctx).float()
    if dit is not None and dit.config.prev_source:
        noise = torch.cat([noise[:, :1], dit.flow_source(noise[:, 1:], w.x[:, :T - 1])], dim=1)  # the source
        mask[:, 0] = 0.0
    drop = torch.rand(B, T, generator=generator, device=dev) < cfg.action_dropout
    out = {
        "xt": interpolate(x0, noise, t), "t": t, "x0": x0, "noise": noise, "mask": mask,
        "prev_action": torch.where(drop, torch.full_like(w.prev_action[:, :T], num_actions), w.prev_action[:, :T]),
        "h_z": w.z[:, :-1], "h_action": w.prev_action[:, 1:], "h_z_next": w.z[:, 1:],
        "h_reward": w.reward[:, 1:], "h_term": w.terminated[:, 1:].float(),
        "h_mask": (w.prev_action[:, 1:] < num_actions).float(),
    }
    if cfg.pixel_weight:
        out.update({"px_z": w.z[:, T - 1], "px_prev": w.z[:, T - 2]})
    lm = (cfg.latent_motion_weight, cfg.latent_motion_threshold)
    if lm[0]:  # the first row of a window has no row before it in the window: weight 1
        moved = latent_motion_weights(w.z[:, 1:T], w.z[:, :T - 1], *lm)  # (B, T-1, d_z)
        out["lw"] = torch.cat([torch.ones_like(moved[:, :1]), moved], dim=1)  # (B, T, d_z)
    if cfg.rollout_steps:
        if dit is None or clamp is None or context_len < 1:
            raise ValueError("dit/context_len/clamp: expected for rollout_steps > 0, got none")
        K = context_len
        n = int(torch.randint(2, cfg.rollout_steps + 1, (1,), generator=generator, device=dev).item())
        ctx, ctx_a = imagine_context(dit, w, n, context_len=K, sampling_steps=cfg.rollout_sampling_steps,
                                     clamp=clamp, generator=generator)
        target, target_a = w.x[:, K + n - 1], w.prev_action[:, K + n - 1]  # (B, d_z), (B,)
        t_last = logit_normal_times((B,), mean=cfg.t_mean, std=cfg.t_std, generator=generator, device=dev)
        eps = dit.flow_source(torch.randn(B, d, generator=generator, device=dev), ctx[:, -1])  # (B, d_z) source
        out.update({
            "ro_xt": torch.cat([ctx, interpolate(target, eps, t_last)[:, None]], dim=1),  # (B, K+1, d_z)
            "ro_t": torch.cat([torch.zeros(B, K, device=dev), t_last[:, None]], dim=1),  # (B, K+1)
            "ro_prev_action": torch.cat([ctx_a, target_a[:, None]], dim=1),  # (B, K+1)
            "ro_x0": target, "ro_noise": eps,
        })
        if cfg.pixel_weight:
            out.update({"ro_px_z": w.z[:, K + n - 1], "ro_px_prev": w.z[:, K + n - 2]})
        if lm[0]:
            out["ro_lw"] = latent_motion_weights(w.z[:, K + n - 1], w.z[:, K + n - 2], *lm)  # (B, d_z)
    return out


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema ← decay·ema + (1 − decay)·model`` for parameters; ``ema``'s buffers are copied from the model's
    buffers of the same name."""
    e_params = [p for p in ema.parameters()]
    m_params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(e_params, m_params, 1.0 - decay)
    mb = dict(model.named_buffers())
    for name, be in ema.named_buffers():  # by name: the model may hold more than its EMA copy
        be.copy_(mb[name])


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay after ``step`` updates: ``min(decay, (1 + step) / (10 + step))`` — short runs do not keep the
    random initialisation in the average."""
    return min(decay, (1.0 + step) / (10.0 + step))


def optimizer_step(loss: torch.Tensor, net: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer, *, lr: float,
                   grad_clip: float, step: int, ema_decay: float) -> torch.Tensor:
    """One update of a stage-2 training loop (``ditwm pretrain``, ``ditwm distill``): set ``lr`` on every param
    group, back-propagate ``loss`` (DDP averages the gradients across ranks here), clip the global gradient norm to
    ``grad_clip``, step, and move ``ema`` towards ``net`` with :func:`ema_decay_at` ``(step, ema_decay)``.

    Returns:
        The float32 scalar gradient norm before clipping.
    """
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
    opt.step()
    ema_update(ema, net, ema_decay_at(step, ema_decay))
    return grad_norm
