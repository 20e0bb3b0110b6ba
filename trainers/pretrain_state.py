"""Training state and export of ``ditwm pretrain``: resumable checkpoints and the final world-model bundle.

Checkpoints (:mod:`trainers.checkpoint`: safetensors + JSON, atomic, manifest last, no pickle) hold the DiT and
head weights, their EMA, the latent standardisation, the AdamW state, every rank's torch generator and window
sampler state, torch's global CPU RNG, python's RNG, and the step — so a resumed CPU run (same ``world_size``,
same thread count) equals an uninterrupted one bit for bit.
"""
from __future__ import annotations

import copy
import random
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from dit_envs.bundle import save_bundle
from dit_envs.models.dit_world_model import DiTWorldModel
from trainers.checkpoint import load_checkpoint, load_optimizer_state, optimizer_state, save_checkpoint
from trainers.data import sample_contexts
from trainers.distributed import Dist, barrier, gather_json, gather_tensor, replicas_equal
from trainers.latents import LatentDataset, LatentWindows
from trainers.pretrain_objective import PretrainNet


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """A 63-bit torch seed for ``(seed, rank, step)`` (distinct streams per DDP rank)."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def save_state(out: Path, d: Dist, *, net: PretrainNet, ema: PretrainNet, opt: torch.optim.Optimizer,
               gen: torch.Generator, windows: LatentWindows, step: int, meta: dict,
               extra: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``out/ckpt`` (collective: every rank calls it at the same step; rank 0 writes).

    Args:
        meta: JSON-able run description stored alongside (args, configs, encoder hash, ...).
        extra: more tensors of the run (rank 0's), stored as ``extra.<name>``; :func:`read_state` returns them.
    Raises:
        RuntimeError: DDP replicas whose weights differ (a bug; never checkpoint diverged replicas).
    """
    gens = gather_tensor(d, gen.get_state())
    samplers = gather_json(d, windows.state_dict())
    if not replicas_equal(d, net):
        raise RuntimeError("DDP replicas: expected identical weights on every rank, got different ones")
    if d.is_main:
        tensors = {f"net.{k}": v for k, v in net.state_dict().items()}
        tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
        opt_tensors, opt_meta = optimizer_state(opt, "opt")
        tensors.update(opt_tensors)
        tensors.update({f"rng.gen.{r}": g for r, g in enumerate(gens)})
        tensors["rng.torch_cpu"] = torch.get_rng_state()
        tensors["latent_mean"], tensors["latent_std"] = windows.mean, windows.std
        tensors.update({f"extra.{k}": v for k, v in (extra or {}).items()})
        if windows.priority is not None:  # identical on every rank (trainers.priority)
            tensors["windows.priority"] = torch.from_numpy(windows.priority)
        py = random.getstate()
        save_checkpoint(out, tensors, {**meta, "step": int(step), "world_size": d.world_size, "samplers": samplers,
                                       "opt": opt_meta, "python_rng": [py[0], list(py[1]), py[2]]})
    barrier(d)


def read_state(out: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The newest checkpoint in ``out`` (tensors on CPU, meta)."""
    return load_checkpoint(out, "cpu")


def read_init(spec: str, autoencoder: torch.nn.Module, encoder_sha256: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The starting point of a ``--init`` fine-tune: ``(tensors, meta)`` as :func:`read_state` returns them.

    ``spec`` is either an earlier ``ditwm pretrain`` output (its newest checkpoint), or a DiT world-model bundle: a
    directory, an ``hf://`` source or a registered env id such as ``DiTWM/Pong-v0`` (resolved and sha256-checked by
    :func:`registry.resolve`, loaded by :func:`dit_envs.bundle.load_bundle`). A bundle's weights, float32 whatever
    their storage dtype, become ``ema.dit.*`` / ``ema.heads.*`` with its ``latent_mean`` / ``latent_std``
    ``(d_z,)``; its meta has the bundle's ``context_len`` and ``configs``, no preset (the configs are compared by
    :func:`trainers.pretrain_nets.check_init`), and ``encoder_sha256`` is ``encoder_sha256`` when the bundle's
    autoencoder equals ``autoencoder`` at the bundle's storage dtype (an fp16 release of the same encoder),
    else the sha256 of the bundle's own ``autoencoder.safetensors``.

    Raises:
        FileNotFoundError: no checkpoint and no bundle at ``spec``.
        ValueError: a bundle that is not a DiT world model (``model_type``), or one :func:`load_bundle` refuses.
    """
    import registry
    from dit_envs.bundle import load_bundle
    from registry.catalog import ENV_ID_RE

    path = Path(spec).expanduser()
    if (path / "ckpt").exists() or (path / "ckpt.prev").exists():
        return read_state(path)
    if ENV_ID_RE.fullmatch(spec) and not path.exists():
        path = registry.resolve(registry.get(spec))
    elif not (path / "config.json").is_file():
        path = registry.resolve(spec)  # hf:// sources; a missing directory raises FileNotFoundError
    bundle = load_bundle(path)
    cfg = bundle.config
    if cfg.get("model_type") != "dit":
        raise ValueError(f"model_type: expected a 'dit' bundle to fine-tune, got {cfg.get('model_type')!r} in {path}")
    model = bundle.model
    store = getattr(torch, str(cfg.get("dtype", "float32")))
    own, ref = model.autoencoder.state_dict(), autoencoder.state_dict()
    params = {k for k, _ in autoencoder.named_parameters()}  # a release rounds parameters, keeps buffers
    same = own.keys() == ref.keys() and all(
        torch.equal(ref[k].to(store).to(own[k].dtype), own[k]) if k in params else torch.equal(ref[k], own[k])
        for k in own)
    tensors = {f"ema.{k}": v.float() for k, v in model.state_dict().items() if k.startswith(("dit.", "heads."))}
    tensors["latent_mean"], tensors["latent_std"] = model.latent_mean.float(), model.latent_std.float()
    sha = encoder_sha256 if same else cfg["files"].get("autoencoder.safetensors")
    meta = {"context_len": int(cfg["context_len"]), "configs": {k: cfg["configs"][k] for k in ("dit", "heads")},
            "encoder_sha256": sha, "args": {"preset": None}, "source": str(path)}
    return tensors, meta


def init_weights(tensors: dict[str, torch.Tensor], meta: dict, context_len: int) -> dict[str, torch.Tensor]:
    """The EMA weights of an ``--init`` checkpoint for a model with ``context_len`` K' >= its own K.

    With K' > K the absolute time positions ``dit.pos_embed`` ``(K+1, D)`` are grown to ``(K'+1, D)`` aligned at
    the end: in a full window of K' + 1 tokens (inference: K' context tokens and the one being denoised) the last
    K + 1 keep the positions they were trained with, and the K' − K older ones start at the oldest,
    ``pos_embed[0]``. Positions count from a window's first token, so in a shorter diffusion-forcing window
    token ``i`` starts at the old position ``max(0, i − (K' − K))``. Every other weight is independent of K in a
    non-streaming DiT and is copied unchanged.

    Raises:
        ValueError: ``context_len`` below the checkpoint's, or a streaming checkpoint (its attention window is
            sized by K).
    """
    old = int(meta.get("context_len", context_len))
    w = {k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")}
    if context_len == old:
        return w
    if context_len < old:
        raise ValueError(f"context_len: expected >= the --init run's {old} (a context can grow, not shrink), got "
                         f"{context_len}")
    if meta["configs"]["dit"].get("streaming"):
        raise ValueError(f"context_len: expected {old} for a streaming --init run (its attention window is sized by "
                         f"it), got {context_len}")
    pos = w["dit.pos_embed"]  # (K+1, D)
    w["dit.pos_embed"] = torch.cat([pos[:1].expand(context_len - old, -1), pos])  # (K'+1, D)
    return w


def restore_state(tensors: dict[str, torch.Tensor], meta: dict, d: Dist, *, net: PretrainNet, ema: PretrainNet,
                  opt: torch.optim.Optimizer, gen: torch.Generator, windows: LatentWindows, seed: int) -> int:
    """Load a checkpoint read by :func:`read_state` into the live objects; returns its step.

    With a different ``world_size`` than the checkpoint's, the per-rank RNG streams cannot be matched: they are
    re-seeded from ``(seed, rank, step)`` with a warning (the run continues correctly, not bit-exactly).
    """
    def sub(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    dev = next(net.parameters()).device
    net.load_state_dict(sub("net."))
    ema.load_state_dict(sub("ema."))
    load_optimizer_state(opt, "opt", {k: v.to(dev) for k, v in tensors.items() if k.startswith("opt.")}, meta["opt"])
    step = int(meta["step"])
    if meta["world_size"] == d.world_size:
        gen.set_state(tensors[f"rng.gen.{d.rank}"])
        windows.load_state_dict(meta["samplers"][d.rank])
    else:
        warnings.warn(f"world_size: checkpoint has {meta['world_size']}, this run {d.world_size}; RNG streams are "
                      f"re-seeded (resume is correct but not bit-identical)", stacklevel=2)
        gen.manual_seed(rank_seed(seed, d.rank, step))
        windows.sampler.rng = np.random.default_rng([seed, d.rank, step])
    torch.set_rng_state(tensors["rng.torch_cpu"])
    v, state, gauss = meta["python_rng"]
    random.setstate((v, tuple(state), gauss))
    return step


def model_card(info: dict) -> str:
    """Markdown of the run: data, training, final figures (appended to the bundle's README.md)."""
    rows = "\n".join(f"| {k} | {v} |" for k, v in info.items())
    return ("## Stage 2: DiT pretraining\n\nRectified flow (SD3 logit-normal times, velocity target) with diffusion "
            "forcing over latent windows of the frozen stage-1 autoencoder; EMA weights.\n\n"
            f"| field | value |\n| --- | --- |\n{rows}\n")


def export_bundle(out_dir: Path, *, ema: PretrainNet, autoencoder: torch.nn.Module, mean: torch.Tensor,
                  std: torch.Tensor, train: LatentDataset, context_len: int, num_actions: int, game: str,
                  action_meanings: list[str], sampling_steps: int, start_contexts: int, seed: int,
                  card: str) -> Path:
    """Save the EMA world model as a bundle (float32, CPU) with start contexts drawn from training episodes.

    Returns:
        ``out_dir``.
    Raises:
        ValueError: no training episode segment holds ``context_len`` rows.
    """
    dit, heads = copy.deepcopy(ema.dit).cpu().float(), copy.deepcopy(ema.heads).cpu().float()
    wm = DiTWorldModel(copy.deepcopy(autoencoder).cpu().float(), dit, heads, sampling_steps=sampling_steps)
    wm.set_latent_stats(mean.detach().cpu().float(), std.detach().cpu().float())
    z, a = sample_contexts(train.z.astype(np.float32), train.action, train.episode, train.step, context_len,
                           start_contexts, num_actions, seed=seed)
    return save_bundle(wm.eval(), out_dir, game=game, action_meanings=action_meanings, start_z=torch.from_numpy(z),
                       start_a=torch.from_numpy(a), card=card, overwrite=True)


def configs_meta(net: PretrainNet) -> dict:
    """The network configs as plain dicts (compared on ``--resume``)."""
    return {"dit": asdict(net.dit.config), "heads": asdict(net.heads.config)}
