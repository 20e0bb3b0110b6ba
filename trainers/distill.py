"""``ditwm distill``: stage 2b — distil a pretrained DiT world model into a 1-, 2- or 4-step sampler.

The student starts as a copy of the teacher's DiT plus a zero-initialised step-size embedding (with
``--student-depth``, a copy of fewer of its blocks: a faster student, :mod:`trainers.distill_student`) and learns, on
real contexts of the store's training episodes (with ``--imagined-fraction``, partly on contexts the teacher imagined
under random actions, and with ``--imagined-refresh`` on the student's own rollouts, DAgger-style:
:mod:`trainers.distill_pool`), the teacher's average velocity over jumps of 1, 2, 4, … teacher
steps (every jump of each teacher trajectory, the context encoded once: ``--jumps all``;
:mod:`trainers.distill_objective`, which gives the method, its reason and its papers; ``--pixel-weight`` adds a
pixel term on the decoded end points, :meth:`~trainers.distill_objective.DistillNet.pixel_loss`; ``--temperatures``
starts the teacher trajectories at the sampling temperatures the student will be used at, e.g. the release's 0.5,
instead of 1 only; the first is the bundle's default). The frozen
autoencoder, the reward/termination head, the latent standardisation and the start contexts are the teacher's,
unchanged; the exported bundle is a drop-in world model whose ``sampling_steps`` (default ``--sampling-steps``)
stays a runtime setting of the env.

Same plumbing as ``ditwm pretrain``: AdamW with warm-up + cosine schedule, gradient clipping, EMA weights (the
exported ones), JSONL metrics, atomic resumable checkpoints (``--resume``; a resumed CPU run equals an
uninterrupted one), SIGTERM/SIGINT checkpoint and exit 143/130, bf16 autocast (CUDA by default, CPU with
``--precision bf16``), ``torchrun`` + DDP.
Evaluation every ``--eval-every`` steps on fixed held-out windows: ``eval/gap@k`` (mean squared distance between
the student's ``k``-step sample and the teacher's ``N``-step sample from the same noise, normalised units; for a
streaming student from a fresh cache of the K context rows: the first step after a reset; ``eval/gap@k@Tτ`` the same
from noise ``τ·ε`` for each other of ``--temperatures``) and the open-loop latent
error ``eval/mse@h`` of the student at ``--sampling-steps`` (a streaming student rolling its cache as in an env).
"""
from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from dit_envs.bundle import load_bundle
from dit_envs.io import sha256_file
from dit_envs.models.dit_world_model import DiTWorldModel
from trainers import distributed as dist_
from trainers.autoencoder import lr_at
from trainers.common import (PRECISIONS, ArgError, JsonlLogger, LoopArgs, adamw, arg, autocast_for, catch_stop_signals,
                             check_choice, check_out_dir, pick_device, run_cli, seed_everything, signal_exit_code)
from trainers.data import EpisodeStore, heldout_mask
from trainers.distill_objective import (JUMPS, DistillNet, check_temperatures, make_distill_inputs, sample_gap,
                                        step_levels)
from trainers.distill_pool import OwnRolloutPool, imagined_pool
from trainers.distill_student import export_student, make_student
from trainers.latents import LatentWindows, load_latents_on_ranks
from trainers.pretrain_eval import eval_windows, evaluate
from trainers.pretrain_objective import PretrainNet, optimizer_step
from trainers.pretrain_state import rank_seed, read_state, restore_state, save_state


@dataclass(kw_only=True)
class Args(LoopArgs):
    teacher: str = arg(help="teacher world-model bundle directory (from ditwm pretrain)")
    data: str = arg(help="episode store the teacher was trained on (distils on its non-held-out episodes)")
    out: str = arg(help="output directory: ckpt/, metrics.jsonl, bundle/ (new or empty unless --resume)")
    steps: int = arg(6000, "optimiser steps in total")
    batch: int = arg(64, "contexts per step per process")
    lr: float = arg(2e-4, "peak learning rate (AdamW, linear warm-up then cosine decay to a tenth)")
    warmup: int = arg(200, "linear warm-up steps")
    lr_decay_steps: int = arg(0, "length of the warm-up + cosine schedule (0: --steps)")
    weight_decay: float = arg(0.0, "AdamW decoupled weight decay of matrices")
    teacher_steps: int = arg(0, "teacher Euler steps N, a power of two (0: the teacher bundle's sampling_steps)")
    sampling_steps: int = arg(2, "default Euler steps stored in the student bundle (1, 2, 4, ... up to N); 2 kept the "
                                 "teacher's action sensitivity on Pong where 1 lost 0.05")
    checkpoint_every: int = arg(500, "steps between resumable checkpoints")
    pixel_weight: float = arg(0.0, "weight of a pixel MSE between the decoded end points of the student's and the "
                                   "teacher's jumps, moving and non-background pixels weighted 1 + --motion-boost "
                                   "(0: off); on Pong it reduces how often one-step samples lose the few-pixel paddle")
    motion_boost: float = arg(100.0, "extra weight of moving and non-background pixels in the pixel term")
    imagined_fraction: float = arg(0.0, "share of each batch drawn from contexts the teacher imagined under sticky "
                                        "random actions (trainers.distill_pool; 0: real contexts only)")
    imagined_pool: int = arg(16384, "imagined contexts in that pool (at most; rollouts stop at a predicted game over), "
                                    "built by every process at the start of every run, resumed ones included")
    imagined_steps: int = arg(8, "imagined steps per rollout of the pool")
    imagined_refresh: int = arg(0, "every this many steps, rebuild a second half of the imagined pool from the "
                                   "student's own rollouts at its 1 .. N/2-step samplers, teacher targets unchanged "
                                   "(DAgger; trainers.distill_pool.OwnRolloutPool); 0: the teacher's rollouts only")
    imagined_sticky: float = arg(0.75, "probability that a pool rollout repeats its previous action (else a uniform "
                                       "random one): higher gives longer runs of one action, e.g. a paddle held "
                                       "against a wall (on Pong 0.9 measured no better than 0.75)")
    student_depth: int = arg(0, "transformer blocks of the student (0: the teacher's); fewer gives a faster student, "
                                "initialised from evenly spaced teacher blocks (the first and the last for 2 or more)")
    streaming: bool = arg(False, "a streaming student (sliding-window attention, relative positions): the env keeps "
                                 "its context keys/values and encodes one token per step instead of the whole context; "
                                 "trained with 0 .. (depth - 1) x K history rows before each context (imagined "
                                 "contexts: their real rows, then the rollout's)")
    temperatures: list[float] = arg([1.0], "sampling temperatures the student is distilled at: each teacher "
                                           "trajectory starts at tau x noise (a --prev-source S teacher's: at the "
                                           "last latent + S x tau x noise), tau drawn uniformly from these, and "
                                           "--imagined-refresh rolls the student at each; the first is the bundle's "
                                           "default (e.g. 0.5 1 for a model used at 0.5 by default and at 1)")
    jumps: str = arg("all", "targets per teacher trajectory: 'all' its 2N - 1 jumps (the context encoded once, one "
                            "query token per jump), or 'one' jump drawn per context (the objective before 'all'); "
                            "with --pixel-weight, 'all' decodes log2(N) + 1 images per context instead of about 0.6")


RESUME_FIXED = ("pixel_weight", "motion_boost", "imagined_fraction", "imagined_pool", "imagined_steps",
                "imagined_sticky", "imagined_refresh", "streaming", "jumps", "temperatures")
"""Flags a ``--resume`` must repeat (checked against the checkpoint's)."""
LEGACY = {"jumps": "one", "temperatures": [1.0]}
"""What checkpoints written before a flag existed ran with, where it differs from the flag's default."""


@dataclass
class Setup:
    """What validation found: the loaded teacher bundle, its hash, the store's metadata, ``N``."""

    bundle: object
    teacher_sha256: str
    meta: dict
    teacher_steps: int


def validate(args: Args) -> Setup:
    """Check every argument; raise :class:`ArgError` (names the flag) before anything is written."""
    for name in ("steps", "batch", "lr", "grad_clip", "log_every", "checkpoint_every", "eval_windows",
                 "eval_horizon", "sampling_steps"):
        if getattr(args, name) <= 0:
            raise ArgError(name, f"expected a number > 0, got {getattr(args, name)}")
    check_choice("precision", args.precision, PRECISIONS)
    check_choice("jumps", args.jumps, JUMPS)
    for name in ("warmup", "lr_decay_steps", "weight_decay", "eval_every", "threads", "teacher_steps",
                 "student_depth", "pixel_weight", "motion_boost", "imagined_refresh"):
        if not getattr(args, name) >= 0 or not math.isfinite(getattr(args, name)):
            raise ArgError(name, f"expected a number >= 0, got {getattr(args, name)}")
    for name in ("imagined_pool", "imagined_steps"):
        if getattr(args, name) < 1:
            raise ArgError(name, f"expected an integer >= 1, got {getattr(args, name)}")
    if not 0.0 <= args.imagined_sticky <= 1.0:
        raise ArgError("imagined_sticky", f"expected a probability in [0, 1], got {args.imagined_sticky}")
    if not 0.0 <= args.imagined_fraction <= 1.0:
        raise ArgError("imagined_fraction", f"expected a number in [0, 1], got {args.imagined_fraction}")
    if args.imagined_fraction and round(args.imagined_fraction * args.batch) < 1:
        raise ArgError("imagined_fraction", f"expected 0 or at least one row of --batch {args.batch}, got "
                                            f"{args.imagined_fraction}")
    if args.imagined_refresh and not args.imagined_fraction:
        raise ArgError("imagined_refresh", f"expected 0 without --imagined-fraction, got {args.imagined_refresh}")
    try:
        check_temperatures(args.temperatures)
    except ValueError as e:
        raise ArgError("temperatures", str(e).split(": ", 1)[1]) from None
    if not 0.0 <= args.ema < 1.0:
        raise ArgError("ema", f"expected a number in [0, 1), got {args.ema}")
    pick_device(args.device)
    check_out_dir(args.out, args.resume)
    try:
        bundle = load_bundle(args.teacher)
    except (FileNotFoundError, ValueError) as e:
        raise ArgError("teacher", f"expected a world-model bundle directory, got {e}") from None
    if not isinstance(bundle.model, DiTWorldModel):
        raise ArgError("teacher", f"expected a 'dit' bundle, got model_type {bundle.config.get('model_type')!r}")
    if bundle.model.dit.config.shortcut_steps:
        raise ArgError("teacher", f"expected an undistilled DiT (from ditwm pretrain), got a distilled student "
                                  f"(shortcut_steps {bundle.model.dit.config.shortcut_steps})")
    depth = bundle.model.dit.config.depth
    if args.student_depth > depth:
        raise ArgError("student_depth", f"expected at most the teacher's depth {depth}, got {args.student_depth}")
    if args.streaming and bundle.model.dit.config.patch_size:
        raise ArgError("streaming", f"expected a teacher with one token per time step, got spatial tokens (patch_size "
                                    f"{bundle.model.dit.config.patch_size})")
    n = args.teacher_steps or int(bundle.config.get("sampling_steps", 4))
    try:
        levels = step_levels(n)
    except ValueError as e:
        raise ArgError("teacher_steps", str(e)) from None
    students = sorted(n // m for m in levels)
    if args.sampling_steps not in students:
        raise ArgError("sampling_steps", f"expected one of {students} (N = {n}), got {args.sampling_steps}")
    try:
        meta = EpisodeStore(args.data).read_meta()
    except (FileNotFoundError, ValueError) as e:
        raise ArgError("data", f"expected an episode store, got {e}") from None
    for key in ("game", "action_meanings"):
        if meta.get(key) != bundle.config.get(key):
            raise ArgError("data", f"expected {key} {bundle.config.get(key)!r} (the teacher's), got {meta.get(key)!r}")
    sha = sha256_file(Path(args.teacher) / "dynamics.safetensors")
    if args.resume and ((Path(args.out) / "ckpt").exists() or (Path(args.out) / "ckpt.prev").exists()):
        try:
            _, ck = read_state(Path(args.out))
        except FileNotFoundError as e:
            raise ArgError("resume", f"expected a readable checkpoint, got {e}") from None
        if ck.get("teacher_sha256") != sha:
            raise ArgError("teacher", f"expected the checkpoint's teacher (dynamics sha256 {ck.get('teacher_sha256')}"
                                      f"), got {sha}")
        if ck.get("teacher_steps") != n:
            raise ArgError("teacher_steps", f"expected {ck.get('teacher_steps')} (the checkpoint's), got {n}")
        ck_depth = ck.get("student", {}).get("depth", depth)
        if ck_depth != (args.student_depth or depth):
            raise ArgError("student_depth", f"expected {ck_depth} (the checkpoint's student), got "
                                            f"{args.student_depth or depth}")
        for name in RESUME_FIXED:  # the objective and the data it is drawn from: a resumed run equals an unbroken one
            was = ck.get("args", {}).get(name, LEGACY.get(name, getattr(Args, name, None)))
            if was != getattr(args, name):
                raise ArgError(name, f"expected {was} (the checkpoint's), got {getattr(args, name)}")
    return Setup(bundle=bundle, teacher_sha256=sha, meta=meta, teacher_steps=n)


def main(args: Args) -> int:
    """Distil (or resume), export the student bundle; returns 0, or 143/130 after SIGTERM/SIGINT (torchrun: exits
    with it, :func:`trainers.distributed.run`)."""
    setup = validate(args)
    return dist_.run(pick_device(args.device), lambda d: _run(args, setup, d))


def _run(args: Args, s: Setup, d: dist_.Dist) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    out, dev, N = Path(args.out), d.device, s.teacher_steps
    wm: DiTWorldModel = s.bundle.model.to(dev)
    K, A = wm.context_len, wm.num_actions
    ae_sha = sha256_file(Path(args.teacher) / "autoencoder.safetensors")
    ds = load_latents_on_ranks(d, args.data, wm.autoencoder, ae_sha, out, "distill")
    held = heldout_mask(ds.episode)
    train, test = ds.select(~held), ds.select(held)
    if len(train) == 0:
        raise ArgError("data", "expected non-held-out episodes to distil on, got none")

    teacher = wm.dit.requires_grad_(False).eval()
    seed_everything(args.seed)  # the student's new step embedding: identical on every rank and every run
    net = DistillNet(make_student(teacher, N, args.student_depth, args.streaming)).to(dev)
    max_history = (net.dit.config.depth - 1) * K if args.streaming else 0  # rows the cache's last layer reaches
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    if args.pixel_weight:  # after the EMA copy: the EMA needs no decoder
        net.set_decoder(wm.autoencoder, wm.latent_mean, wm.latent_std, pixel_weight=args.pixel_weight,
                        motion_boost=args.motion_boost)
    opt = adamw(net, args.lr, args.weight_decay)
    gen = torch.Generator(device=dev).manual_seed(rank_seed(args.seed, d.rank))
    mean, std = wm.latent_mean.detach().cpu(), wm.latent_std.detach().cpu()
    windows = LatentWindows(train, K + 1, mean=mean, std=std, num_actions=A, seed=[args.seed, d.rank], device=dev)
    levels = sorted(N // m for m in step_levels(N))
    pool, own = None, None
    if args.imagined_fraction:
        t_pool = time.perf_counter()
        pool = imagined_pool(wm, windows, size=args.imagined_pool, steps=args.imagined_steps,
                             seed=rank_seed(args.seed, d.rank) + 1, sticky=args.imagined_sticky, history=max_history)
        if d.is_main:
            print(f"distill: {len(pool[0])} imagined contexts ({args.imagined_steps}-step teacher rollouts) in "
                  f"{time.perf_counter() - t_pool:.1f} s")
        if args.imagined_refresh:
            own = OwnRolloutPool(wm, windows, pool, every=args.imagined_refresh, levels=[k for k in levels if k < N]
                                 or levels, size=args.imagined_pool, steps=args.imagined_steps,
                                 sticky=args.imagined_sticky, history=max_history, seed=rank_seed(args.seed, d.rank) + 2,
                                 temperatures=args.temperatures)
    resume = args.resume and ((out / "ckpt").exists() or (out / "ckpt.prev").exists())
    step = 0
    if resume:
        tensors, meta = read_state(out)
        step = restore_state(tensors, meta, d, net=net, ema=ema, opt=opt, gen=gen, windows=windows, seed=args.seed)
        if own is not None:
            own.load_state_dict({k[len("extra.pool."):]: v for k, v in tensors.items()
                                 if k.startswith("extra.pool.")}, ema.dit, step)
            pool = own.rows
            if own.at and d.is_main:
                print(f"distill: rebuilt the student's own rollouts of step {own.at} from the checkpoint")
    model: torch.nn.Module = torch.compile(net) if args.compile else net
    if d.enabled:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    ev = eval_windows(test if len(test) else train, context_len=K, horizon=args.eval_horizon,
                      count=args.eval_windows, seed=args.seed, mean=mean, std=std, num_actions=A, device=dev)
    run_meta = {"args": asdict(args), "teacher_sha256": s.teacher_sha256, "teacher_steps": N,
                "student": asdict(net.dit.config)}
    log = JsonlLogger(out / "metrics.jsonl") if d.is_main else None

    def evaluate_all() -> dict[str, float]:
        stats = {f"eval/gap@{k}" + (f"@T{tau:g}" if tau != 1.0 else ""):
                 sample_gap(ema.dit, teacher, ev.x[:, :K], ev.prev_action[:, :K], ev.prev_action[:, K], teacher_steps=N,
                            student_steps=k, seed=args.seed, temperature=tau)
                 for tau in sorted({1.0, *args.temperatures}, reverse=True) for k in levels}
        roll = evaluate(PretrainNet(ema.dit, wm.heads).eval(), ev, context_len=K, sampling_steps=args.sampling_steps,
                        mean=windows.mean, std=windows.std, seed=args.seed)
        return {**stats, **{k: v for k, v in roll.items() if k.startswith("eval/mse@")}}

    if d.is_main:
        mparams = sum(p.numel() for p in teacher.parameters()) / 1e6
        print(f"distill: teacher {args.teacher} (N = {N} steps, {mparams:.2f} M params) -> student of {levels} steps"
              f" ({net.dit.config.depth} blocks); {len(train)} train rows; batch {args.batch} x {d.world_size}"
              f"; {'resuming at step ' + str(step) if step else 'from the teacher'}")
        if step == 0 and ev is not None:
            log.log(0, **evaluate_all())
    stop: dict[str, int | None] = {"sig": None}
    restore = catch_stop_signals(lambda signum: stop.__setitem__("sig", signum))
    autocast = autocast_for(dev, args.precision)
    bar = tqdm(total=args.steps, initial=step, unit="step", desc="distill",
               disable=not (d.is_main and sys.stderr.isatty()))
    t0, s0, saved, loss, final = time.perf_counter(), step, step, None, {}
    try:
        while step < args.steps:
            if dist_.any_rank(d, stop["sig"] is not None):
                break
            if own is not None and own.due(step):
                t_pool = time.perf_counter()
                n_own = own.refresh(step, ema.dit)
                pool = own.rows
                if d.is_main:
                    print(f"distill: step {step}: {n_own} contexts of the student's own rollouts in "
                          f"{time.perf_counter() - t_pool:.1f} s")
            lr = lr_at(step, args.lr, args.warmup, args.lr_decay_steps or args.steps)
            starts = windows.draw_starts(args.batch)
            w = windows.windows(starts)
            batch: tuple[torch.Tensor, ...] = (w.x[:, :K], w.prev_action[:, :K], w.prev_action[:, K])
            h = 0
            if args.streaming:  # a history of 0 .. max_history rows: cold caches (resets) and warm ones
                h = int(torch.randint(max_history + 1, (1,), generator=gen, device=gen.device))
                batch += windows.history(starts, h)
            if pool is not None:
                rows = pool[:3] + tuple(p[:, max_history - h:] for p in pool[3:])  # (only streaming pools have 6)
                batch = mix_in(rows, batch, round(args.imagined_fraction * args.batch), gen)
            with autocast:
                inputs = make_distill_inputs(teacher, *batch[:3], teacher_steps=N, generator=gen, jumps=args.jumps,
                                             temperatures=args.temperatures)
                if args.streaming:
                    inputs["history"], inputs["history_action"], inputs["history_valid"] = batch[3:]
                loss = model(inputs)
            grad_norm = optimizer_step(loss, net, ema, opt, lr=lr, grad_clip=args.grad_clip, step=step,
                                       ema_decay=args.ema)
            step += 1
            bar.update(1)
            if log is not None and (step % args.log_every == 0 or step == args.steps):
                log.log(step, loss=loss.item(), lr=lr, grad_norm=float(grad_norm),
                        steps_per_s=(step - s0) / (time.perf_counter() - t0))
                bar.set_postfix(loss=f"{loss.item():.4f}")
            if log is not None and ev is not None and args.eval_every and step % args.eval_every == 0:
                final = evaluate_all()
                log.log(step, **final)
            if step % args.checkpoint_every == 0 and step < args.steps:
                save_state(out, d, net=net, ema=ema, opt=opt, gen=gen, windows=windows, step=step, meta=run_meta,
                           extra=pool_state(own))
                saved = step
    finally:
        bar.close()
        restore()
    dt = time.perf_counter() - t0
    if step != saved:
        save_state(out, d, net=net, ema=ema, opt=opt, gen=gen, windows=windows, step=step, meta=run_meta,
                   extra=pool_state(own))
    if d.is_main:
        print(f"distill: {step - s0} steps in {dt:.1f} s: {(step - s0) / max(dt, 1e-9):.2f} steps/s; "
              f"checkpoint {out / 'ckpt'} at step {step}")
    if step < args.steps:
        if log is not None:
            log.close()
        return signal_exit_code(stop["sig"] or 15)
    if d.is_main:
        if ev is not None and not (args.eval_every and step % args.eval_every == 0 and step > s0):
            final = evaluate_all()
            log.log(step, **final)
        log.close()
        path = export_student(out / "bundle", s, ema.dit, args, step=step, final=final)
        print(f"distill: bundle {path}" + "".join(f"; {k} {v:.4g}" for k, v in final.items()))
    dist_.barrier(d)
    return 0


def pool_state(own: OwnRolloutPool | None) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of the student's own-rollout pool (``pool.*``; none without ``--imagined-refresh``)."""
    return {f"pool.{k}": v for k, v in own.state_dict().items()} if own is not None else {}


def mix_in(pool: tuple[torch.Tensor, ...], batch: tuple[torch.Tensor, ...], n: int,
           gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Replace the first ``n`` rows of each tensor of ``batch`` by the same ``n`` random rows of ``pool`` (tensors
    with matching trailing shapes; rows drawn uniformly with ``gen``)."""
    if n <= 0:
        return batch
    idx = torch.randint(len(pool[0]), (n,), generator=gen, device=gen.device)
    return tuple(torch.cat([p[idx], b[n:]]) for p, b in zip(pool, batch))


def cli(argv: list[str] | None = None) -> int:
    return run_cli(Args, main, "ditwm distill", argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    raise SystemExit(cli())
