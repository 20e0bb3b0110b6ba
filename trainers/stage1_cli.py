"""``ditwm collect --agent rssm``: set up, resume, run and export a stage-1 run (see :mod:`trainers.stage1`).

Artifacts in ``OUT/stage1/`` (used by every later stage): ``autoencoder.safetensors`` + ``autoencoder.json``
(the frozen frame autoencoder), ``agent.safetensors`` + ``agent.json`` (the frozen actor-critic, input = last K
latents), ``rssm/`` (the RSSM as a world-model bundle, the baseline the DiT must beat). Training state for
``--resume`` lives in ``OUT/ckpt``, metrics in ``OUT/metrics.jsonl``.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from dit_envs.envs.real import PROTOCOL, action_meanings
from dit_envs.io import atomic_save_tensors, atomic_write_json
from trainers.common import JsonlLogger, pick_device, seed_everything
from trainers.data import heldout_mask, sample_contexts
from trainers.stage1 import SIZES, Stage1, Stage1Config


def export(run: Stage1, out: Path) -> Path:
    """Write the frozen stage-1 artifacts to ``out/stage1`` (atomic files) and return that directory."""
    from dit_envs.bundle import save_bundle

    d = out / "stage1"
    d.mkdir(parents=True, exist_ok=True)
    names = list(action_meanings(run.cfg.game))
    atomic_save_tensors(d / "autoencoder.safetensors", run.ae.state_dict())
    atomic_write_json(d / "autoencoder.json", dataclasses.asdict(run.ae.config))
    atomic_save_tensors(d / "agent.safetensors", run.ac.state_dict())
    atomic_write_json(d / "agent.json", {"agent": dataclasses.asdict(run.ac.config), "context_len": run.cfg.context_len,
                                         "game": run.cfg.game, "action_meanings": names})
    r = run.replay
    n = r.size
    train = ~heldout_mask(r.cols["episode"][:n])
    z, a = sample_contexts(r.z[:n][train], r.cols["action"][:n][train], r.cols["episode"][:n][train],
                           r.cols["step"][:n][train], run.cfg.context_len, 256, run.num_actions, seed=run.cfg.seed)
    save_bundle(run.wm, d / "rssm", game=run.cfg.game, action_meanings=names, start_z=torch.as_tensor(z),
                start_a=torch.as_tensor(a), overwrite=True,
                card=f"Stage-1 RSSM of DiT-WM after {run.env_steps} real env steps and {run.updates} updates.")
    return d


def run_rssm(args) -> int:
    """Stage-1 entry point for ``trainers.collect`` (arguments already validated)."""
    out = Path(args.out)
    dev = pick_device(args.device)
    cfg = Stage1Config(game=args.game, num_envs=args.num_envs, seed=args.seed, prefill=args.prefill,
                       ae_steps=args.ae_steps, train_every=args.train_every, checkpoint_every=args.checkpoint_every,
                       segment_reset=args.segment_reset,
                       device=str(dev), **SIZES[args.size])
    seed_everything(args.seed)
    run = Stage1(cfg, out, chunk_rows=args.chunk_rows)
    resumed = args.resume and (out / "ckpt").exists()
    if resumed:
        run.load()
    else:  # a run that never reached its first checkpoint starts over
        for path in run.store.chunk_paths():
            path.unlink()
    run.store.write_meta(game=args.game, action_meanings=list(action_meanings(args.game)), protocol=PROTOCOL,
                         collector={k: v for k, v in vars(args).items() if k != "out"})
    log = JsonlLogger(out / "metrics.jsonl", tensorboard=False)
    t0, s0 = time.perf_counter(), run.env_steps
    code = run.run(args.steps, log)
    log.close()
    dt = time.perf_counter() - t0
    print(f"stage 1: {run.env_steps - s0} env steps and {run.updates} updates in {dt / 60:.1f} min "
          f"({(run.env_steps - s0) / dt:.0f} env steps/s); store {out} holds {run.env_steps} steps")
    if code == 0:
        print(f"artifacts: {export(run, out)}")
    return code
