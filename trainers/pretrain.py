"""``ditwm pretrain``: stage 2 — the Diffusion-Transformer world model on frozen stage-1 latents.

Every frame of the store is encoded once with the frozen stage-1 encoder (:mod:`trainers.latents`, cached in
``STORE/latents/``). A causal DiT (Peebles & Xie 2023; :mod:`dit_envs.models.dit`) learns the next latent by
rectified flow (Liu et al. 2022; SD3's logit-normal times, Esser et al. 2024) with diffusion forcing (Chen et
al. 2024), action dropout to the null index and a multi-step ``z_{t+n}`` term on its own rollouts (``--rollout-steps``
4: on Pong the held-out latent error at h 16 2.34e-3 → 1.66e-3, at h 64 3.43e-3 → 2.88e-3); a reward/termination
head learns from real transitions (:mod:`trainers.pretrain_objective`). Only non-held-out episodes train
(:func:`trainers.data.heldout_mask`); held-out ones are evaluated (:mod:`trainers.pretrain_eval`).

Options for rare, small events (in Pong: the agent's paddle returning the ball, under 1 % of our stage-1 windows, a
few pixels; a point won, one for every 8 to 56 lost), all off by default: ``--pixel-weight`` (a motion-weighted
pixel loss through the frozen decoder, :class:`trainers.pretrain_objective.PretrainNet`), ``--priority-fraction``
(prioritised replay on the model's one-step error), ``--event-fraction`` (windows near reward events, each sign
with equal mass; :mod:`trainers.priority`). ``--depth`` and ``--width`` override the preset's number of DiT blocks
and token width; ``--patch-size p`` makes each time step ``(H/p)·(W/p)`` spatial tokens (:mod:`dit_envs.models.dit`).

nanoGPT-style straight-line loop: AdamW with an explicit warm-up + cosine schedule (:func:`trainers.autoencoder.
lr_at`), gradient clipping, EMA weights; metrics to ``OUT/metrics.jsonl`` every ``--log-every`` steps, evaluation
every ``--eval-every``, resumable checkpoints in ``OUT/ckpt`` every ``--checkpoint-every`` (:mod:`trainers.
pretrain_state`). SIGTERM/SIGINT checkpoint at the next step boundary and exit 143/130. At the end the EMA model
is exported to ``OUT/bundle`` (``gym.make_vec("DiTWM/Pong-v0", checkpoint="OUT/bundle")``).

Devices: CPU by default; CUDA with bf16 autocast and optional ``--compile``; ``--precision bf16`` autocasts on CPU
too (AMX CPUs: batch 128 trains about 1.5 x faster than in float32). Distributed:
``torchrun --nproc_per_node=2 -m trainers.pretrain ...`` (DDP, gloo on CPU / nccl on GPU; ``--batch`` is per
process; each rank draws its own windows and noise; rank 0 alone writes files and logs).
"""
from __future__ import annotations

import copy
import json
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dit_envs.io import sha256_file
from dit_envs.models.dit import DIT_PRESETS, DiT
from dit_envs.models.heads import RewardTermHead
from trainers import distributed as dist_
from trainers.autoencoder import load_autoencoder, lr_at
from trainers.common import (PRECISIONS, ArgError, JsonlLogger, LoopArgs, adamw, arg, autocast_for, catch_stop_signals,
                             check_choice, check_out_dir, pick_device, run_cli, seed_everything, signal_exit_code)
from trainers.data import heldout_mask, segments
from trainers.latents import LatentWindows
from trainers.pretrain_data import biased_draw, check_stores, load_stores, return_rows, stores_index
from trainers.pretrain_eval import data_summary, eval_windows, evaluate
from trainers.pretrain_nets import FLAGS as NET_FLAGS, check_init, net_configs, saved_field
from trainers.pretrain_objective import ObjectiveConfig, PretrainNet, make_inputs, optimizer_step, total_loss
from trainers.priority import one_step_errors, priority_probabilities
from trainers.pretrain_state import (configs_meta, export_bundle, init_weights, model_card, rank_seed, read_init,
                                     read_state, restore_state, save_state)


@dataclass(kw_only=True)
class Args(LoopArgs):
    data: str = arg(help="episode store directory (trains on its non-held-out episodes)")
    extra_data: list[str] = arg([], "more episode stores trained on with --data as one (each its own latent cache; "
                                    "episode ids shifted as merge-stores does; trainers.pretrain_data)")
    stage1: str = arg("", "stage-1 artifacts (autoencoder.json + autoencoder.safetensors); '' = DATA/stage1")
    out: str = arg(help="output directory: ckpt/, metrics.jsonl, bundle/ (new or empty unless --resume)")
    steps: int = arg(help="optimiser steps in total")
    init: str = arg("", "fine-tune: start from the EMA weights and latent standardisation of an earlier pretrain "
                        "OUT (its ckpt) or of a DiT bundle (directory, hf:// source or env id; read_init); same "
                        "encoder and network config; --context-len >= its K (positions grown by init_weights); a "
                        "fresh optimiser and schedule ('': from scratch)")
    preset: str = arg("S", "DiT size preset", choices=tuple(DIT_PRESETS))
    depth: int = arg(0, "DiT blocks (0: the preset's; e.g. --preset S --depth 6 for a deeper S)")
    width: int = arg(0, "DiT token width (0: the preset's; a multiple of the preset's heads)")
    patch_size: int = arg(0, "spatial tokens: p x p patches of the latent grid, (H/p)(W/p) tokens per time step "
                             "(0: one token per time step)")
    prev_source: float = arg(0.0, "flow source: 0 = N(0, I) (rectified flow); S > 0 = the previous latent + S x noise "
                                  "(standardised units: the flow moves the last frame to the next)")
    conv_width: int = arg(0, "conv branches of width C beside the one-token embedding and output (local features of "
                             "the latent grid, dit_envs.models.dit_conv; 0: off); may be added to an --init run "
                             "without them (zero-initialised: it starts as that run)")
    batch: int = arg(32, "windows per step per process")
    lr: float = arg(6e-4, "peak learning rate (AdamW, linear warm-up then cosine decay to a tenth)")
    warmup: int = arg(500, "linear warm-up steps")
    lr_decay_steps: int = arg(0, "length of the warm-up + cosine schedule (0: --steps)")
    weight_decay: float = arg(0.01, "AdamW decoupled weight decay of matrices (biases/norms: none)")
    context_len: int = arg(0, "K context frames (0: the --init run's K, else stage 1's agent.json context_len, else 4)")
    seq_len: int = arg(0, "tokens per diffusion-forcing window, 2..K+1 (0: K+1)")
    clean_context: float = arg(0.5, "fraction of samples with a clean context and only the last token noisy")
    action_dropout: float = arg(0.1, "per-token probability of the null action (for unconditional use)")
    t_mean: float = arg(0.0, "training times t = sigmoid(m + s n), n ~ N(0, 1): m (< 0 trains more at low noise)")
    t_std: float = arg(1.0, "training times: s of the logit-normal (SD3's 0, 1 by default)")
    term_weight: float = arg(10.0, "termination BCE positive weight (terminations are rare)")
    rollout_steps: int = arg(4, "multi-step z_{t+n} term: predict z_{t+n}, n in [2, N], from the model's own "
                                "n-1-step rollout (0: off; on Pong N=4 cut the h-16 latent error by 29 %)")
    rollout_weight: float = arg(1.0, "weight of the multi-step term")
    rollout_sampling_steps: int = arg(1, "Euler steps per imagined step in the multi-step term")
    sampling_steps: int = arg(4, "Euler steps per env step stored in the bundle")
    start_contexts: int = arg(256, "real start contexts (training episodes) stored in the bundle")
    pixel_weight: float = arg(0.0, "weight of the decoded-pixel term (motion-weighted, via the frozen decoder; 0: off)")
    motion_boost: float = arg(100.0, "extra weight of moving pixels in the pixel term")
    latent_motion_weight: float = arg(0.0, "flow terms: latent elements that moved since the row before weigh 1 + W "
                                           "in each token's weighted-mean error (trainers.pretrain_objective); 0: off")
    latent_motion_threshold: float = arg(0.05, "a latent element moved when it changed by more than this")
    priority_fraction: float = arg(0.0, "fraction of each batch drawn in proportion to the model's own one-step "
                                        "error^alpha (prioritised replay, trainers.priority); 0: uniform windows")
    priority_alpha: float = arg(1.0, "exponent alpha of the prioritised draw")
    priority_every: int = arg(2000, "steps between recomputations of every window's error (EMA model; uniform before)")
    event_fraction: float = arg(0.0, "fraction of each batch drawn from windows that predict a reward event or "
                                     "lead to one within --event-horizon rows, each reward sign with equal mass "
                                     "(trainers.priority.event_probabilities); 0: off")
    event_horizon: int = arg(8, "rows after a window in which a reward event (or a return) makes it an event window")
    return_fraction: float = arg(0.0, "Pong: fraction of each batch drawn from windows that predict a return of the "
                                      "ball by the agent's paddle or lead to one within --event-horizon rows (found "
                                      "in the store's frames; trainers.pong_objects.agent_return_rows); 0: off")
    recent_fraction: float = arg(0.0, "fraction of each batch drawn uniformly from the windows of the last "
                                      "--extra-data store (e.g. the current policy's play in ditwm iterate); 0: off")
    checkpoint_every: int = arg(1000, "steps between resumable checkpoints")


@dataclass
class Setup:
    """What validation found: the store, the frozen encoder, the action space, ``K``."""
    meta: dict
    autoencoder: torch.nn.Module
    encoder_sha256: str
    context_len: int
    seq_len: int
    window: int
    init_state: tuple[dict, dict] | None = None
    returns: np.ndarray | None = None  # bool (R,): rows where the agent's paddle returns the ball (--return-fraction)
    stores: tuple[str, ...] = ()  # --data, then --extra-data


def _positive(args: Args, names: tuple[str, ...], strict: bool = True) -> None:
    for name in names:
        v = getattr(args, name)
        if (v <= 0) if strict else (v < 0):
            raise ArgError(name, f"expected a number {'>' if strict else '>='} 0, got {v}")


def validate(args: Args) -> Setup:
    """Check every argument; raise :class:`ArgError` (names the flag) before anything is written."""
    _positive(args, ("steps", "batch", "lr", "grad_clip", "term_weight", "log_every", "checkpoint_every",
                     "sampling_steps", "start_contexts", "eval_windows", "eval_horizon", "rollout_sampling_steps",
                     "priority_every", "latent_motion_threshold"))
    _positive(args, ("warmup", "lr_decay_steps", "weight_decay", "context_len", "seq_len", "eval_every", "threads",
                     "rollout_weight", "priority_alpha", "pixel_weight", "motion_boost", "event_horizon",
                     "latent_motion_weight", "depth", "width", "patch_size", "prev_source", "conv_width"), strict=False)
    check_choice("precision", args.precision, PRECISIONS)
    if args.preset not in DIT_PRESETS:
        raise ArgError("preset", f"expected one of {tuple(DIT_PRESETS)}, got {args.preset!r}")
    for name, hi in (("ema", 1.0), ("action_dropout", 1.0)):
        if not 0.0 <= getattr(args, name) < hi:
            raise ArgError(name, f"expected a number in [0, 1), got {getattr(args, name)}")
    for name, lo, hi in (("t_mean", -5.0, 5.0), ("t_std", 0.05, 5.0)):
        if not lo <= getattr(args, name) <= hi:  # also refuses NaN
            raise ArgError(name, f"expected a number in [{lo:g}, {hi:g}], got {getattr(args, name)}")
    for name in ("clean_context", "priority_fraction", "event_fraction", "return_fraction", "recent_fraction"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise ArgError(name, f"expected a number in [0, 1], got {getattr(args, name)}")
    for name in ("event_fraction", "return_fraction", "recent_fraction"):
        if args.priority_fraction and getattr(args, name):
            raise ArgError(name, f"expected 0 with --priority-fraction {args.priority_fraction} (error-prioritised "
                                 f"and event draws do not mix), got {getattr(args, name)}")
    for name, before in (("return_fraction", ("event_fraction",)), ("recent_fraction", ("event_fraction",
                                                                                          "return_fraction"))):
        rest = 1.0 - sum(getattr(args, b) for b in before)
        if getattr(args, name) > rest + 1e-12:
            raise ArgError(name, f"expected at most 1 - --{' - --'.join(b.replace('_', '-') for b in before)} = "
                                 f"{rest:g}, got {getattr(args, name)}")
    if args.recent_fraction and not args.extra_data:
        raise ArgError("recent_fraction", f"expected 0 without --extra-data (it draws from the last extra store), "
                                          f"got {args.recent_fraction}")
    if args.rollout_steps == 1 or args.rollout_steps < 0:
        raise ArgError("rollout_steps", f"expected 0 (off) or an integer >= 2, got {args.rollout_steps}")
    pick_device(args.device)
    check_out_dir(args.out, args.resume)
    meta = check_stores(args.data, args.extra_data)
    stage1 = Path(args.stage1 or Path(args.data) / "stage1")
    try:
        ae = load_autoencoder(stage1)
    except (FileNotFoundError, ValueError) as e:
        raise ArgError("stage1", f"expected stage-1 artifacts (autoencoder.json + autoencoder.safetensors), "
                                 f"got {e}") from None
    sha = sha256_file(stage1 / "autoencoder.safetensors")
    init_state = None
    if args.init:
        try:
            init_state = read_init(args.init, ae, sha)
        except (OSError, KeyError, ValueError) as e:  # OSError: a file, Hub errors; KeyError: an unknown env id
            why = e.args[0] if isinstance(e, KeyError) and e.args else e
            raise ArgError("init", f"expected a pretrain output with a checkpoint or a DiT bundle, got {why}") from None
    k = args.context_len or (int(init_state[1].get("context_len", 0)) if init_state else 0)  # default: --init's K
    agent = stage1 / "agent.json"  # else stage 1's K
    k = k or (int(json.loads(agent.read_text()).get("context_len", 4)) if agent.is_file() else 4)
    seq_len = args.seq_len or k + 1
    if not 2 <= seq_len <= k + 1:
        raise ArgError("seq_len", f"expected 2..{k + 1} (K + 1 with K = {k}), got {seq_len}")
    window = max(seq_len, k + args.rollout_steps, k + 1)
    stores = (args.data, *args.extra_data)
    episode, step, reward, source = stores_index(list(stores))
    for i, path in enumerate(stores):
        if not (source == i).any():
            raise ArgError("data" if i == 0 else "extra_data", f"expected an episode store with readable rows, got "
                                                               f"none in {path}")
    train = ~heldout_mask(episode)
    if args.return_fraction and meta["game"] != "Pong":
        raise ArgError("return_fraction", f"expected a Pong store (returns are located in Pong frames), got "
                                          f"game {meta['game']!r}")
    if args.event_fraction and not (reward[train] != 0).any():
        raise ArgError("event_fraction", f"expected a store with reward events in its training episodes, got none "
                                         f"in {int(train.sum())} rows of {', '.join(stores)}")
    _, lengths = segments(episode[train], step[train])
    longest = int(lengths.max()) if len(lengths) else 0
    if args.recent_fraction:
        last = train & (source == len(stores) - 1)
        _, recent_lengths = segments(episode[last], step[last])
        if not len(recent_lengths) or int(recent_lengths.max()) < window:
            raise ArgError("recent_fraction", f"expected a non-held-out episode of >= {window} frames in the last "
                                              f"--extra-data store {stores[-1]}, got {int(last.sum())} rows")
    if longest < window:
        raise ArgError("data", f"expected a non-held-out episode of >= {window} frames (K + max(1, rollout_steps)), "
                               f"got {int(train.sum())} rows whose longest episode segment has {longest}")
    dit_now = asdict(net_configs(args, ae, len(meta["action_meanings"]), k)[0])  # refused sizes fail before writes
    if args.resume and ((Path(args.out) / "ckpt").exists() or (Path(args.out) / "ckpt.prev").exists()):
        try:
            _, ck = read_state(Path(args.out))
        except FileNotFoundError as e:
            raise ArgError("resume", f"expected a readable checkpoint, got {e}") from None
        if ck.get("encoder_sha256") != sha:
            raise ArgError("stage1", f"expected the autoencoder of the checkpoint (sha256 {ck.get('encoder_sha256')}"
                                     f"), got {sha}")
        for name, have in (("preset", args.preset), ("context_len", k), *((f, dit_now[f]) for f in NET_FLAGS)):
            want = ck["args"]["preset"] if name == "preset" else saved_field(ck["configs"]["dit"], name)
            if want != have:
                raise ArgError(name, f"expected {want!r} (the checkpoint's), got {have!r}")
    if init_state is not None:
        ck = init_state[1]
        if ck.get("encoder_sha256") != sha:
            raise ArgError("init", f"expected a run on this stage-1 autoencoder (sha256 {sha}), got one on "
                                   f"{ck.get('encoder_sha256')}")
        if ck["args"]["preset"] is not None and args.preset != ck["args"]["preset"]:  # a bundle: configs only
            raise ArgError("preset", f"expected {ck['args']['preset']!r} (the --init run's), got {args.preset!r}")
        if k < ck.get("context_len", k):  # a context can grow (init_weights), not shrink
            raise ArgError("context_len", f"expected >= {ck['context_len']} (the --init run's), got {k}")
        check_init(ck.get("configs"), *net_configs(args, ae, len(meta["action_meanings"]),
                                                   ck.get("context_len", k)))
    returns = return_rows(list(stores), episode, train) if args.return_fraction else None  # reads frames: last
    return Setup(meta=meta, autoencoder=ae, encoder_sha256=sha, context_len=k, seq_len=seq_len, window=window,
                 init_state=init_state, returns=returns, stores=stores)


CONV_KEYS = ("dit.conv_embed.", "dit.conv_head.")  # the branches --conv-width may add to an --init run's weights


def _start(step: int, init: str) -> str:
    return f"resuming at step {step}" if step else f"from {init}" if init else "from scratch"


def main(args: Args) -> int:
    """Train (or resume), export the bundle; returns 0, or 143/130 after SIGTERM/SIGINT (torchrun: exits with it)."""
    setup = validate(args)
    return dist_.run(pick_device(args.device), lambda d: _run(args, setup, d))


def _run(args: Args, s: Setup, d: dist_.Dist) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    out, dev, K = Path(args.out), d.device, s.context_len
    names = list(s.meta["action_meanings"])
    A, ae = len(names), s.autoencoder.to(dev)
    ds, source = load_stores(d, list(s.stores), ae, s.encoder_sha256, out, "pretrain")
    held = heldout_mask(ds.episode)
    train, test = ds.select(~held), ds.select(held)
    summary = data_summary(ds, ~held)

    seed_everything(args.seed)  # identical initialisation on every rank
    dcfg, hcfg = net_configs(args, ae, A, K)
    cfg = ObjectiveConfig(seq_len=s.seq_len, **{k: getattr(args, k) for k in (
        "clean_context", "action_dropout", "term_weight", "rollout_steps", "rollout_weight", "rollout_sampling_steps",
        "pixel_weight", "motion_boost", "latent_motion_weight", "latent_motion_threshold", "t_mean", "t_std")})
    net = PretrainNet(DiT(dcfg), RewardTermHead(hcfg), args.term_weight).to(dev)
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    opt = adamw(net, args.lr, args.weight_decay)
    gen = torch.Generator(device=dev).manual_seed(rank_seed(args.seed, d.rank))
    z64 = train.z.astype(np.float64)
    mean, std = torch.from_numpy(z64.mean(0)).float(), torch.from_numpy(z64.std(0)).float().clamp(min=1e-3)
    resume = args.resume and ((out / "ckpt").exists() or (out / "ckpt.prev").exists())
    state = read_state(out) if resume else None
    if state is None and s.init_state is not None:  # fine-tuning: the EMA weights become the starting point
        init_t = s.init_state[0]  # its network config was checked in validate()
        ema_w = init_weights(init_t, s.init_state[1], K)  # K may exceed its context: positions grown
        fresh = net.state_dict()  # conv branches the init run lacks keep their zero-output initialisation
        ema_w = {**{k: v for k, v in fresh.items() if k.startswith(CONV_KEYS) and k not in ema_w}, **ema_w}
        net.load_state_dict(ema_w)
        ema.load_state_dict(ema_w)
        mean, std = init_t["latent_mean"], init_t["latent_std"]
    if state is not None:  # the model was trained with the checkpoint's standardisation: keep it
        mean, std = state[0]["latent_mean"], state[0]["latent_std"]
    windows = LatentWindows(train, s.window, mean=mean, std=std, num_actions=A, seed=[args.seed, d.rank], device=dev)
    step = 0
    if state is not None:
        step = restore_state(*state, d, net=net, ema=ema, opt=opt, gen=gen, windows=windows, seed=args.seed)
        if args.priority_fraction and "windows.priority" in state[0]:
            windows.set_priorities(state[0]["windows.priority"].numpy(), args.priority_fraction)
    if args.event_fraction or args.return_fraction or args.recent_fraction:  # the data's: the same on every rank
        recent = source == len(s.stores) - 1 if args.recent_fraction else None
        probs, fraction = biased_draw(args, train, windows.sampler.all_window_starts(), first_target=K,
                                      length=s.window, train_mask=~held, returns=s.returns, recent=recent)
        windows.set_priorities(probs, fraction)
        if d.is_main:
            print(f"pretrain: {fraction:.0%} of each batch from the {int((probs > 0).sum())} of {len(probs)} windows "
                  f"within {args.event_horizon} rows of a reward event / return, or in the last store")
    mean_d, std_d = windows.mean, windows.std

    def clamp(x: torch.Tensor) -> torch.Tensor:  # a sample → the encoder's tanh range, as inference does
        return ((x * std_d + mean_d).clamp(-1.0, 1.0) - mean_d) / std_d

    def refresh_priorities() -> dict[str, float]:
        """Every window's one-step error under the EMA model → the prioritised draw (identical on all ranks)."""
        t = time.perf_counter()
        x_all = (windows.z.float() - mean_d) / std_d
        err = one_step_errors(ema.dit, x_all, windows.prev_action, windows.sampler.all_window_starts(),
                              context_len=K, sampling_steps=args.rollout_sampling_steps, clamp=clamp,
                              seed=rank_seed(args.seed, 0, step))
        probs = priority_probabilities(err, args.priority_alpha)
        windows.set_priorities(probs, args.priority_fraction)
        top = np.sort(probs)[::-1][: max(1, len(probs) // 100)].sum()
        return {"priority_mean_error": float(err.mean()), "priority_top1pct_mass": float(top),
                "priority_refresh_s": time.perf_counter() - t}

    if args.pixel_weight:
        net.set_decoder(ae, mean_d, std_d, motion_boost=args.motion_boost)
    model: torch.nn.Module = torch.compile(net) if args.compile else net
    if d.enabled:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    ev = eval_windows(test if len(test) else train, context_len=K, horizon=args.eval_horizon,
                      count=args.eval_windows, seed=args.seed, mean=mean, std=std, num_actions=A, device=dev)
    run_meta = {"args": asdict(args), "context_len": K, "configs": configs_meta(net),
                "objective": asdict(cfg), "encoder_sha256": s.encoder_sha256, "data": summary}
    n_params = sum(p.numel() for p in net.parameters())
    size = args.preset + "".join(f" {f.replace('_', '-')} {getattr(args, f):g}" for f in NET_FLAGS
                                 if getattr(args, f))
    size += f" ({n_params / 1e6:.2f} M params)"
    log = JsonlLogger(out / "metrics.jsonl") if d.is_main else None
    if d.is_main:
        print(f"pretrain: DiT-{size}, K {K}, d_z {ae.latent_dim}, {A} actions; "
              f"{summary['train_rows']} train / {summary['heldout_rows']} held-out rows; batch {args.batch} x "
              f"{d.world_size} proc; {_start(step, args.init)}")

    stop: dict[str, int | None] = {"sig": None}
    restore = catch_stop_signals(lambda signum: stop.__setitem__("sig", signum))
    autocast = autocast_for(dev, args.precision)
    total = args.lr_decay_steps or args.steps
    bar = tqdm(total=args.steps, initial=step, unit="step", desc=f"pretrain DiT-{args.preset}",
               disable=not (d.is_main and sys.stderr.isatty()))
    t0, s0, saved, terms, final = time.perf_counter(), step, step, {}, {}
    try:
        while step < args.steps:
            if dist_.any_rank(d, stop["sig"] is not None):
                break
            if args.priority_fraction and step >= args.priority_every and (
                    windows.priority is None or step % args.priority_every == 0):
                pm = refresh_priorities()
                if log is not None:
                    log.log(step, **pm)
            lr = lr_at(step, args.lr, args.warmup, total)  # explicit schedule, set by hand each step
            w = windows.sample(args.batch)
            with autocast:
                inputs = make_inputs(w, cfg, num_actions=A, generator=gen, dit=net.dit, context_len=K, clamp=clamp)
                terms = model(inputs)
            loss = total_loss(terms, cfg)
            grad_norm = optimizer_step(loss, net, ema, opt, lr=lr, grad_clip=args.grad_clip, step=step,
                                       ema_decay=args.ema)
            step += 1
            bar.update(1)
            if log is not None and (step % args.log_every == 0 or step == args.steps):
                m = {k: v.item() for k, v in terms.items()}
                log.log(step, loss=loss.item(), **m, lr=lr, grad_norm=float(grad_norm),
                        steps_per_s=(step - s0) / (time.perf_counter() - t0))
                bar.set_postfix(flow=f"{m['flow']:.3f}", reward=f"{m['reward']:.3f}")
            if log is not None and ev is not None and args.eval_every and step % args.eval_every == 0:
                final = evaluate(ema, ev, context_len=K, sampling_steps=args.sampling_steps, mean=mean_d, std=std_d,
                                 seed=args.seed)
                log.log(step, **final)
            if step % args.checkpoint_every == 0 and step < args.steps:
                save_state(out, d, net=net, ema=ema, opt=opt, gen=gen, windows=windows, step=step, meta=run_meta)
                saved = step
    finally:
        bar.close()
        restore()
    dt = time.perf_counter() - t0
    if step != saved:
        save_state(out, d, net=net, ema=ema, opt=opt, gen=gen, windows=windows, step=step, meta=run_meta)
    rate = (step - s0) / dt if dt > 0 else 0.0
    if d.is_main:
        print(f"pretrain: {step - s0} steps in {dt:.1f} s: {rate:.2f} steps/s (batch {args.batch} x {d.world_size}); "
              f"checkpoint {out / 'ckpt'} at step {step}")
    if step < args.steps:  # stopped by a signal (on this rank or another one)
        if log is not None:
            log.close()
        return signal_exit_code(stop["sig"] or signal.SIGTERM)
    if d.is_main:
        if ev is not None and not (args.eval_every and step % args.eval_every == 0 and step > s0):
            final = evaluate(ema, ev, context_len=K, sampling_steps=args.sampling_steps, mean=mean_d, std=std_d,
                             seed=args.seed)
            log.log(step, **final)
        log.close()
        split = "held-out episodes" if len(test) else "training episodes (the store has no held-out one)"
        info = {"store": " + ".join("/".join(Path(p).parts[-2:]) for p in s.stores), **summary, "eval split": split,
                "encoder sha256": s.encoder_sha256[:12], "preset": size, "training steps": step,
                "batch": f"{args.batch} x {d.world_size}", "lr": args.lr, "objective": json.dumps(asdict(cfg)),
                "final flow loss": f"{terms['flow'].item():.4f}" if terms else "-",
                **{k: f"{v:.4g}" for k, v in final.items()}}
        path = export_bundle(out / "bundle", ema=ema, autoencoder=ae, mean=mean_d, std=std_d, train=train,
                             context_len=K, num_actions=A, game=s.meta["game"], action_meanings=names,
                             sampling_steps=args.sampling_steps, start_contexts=args.start_contexts, seed=args.seed,
                             card=model_card(info))
        print(f"pretrain: bundle {path}" + "".join(f"; {k} {v:.4g}" for k, v in final.items() if "mse" in k))
    dist_.barrier(d)
    return 0


def cli(argv: list[str] | None = None) -> int:
    return run_cli(Args, main, "ditwm pretrain", argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    raise SystemExit(cli())
