"""``ditwm train-autoencoder``: train the stage-1 frame autoencoder on real frames, measure ball/paddle survival.

:class:`AutoencoderTrainer` is the straight-line optimisation step the stage-1 trainer reuses (AdamW, linear
warm-up then cosine decay, a step counter, a checkpointable state of plain tensors + JSON values).
:func:`reconstruction_report` measures what the world models need from the frozen autoencoder: on real frames,
does the reconstruction keep Pong's ball and both paddles where they are (colour locator of
:mod:`trainers.pong_objects`, DESIGN.md §4)?

The CLI trains on the rows of the non-held-out episodes of an episode store (:func:`trainers.data.heldout_mask`),
writes ``autoencoder.safetensors`` (weights) and ``autoencoder.json`` (the :class:`AutoencoderConfig`, the same
layout as the stage-1 export, see :func:`load_autoencoder`) atomically, plus ``report.json`` (arguments, training
time, held-out report); logs metrics to ``metrics.jsonl`` and prints the held-out reconstruction report.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dit_envs.io import atomic_save_tensors, atomic_write_json, load_tensors
from dit_envs.models.autoencoder import AUTOENCODER_PRESETS, AutoencoderConfig, FrameAutoencoder
from trainers.checkpoint import load_optimizer_state, optimizer_state
from trainers.common import ArgError, JsonlLogger, arg, check_out_dir, pick_device, run_cli, seed_everything
from trainers.data import EpisodeStore, heldout_mask
from trainers.pong_objects import locate_pong_objects

WEIGHTS, CONFIG, REPORT = "autoencoder.safetensors", "autoencoder.json", "report.json"


def lr_at(step: int, base_lr: float, warmup: int, total: int, final_frac: float = 0.1) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warm-up over ``warmup`` steps, then cosine decay
    from ``base_lr`` to ``final_frac · base_lr`` at ``total`` steps (constant after ``total``)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (final_frac + (1.0 - final_frac) * 0.5 * (1.0 + math.cos(math.pi * progress)))


class AutoencoderTrainer:
    """AdamW training of a :class:`FrameAutoencoder` on batches of uint8 frames.

    Args:
        model: the autoencoder (already on its device); trained in place.
        lr: peak learning rate.
        total_steps: length of the cosine schedule (steps after it keep the final rate).
        warmup: linear warm-up steps.
        weight_decay: AdamW decoupled weight decay.
        grad_clip: max global gradient norm.
    Attributes:
        step: optimiser steps taken so far.
    Raises:
        ValueError: a non-positive ``lr`` / ``total_steps``, or negative ``warmup`` (message names the field).
    """

    def __init__(self, model: FrameAutoencoder, *, lr: float = 2e-3, total_steps: int = 2000, warmup: int = 100,
                 weight_decay: float = 1e-4, grad_clip: float = 1.0) -> None:
        for name, value in (("lr", lr), ("total_steps", total_steps)):
            if not value > 0:
                raise ValueError(f"{name}: expected > 0, got {value}")
        if warmup < 0:
            raise ValueError(f"warmup: expected >= 0, got {warmup}")
        self.model, self.base_lr, self.total_steps, self.warmup = model, lr, total_steps, warmup
        self.grad_clip = grad_clip
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.99))
        self.step = 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train_step(self, frames: torch.Tensor) -> dict[str, float]:
        """One optimiser step on a batch.

        Args:
            frames: uint8 ``(B, 3, 64, 64)`` (any device; moved to the model's).
        Returns:
            metrics of :meth:`FrameAutoencoder.loss` plus ``lr`` and ``grad_norm``.
        Raises:
            ValueError: wrong dtype or shape of ``frames``.
        """
        self.model.train()
        lr = lr_at(self.step, self.base_lr, self.warmup, self.total_steps)
        for group in self.opt.param_groups:
            group["lr"] = lr
        dev = self.device
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss, metrics = self.model.loss(frames.to(dev))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.opt.step()
        self.step += 1
        return {**metrics, "lr": lr, "grad_norm": float(grad_norm)}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Checkpointable state without pickle.

        Returns:
            ``(tensors, meta)``: ``tensors`` holds ``model.<name>`` and ``optim.state.<param>.<key>`` tensors (for
            safetensors), ``meta`` the JSON-able rest: ``step`` and the optimiser's ``param_groups`` / scalars.
        """
        tensors = {f"model.{k}": v.detach().clone() for k, v in self.model.state_dict().items()}
        opt_tensors, opt_meta = optimizer_state(self.opt, "optim")
        tensors.update({k: v.detach().clone() for k, v in opt_tensors.items()})
        return tensors, {"step": int(self.step), "optim": json.loads(json.dumps(opt_meta))}  # tuples → lists

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Restore :meth:`state_dict` output (tensors on any device; they are copied to the model's).

        Raises:
            KeyError: ``meta`` lacks ``step`` or ``optim``.
            RuntimeError: model tensors that do not match the model (from ``nn.Module.load_state_dict``).
        """
        model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        self.model.load_state_dict(model)
        opt = {k: v.to(self.device) for k, v in tensors.items() if k.startswith("optim.")}
        load_optimizer_state(self.opt, "optim", opt, meta["optim"])
        self.step = int(meta["step"])


def _object_errors(real: np.ndarray, recon: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per object: (visible in the real frame bool (N,), position error px float (N,), inf where missing)."""
    a, b = locate_pong_objects(real), locate_pong_objects(recon)
    out = {}
    for name, pa, pb in (("ball", a.ball, b.ball), ("agent", a.agent_y, b.agent_y),
                         ("opponent", a.opponent_y, b.opponent_y)):
        pa, pb = pa.reshape(len(real), -1), pb.reshape(len(real), -1)
        visible = np.isfinite(pa).all(1)
        err = np.sqrt(((pa - pb) ** 2).sum(1))
        out[name] = (visible, np.where(np.isfinite(err), err, np.inf))
    return out


@torch.no_grad()
def reconstruction_report(ae: torch.nn.Module, frames: np.ndarray, batch: int = 256) -> dict:
    """How well reconstructions keep Pong's ball and paddles (positions from
    :func:`trainers.pong_objects.locate_pong_objects` on the real frame vs its reconstruction).

    Args:
        ae: anything with ``encode(uint8 (N,3,64,64)) -> (N, d_z)`` and ``decode_uint8((N, d_z)) -> uint8 frames``
            (a :class:`FrameAutoencoder`); frames go to the device of its first parameter (CPU if it has none).
            Put in eval mode for the call and restored afterwards.
        frames: uint8 ``(N, 3, 64, 64)`` real frames.
        batch: frames per encode/decode call.
    Returns:
        ``{"frames": N, "psnr": dB over all pixels, "ball"|"agent"|"opponent": {"visible": frames where the object
        is visible in the real frame, "within_2px": fraction of those whose reconstructed position is within 2 px
        (Euclidean; a missing object counts as a miss), "missing": fraction of those where it is not found at all,
        "median_px": median error over those (inf when more than half are missing; NaN when never visible)}}``.
    Raises:
        ValueError: ``frames`` is not uint8 ``(N, 3, 64, 64)`` with N ≥ 1, or ``batch`` < 1.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (3, 64, 64) or len(frames) == 0:
        raise ValueError(f"frames: expected uint8 (N, 3, 64, 64) with N >= 1, got {frames.dtype} {frames.shape}")
    if batch < 1:
        raise ValueError(f"batch: expected >= 1, got {batch}")
    param = next(iter(ae.parameters()), None) if hasattr(ae, "parameters") else None
    dev = param.device if param is not None else torch.device("cpu")
    was_training = getattr(ae, "training", False)
    if hasattr(ae, "eval"):
        ae.eval()
    recon, sq = [], 0.0
    for i in range(0, len(frames), batch):
        x = torch.as_tensor(frames[i:i + batch]).to(dev)
        r = ae.decode_uint8(ae.encode(x)).cpu()
        sq += ((r.double() - x.cpu().double()) / 255.0).square().sum().item()
        recon.append(r.numpy())
    if was_training:
        ae.train()
    mse = sq / frames.size
    report: dict = {"frames": int(len(frames)), "psnr": float(10 * np.log10(1.0 / max(mse, 1e-12)))}
    for name, (visible, err) in _object_errors(frames, np.concatenate(recon)).items():
        e = err[visible]
        report[name] = {
            "visible": int(visible.sum()),
            "within_2px": float((e <= 2.0).mean()) if len(e) else float("nan"),
            "missing": float(np.isinf(e).mean()) if len(e) else float("nan"),
            "median_px": float(np.median(e)) if len(e) else float("nan"),
        }
    return report


def _json_safe(obj):
    """NaN / ±inf floats → None, recursively (strict JSON has no such numbers)."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def format_report(report: dict) -> str:
    """One line per object of a :func:`reconstruction_report` dict."""
    lines = [f"{report['frames']} frames, PSNR {report['psnr']:.2f} dB"]
    for name in ("ball", "agent", "opponent"):
        r = report[name]
        lines.append(f"  {name:<8} visible {r['visible']:>6}  within 2 px {100 * r['within_2px']:6.2f} %  "
                     f"missing {100 * r['missing']:5.2f} %  median {r['median_px']:.2f} px")
    return "\n".join(lines)


def load_autoencoder(directory: str | Path, device: str | torch.device = "cpu") -> FrameAutoencoder:
    """Load ``autoencoder.json`` (the :class:`AutoencoderConfig` as plain JSON) + ``autoencoder.safetensors`` from
    ``directory`` — the layout this CLI and the stage-1 export write. No pickle.

    Returns:
        the :class:`FrameAutoencoder` on ``device``, in eval mode.
    Raises:
        FileNotFoundError: a file is missing. ValueError: a config that does not build, or tensors that do not
        match it (the message names the file).
    """
    directory = Path(directory)
    try:
        model = FrameAutoencoder(AutoencoderConfig(**json.loads((directory / CONFIG).read_text())))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{directory / CONFIG}: expected an autoencoder config, got one that does not build "
                         f"({e!r})") from e
    try:
        model.load_state_dict(load_tensors(directory / WEIGHTS))
    except RuntimeError as e:
        raise ValueError(f"{directory / WEIGHTS}: tensors do not match the config ({e})") from e
    return model.to(device).eval()


@dataclass(kw_only=True)
class Args:
    data: str = arg(help="episode store directory (trains on its non-held-out episodes)")
    out: str = arg(help="output directory (new or empty)")
    steps: int = arg(help="optimiser steps")
    batch: int = arg(16, "frames per step (small batches, many steps: best ball survival per CPU second)")
    seed: int = arg(0, "seed of the initialisation and the batch sampler")
    preset: str = arg("base", "autoencoder size preset", choices=tuple(AUTOENCODER_PRESETS))
    lr: float = arg(2e-3, "peak learning rate (AdamW, warm-up then cosine decay)")
    warmup: int = arg(100, "linear warm-up steps")
    foreground_weight: float = arg(-1.0, "loss weight of non-background pixels (negative: the preset's)")
    log_every: int = arg(50, "steps between metric log lines")
    device: str = arg("cpu", "torch device: cpu, cuda[:i] or auto")
    threads: int = arg(0, "torch CPU threads (0: torch's default)")
    report_frames: int = arg(5000, "held-out frames in the final report (at most; evenly spaced)")


def validate(args: Args) -> dict[str, np.ndarray]:
    """Check every argument (raise :class:`ArgError`, nothing written); return the loaded store's rows."""
    for name in ("steps", "batch", "log_every", "report_frames"):
        if getattr(args, name) <= 0:
            raise ArgError(name, f"expected an integer > 0, got {getattr(args, name)}")
    if not args.lr > 0:
        raise ArgError("lr", f"expected > 0, got {args.lr}")
    if args.warmup < 0 or args.threads < 0:
        name = "warmup" if args.warmup < 0 else "threads"
        raise ArgError(name, f"expected an integer >= 0, got {getattr(args, name)}")
    if args.preset not in AUTOENCODER_PRESETS:
        raise ArgError("preset", f"expected one of {tuple(AUTOENCODER_PRESETS)}, got {args.preset!r}")
    pick_device(args.device)
    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()):  # (check_out_dir's message would suggest a --resume we do not have)
        raise ArgError("out", f"expected an empty or new directory, got a non-empty one: {out}")
    check_out_dir(out, resume=False)
    store = EpisodeStore(args.data)
    try:
        store.read_meta()
    except (FileNotFoundError, ValueError) as e:
        raise ArgError("data", f"expected an episode store, got {e}") from None
    data = store.load()
    n_train = int((~heldout_mask(data["episode"])).sum())
    if n_train == 0:
        raise ArgError("data", f"expected frames of non-held-out episodes, got {len(data['episode'])} rows and none")
    return data


def main(args: Args) -> int:
    """Train, save, report; returns the exit code (0)."""
    data = validate(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    seed_everything(args.seed)
    held = heldout_mask(data["episode"])
    train, test = data["obs"][~held], data["obs"][held]
    cfg = AUTOENCODER_PRESETS[args.preset]
    if args.foreground_weight >= 0:
        cfg = AutoencoderConfig(**{**asdict(cfg), "foreground_weight": args.foreground_weight})
    model = FrameAutoencoder(cfg).to(device)
    trainer = AutoencoderTrainer(model, lr=args.lr, total_steps=args.steps, warmup=args.warmup)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logger = JsonlLogger(out / "metrics.jsonl")
    rng = np.random.default_rng(args.seed)
    print(f"train-autoencoder: preset {args.preset}, d_z {model.latent_dim}, "
          f"{sum(p.numel() for p in model.parameters())} params; {len(train)} train / {len(test)} held-out frames")
    t0 = time.perf_counter()
    bar = tqdm(range(args.steps), desc="train-autoencoder", disable=not sys.stderr.isatty())
    for _ in bar:
        frames = torch.from_numpy(train[rng.integers(0, len(train), args.batch)])
        metrics = trainer.train_step(frames)
        if trainer.step % args.log_every == 0 or trainer.step == args.steps:
            dt = time.perf_counter() - t0
            logger.log(trainer.step, **metrics, steps_per_s=trainer.step / dt)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", psnr=f"{metrics['psnr']:.1f}")
    bar.close()
    train_s = time.perf_counter() - t0
    print(f"trained {args.steps} steps x {args.batch} frames in {train_s:.0f} s ({args.steps / train_s:.2f} steps/s)")
    model.eval()
    report = None
    if len(test):
        idx = np.linspace(0, len(test) - 1, min(len(test), args.report_frames)).round().astype(np.int64)
        report = reconstruction_report(model, test[np.unique(idx)])
        logger.log(trainer.step, **{f"heldout/{k}/{m}": v for k in ("ball", "agent", "opponent")
                                    for m, v in report[k].items()}, **{"heldout/psnr": report["psnr"]})
        print("held-out reconstruction: " + format_report(report))
    else:
        print("held-out reconstruction: no held-out episodes in the store (fewer than 10 episodes); no report")
    logger.close()
    atomic_save_tensors(out / WEIGHTS, model.state_dict())
    atomic_write_json(out / REPORT, {
        "latent_dim": model.latent_dim, "args": asdict(args), "train_seconds": round(train_s, 1),
        "heldout_report": _json_safe(report),
    })
    atomic_write_json(out / CONFIG, asdict(cfg))
    return 0


def cli(argv: list[str] | None = None) -> int:
    return run_cli(Args, main, "ditwm train-autoencoder", argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    raise SystemExit(cli())
