"""Cheap in-training evaluation of the stage-2 DiT (the EMA weights) on a fixed set of held-out windows.

Figures (all on the same windows, with a fixed noise seed, so successive evaluations are comparable):

* ``eval/flow_last`` — rectified-flow loss of the last token given a clean real context (the inference task).
* ``eval/mse@h`` — latent MSE (autoencoder units) of an open-loop rollout with the real actions after ``h``
  imagined steps (the bundle's Euler sampler; ``h`` in 1, 4, 16, … up to the window). The full fidelity metrics
  of DESIGN.md §4 (PSNR, object positions, horizon 64) come from ``ditwm evaluate fidelity`` on the bundle.
* ``eval/reward_precision``, ``eval/reward_recall``, ``eval/term_recall``, ``eval/false_term_rate`` — the
  head's events (``"event"`` decoding) on real transitions.
"""
from __future__ import annotations

import numpy as np
import torch

from dit_envs.models.flow import flow_matching_loss, interpolate, logit_normal_times
from trainers.data import segments
from trainers.latents import LatentDataset, LatentWindows
from trainers.pretrain_objective import PretrainNet, Windows

HORIZONS = (1, 4, 16, 64)


def eval_windows(ds: LatentDataset, *, context_len: int, horizon: int, count: int, seed: int, mean: torch.Tensor,
                 std: torch.Tensor, num_actions: int, device: torch.device) -> Windows | None:
    """A fixed set of ``count`` windows of ``K + H`` rows, ``H = min(horizon, longest segment − K)``.

    Returns:
        :class:`Windows`, or None when no segment of ``ds`` holds ``K + 1`` rows.
    """
    if len(ds) == 0:
        return None
    _, lengths = segments(ds.episode, ds.step)
    h = min(horizon, int(lengths.max()) - context_len)
    if h < 1:
        return None
    lw = LatentWindows(ds, context_len + h, mean=mean, std=std, num_actions=num_actions, seed=seed, device=device)
    return lw.sample(count)


@torch.no_grad()
def evaluate(net: PretrainNet, w: Windows, *, context_len: int, sampling_steps: int, mean: torch.Tensor,
             std: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """The figures of the module docstring.

    Args:
        net: the (EMA) model, on ``w``'s device.
        w: windows of ``L = K + H`` rows from :func:`eval_windows`.
        context_len: ``K``. sampling_steps: Euler steps per imagined step.
        mean, std: float32 ``(d_z,)`` latent standardisation.
        seed: seed of the evaluation noise (a generator of its own: training RNG streams are untouched).
    Returns:
        ``{"eval/<name>": float}``.
    """
    was_training = net.training
    net.eval()
    K, (B, L, d), dev = context_len, w.x.shape, w.x.device
    mean, std = mean.to(dev).float(), std.to(dev).float()
    gen = torch.Generator(device=dev).manual_seed(seed)
    out: dict[str, float] = {}

    t = logit_normal_times((B,), generator=gen, device=dev)
    eps = torch.randn(B, d, generator=gen, device=dev)
    x0 = w.x[:, K]
    src = net.dit.flow_source(eps, w.x[:, K - 1])  # (B, d_z)
    xt = torch.cat([w.x[:, :K], interpolate(x0, src, t)[:, None]], dim=1)  # (B, K+1, d_z)
    tt = torch.cat([torch.zeros(B, K, device=dev), t[:, None]], dim=1)  # (B, K+1)
    v = net.dit(xt, tt, w.prev_action[:, : K + 1])[:, -1]  # (B, d_z)
    out["eval/flow_last"] = flow_matching_loss(v, x0, src).item()

    ctx, ctx_a = w.x[:, :K], w.prev_action[:, :K]
    streaming = net.dit.config.streaming  # a rolling cache, as the env keeps it
    cache = net.dit.context_cache(ctx, ctx_a)
    for h in range(1, L - K + 1):
        if h > 1:
            cache = net.dit.extend_cache(cache, ctx[:, -1], ctx_a[:, -1]) if streaming else net.dit.context_cache(
                ctx, ctx_a)
        a = w.prev_action[:, K + h - 1]
        noise = torch.randn(B, d, generator=gen, device=dev)
        x = net.dit.sample_next(noise, a, cache, sampling_steps, x_prev=ctx[:, -1])  # (B, d_z)
        z = (x * std + mean).clamp(-1.0, 1.0)  # inference maps samples into the encoder's range
        if h in HORIZONS or h == L - K:
            out[f"eval/mse@{h}"] = (z - w.z[:, K + h - 1]).square().mean().item()
        ctx = torch.cat([ctx[:, 1:], ((z - mean) / std)[:, None]], dim=1)
        ctx_a = torch.cat([ctx_a[:, 1:], a[:, None]], dim=1)

    reward, term = net.heads.predict(w.z[:, :-1], w.prev_action[:, 1:], w.z[:, 1:])  # (B, L-1)
    real_event, pred_event = w.reward[:, 1:] != 0, reward != 0
    hits = (real_event & pred_event & (torch.sign(reward) == torch.sign(w.reward[:, 1:]))).sum().item()
    out["eval/reward_precision"] = hits / max(1, int(pred_event.sum()))
    out["eval/reward_recall"] = hits / max(1, int(real_event.sum()))
    real_term = w.terminated[:, 1:]
    out["eval/term_recall"] = (term & real_term).sum().item() / max(1, int(real_term.sum()))
    out["eval/false_term_rate"] = (term & ~real_term).float().mean().item()
    out["eval/real_reward_events"] = float(real_event.sum().item())
    net.train(was_training)
    return out


def data_summary(ds: LatentDataset, train_mask: np.ndarray) -> dict[str, int]:
    """Row and episode counts of the training / held-out split (for logs and the model card)."""
    ep = ds.episode
    return {"rows": int(len(ds)), "train_rows": int(train_mask.sum()), "heldout_rows": int((~train_mask).sum()),
            "train_episodes": int(len(np.unique(ep[train_mask]))),
            "heldout_episodes": int(len(np.unique(ep[~train_mask]))),
            "transitions": int((ds.action >= 0).sum())}
