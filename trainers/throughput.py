"""``ditwm evaluate throughput``: imagined env steps/s of the vector env next to real ALE steps/s (DESIGN.md §4).

Both are measured in the same process and run, with the same ``num_envs`` and observation preprocessing
(uint8 ``(N, 3, 64, 64)``): after warm-up, ``--repeats`` timed blocks of ``--steps`` batched steps each; the
median block rate is reported (env steps/s = batched steps/s × num_envs). Peak resident memory (``ru_maxrss``)
is read right after the imagination runs, before the real game starts.
"""
from __future__ import annotations

import resource
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

import dit_envs  # noqa: F401  (registers the DiTWM ids)
from dit_envs.envs.loading import run_dtype
from trainers.common import DTYPE_NAMES, ArgError, arg, check_choice, dtype_arg, run_cli


@dataclass(kw_only=True)
class Args:
    world_model: str = arg("DiTWM/Pong-v0", "registered env id, or a bundle directory / hf:// source")
    random_init: str = arg("", "measure a freshly initialised model of these presets instead, 'AE:DiT' "
                               "(e.g. 'base:S'); weights do not change speed")
    game: str = arg("Pong", "game for --random-init and for the real-ALE reference")
    num_envs: int = arg(256, "parallel envs, imagined and real")
    sampling_steps: int = arg(1, "denoising steps per imagined env step")
    steps: int = arg(20, "batched steps per timed block")
    repeats: int = arg(5, "timed blocks (the median is reported)")
    warmup: int = arg(3, "untimed batched steps first")
    device: str = arg("cpu", "torch device of the world model")
    dtype: str = dtype_arg()
    threads: int = arg(0, "torch CPU threads (0: torch's default)")
    json_out: str = arg("", "also write the figures to this JSON file")
    uncertainty_draws: int = arg(0, "also time the latent env with train-agent's --uncertainty-penalty of this many "
                                    "draws per step (M - 1 extra draws from one context pass; 0: off)")


def _random_bundle(args: Args, out: Path) -> Path:
    """A default-architecture bundle with fresh weights and real start contexts (for speed figures only)."""
    from dit_envs.bundle import save_bundle
    from dit_envs.envs.real import action_meanings, make_real_env
    from dit_envs.models.autoencoder import AUTOENCODER_PRESETS
    from dit_envs.models.dit import DiTConfig
    from dit_envs.models.dit_world_model import DiTWorldModel
    from dit_envs.models.heads import HeadsConfig

    try:
        ae_name, dit_name = args.random_init.split(":")
        ae = AUTOENCODER_PRESETS[ae_name]
        names = action_meanings(args.game)
        dit = DiTConfig.from_preset(dit_name, latent_dim=ae.latent_dim, num_actions=len(names))
    except (ValueError, KeyError) as e:
        raise ArgError("random_init", f"expected 'AE:DiT' preset names such as 'base:S', got {args.random_init!r} "
                                      f"({e})") from None
    model = DiTWorldModel.build(ae, dit, HeadsConfig(latent_dim=ae.latent_dim, num_actions=len(names))).eval()
    env = make_real_env(args.game, num_envs=8, seed=0)
    frames, rng = [], np.random.default_rng(0)
    obs, _ = env.reset(seed=0)
    for _ in range(dit.context_len * 4):
        obs, *_ = env.step(rng.integers(0, len(names), 8))
        frames.append(obs)
    env.close()
    with torch.no_grad():
        z = model.encode(torch.as_tensor(np.stack(frames, 1).reshape(-1, 3, 64, 64)))
    z = z.reshape(8 * 4, dit.context_len, -1)
    a = torch.randint(0, len(names), z.shape[:2])
    return save_bundle(model, out, game=args.game, action_meanings=list(names), start_z=z, start_a=a)


def _median_rate(step_fn, args: Args) -> float:
    for _ in range(args.warmup):
        step_fn()
    rates = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step_fn()
        rates.append(args.steps * args.num_envs / (time.perf_counter() - t0))
    return statistics.median(rates)


def main(args: Args) -> int:
    check_choice("dtype", args.dtype, DTYPE_NAMES)
    for name in ("num_envs", "sampling_steps", "steps", "repeats"):
        if getattr(args, name) < 1:
            raise ArgError(name, f"expected an integer >= 1, got {getattr(args, name)}")
    if args.uncertainty_draws == 1 or args.uncertainty_draws < 0:
        raise ArgError("uncertainty_draws", f"expected 0 (off) or an integer >= 2, got {args.uncertainty_draws}")
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        kw: dict = {"sampling_steps": args.sampling_steps, "device": args.device, "dtype": args.dtype}
        env_id = "DiTWM/Pong-v0"
        if args.random_init:
            kw["checkpoint"] = str(_random_bundle(args, Path(tmp) / "bundle"))
        elif args.world_model.count("/") == 1 and "-v" in args.world_model and not Path(args.world_model).exists():
            env_id = args.world_model
        else:
            kw["checkpoint"] = args.world_model
        figures: dict[str, float] = {}
        modes = [("latent", "latent"), ("pixels", "pixels")]
        modes += [("uncertainty", "latent")] if args.uncertainty_draws else []
        for name, obs_type in modes:
            envs = gym.make_vec(env_id, num_envs=args.num_envs, obs_type=obs_type, **kw)
            if name == "uncertainty":  # a fixed threshold: the speed does not depend on it
                envs.unwrapped.core.set_uncertainty_penalty(0.1, args.uncertainty_draws, threshold=1e-3)
            envs.reset(seed=0)
            rng = np.random.default_rng(0)
            n_act = envs.single_action_space.n
            figures[f"imagined_{name}_steps_per_s"] = _median_rate(
                lambda: envs.step(rng.integers(0, n_act, args.num_envs)), args)
            envs.close()
        figures["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    real = dit_envs.make_real_env(args.game, num_envs=args.num_envs, seed=0)
    rng = np.random.default_rng(0)
    n_act = real.single_action_space.n
    figures["real_ale_steps_per_s"] = _median_rate(lambda: real.step(rng.integers(0, n_act, args.num_envs)), args)
    real.close()
    for obs_type in ("latent", "pixels"):
        figures[f"ratio_{obs_type}_vs_real"] = figures[f"imagined_{obs_type}_steps_per_s"] / figures["real_ale_steps_per_s"]
    print(f"throughput  num_envs={args.num_envs}  sampling_steps={args.sampling_steps}  device={args.device}  "
          f"dtype={args.dtype} ({run_dtype(args.dtype, args.device)})  torch threads={torch.get_num_threads()}")
    print(f"  imagined, latent obs : {figures['imagined_latent_steps_per_s']:10.0f} env steps/s  "
          f"({figures['ratio_latent_vs_real']:.2f} x real)")
    print(f"  imagined, pixel obs  : {figures['imagined_pixels_steps_per_s']:10.0f} env steps/s  "
          f"({figures['ratio_pixels_vs_real']:.2f} x real)")
    if args.uncertainty_draws:
        print(f"  imagined, latent obs, uncertainty penalty of {args.uncertainty_draws} draws: "
              f"{figures['imagined_uncertainty_steps_per_s']:10.0f} env steps/s")
    print(f"  real ALE {args.game:<11} : {figures['real_ale_steps_per_s']:10.0f} env steps/s")
    print(f"  peak RSS after imagination: {figures['peak_rss_mib']:.0f} MiB")
    if args.json_out:
        from dit_envs.io import atomic_write_json

        atomic_write_json(args.json_out, {**figures, "args": vars(args)})
    return 0


def cli(argv: list[str] | None = None) -> int:
    return run_cli(Args, main, "ditwm evaluate throughput", argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    raise SystemExit(cli())
