"""Imagined env steps/s of several (checkpoint, sampling_steps) pairs, timed interleaved in one process.

``ditwm evaluate throughput`` times one model per run against the real game; on a shared machine whose speed drifts
between runs, a student-vs-teacher speed ratio is better measured like this: every configuration gets the same
number of timed blocks, taken in turns, and the median block rate is reported with its ratio to the first one.

Run::

    python examples/compare_sampling_speed.py runs/dit_ro4/bundle:4 registry/bundled/pong-v0:1 registry/bundled/pong-v0:2

``--breakdown`` also times, per DiT configuration and in the same turns, the two parts of a step that the number of
sampling steps scales differently: the context pass (:meth:`DiT.context_cache`, once per env step) and the sampler
(:meth:`DiT.sample_next` with the configured steps, each one :meth:`DiT.predict_next` plus its Euler update); the
rest of the env step (noise, heads, state update, env bookkeeping) is what remains (a streaming student's context
pass is :meth:`DiT.extend_cache`, one new token against its rolling cache). The share of the step that does
not shrink with fewer sampling steps (context pass + rest) is what keeps a student of ``s`` steps below the linear
speed-up ``s_1 / s`` over a teacher of ``s_1``. Configurations whose model is not a DiT (an RSSM) are left out of it.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout without install

import dit_envs  # noqa: E402,F401  (registers the DiTWM ids)


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("configs", nargs="+", help="CHECKPOINT:SAMPLING_STEPS, the first one is the reference")
    p.add_argument("--env-id", default="DiTWM/Pong-v0", help="registered id whose spaces the checkpoints match")
    p.add_argument("--num-envs", type=int, default=256, help="envs per vector env")
    p.add_argument("--steps", type=int, default=10, help="batched steps per timed block")
    p.add_argument("--repeats", type=int, default=5, help="timed blocks per configuration")
    p.add_argument("--breakdown", action="store_true", help="also time the context pass and the sampler of each DiT")
    args = p.parse_args(argv)
    envs = {}
    for cfg in args.configs:
        ckpt, _, steps = cfg.rpartition(":")
        if not ckpt or not steps.isdigit() or int(steps) < 1:
            p.error(f"configs: expected CHECKPOINT:SAMPLING_STEPS with steps >= 1, got {cfg!r}")
        envs[cfg] = gym.make_vec(args.env_id, num_envs=args.num_envs, obs_type="latent", checkpoint=ckpt,
                                 sampling_steps=int(steps))
        envs[cfg].reset(seed=0)
    actions = np.zeros(args.num_envs, np.int64)
    for env in envs.values():  # warm-up
        for _ in range(3):
            env.step(actions)
    rates: dict[str, list[float]] = {k: [] for k in envs}
    parts: dict[str, list[tuple[float, float]]] = {k: [] for k in envs}
    for _ in range(args.repeats):
        for k, env in envs.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                env.step(actions)
            rates[k].append(args.steps * args.num_envs / (time.perf_counter() - t0))
            if args.breakdown:
                parts[k].append(time_parts(env, args.steps))
    medians = {k: statistics.median(v) for k, v in rates.items()}
    ref = next(iter(medians.values()))
    for k, v in medians.items():
        print(f"{k:<50} {v:8.0f} imagined env steps/s  ({v / ref:.2f} x the first)")
    if args.breakdown:
        print_breakdown(args, envs, medians, parts)
    for env in envs.values():
        env.close()
    return medians


@torch.no_grad()
def time_parts(env, repeats: int) -> tuple[float, float] | None:
    """Seconds of one context pass and of one whole sampler call on the env's current state (its DiT, all envs),
    or None when the env's model is not a DiT."""
    wm = env.unwrapped.core.model
    if not hasattr(wm, "dit"):
        return None
    state = env.unwrapped.core.state
    z, a = wm.normalize(state["z"]), state["a"]
    noise = torch.randn(z.shape[0], z.shape[2])
    streaming = wm.dit.config.streaming  # its context pass is one new token against the rolling cache
    cache = wm.dit.context_cache(z, a)  # warm-up
    wm.dit.sample_next(noise, a[:, -1], cache, wm.sampling_steps, x_prev=z[:, -1])
    t0 = time.perf_counter()
    for _ in range(repeats):
        if streaming:
            wm.dit.extend_cache(cache, z[:, -1], a[:, -1])
        else:
            cache = wm.dit.context_cache(z, a)
    t1 = time.perf_counter()
    for _ in range(repeats):
        wm.dit.sample_next(noise, a[:, -1], cache, wm.sampling_steps, x_prev=z[:, -1])
    return (t1 - t0) / repeats, (time.perf_counter() - t1) / repeats


def print_breakdown(args, envs: dict, medians: dict[str, float], parts: dict[str, list]) -> None:
    """Per DiT configuration: ms per batched env step of the context pass, the sampler (all its steps) and the
    rest, and the share of the step that does not scale with the sampling steps (see the module docstring)."""
    s1 = next(iter(envs.values())).unwrapped.core.model.sampling_steps
    print(f"{'ms per batched step of ' + str(args.num_envs) + ' envs':<50} {'context':>8} {'sampler':>8} "
          f"{'rest':>8}  fixed share, linear speed-up vs the first")
    for k, env in envs.items():
        if any(p is None for p in parts[k]):
            print(f"{k:<50} (not a DiT: no breakdown)")
            continue
        ctx = statistics.median(c for c, _ in parts[k])
        sampler = statistics.median(s for _, s in parts[k])
        total = args.num_envs / medians[k]
        rest, s = total - ctx - sampler, env.unwrapped.core.model.sampling_steps
        print(f"{k:<50} {1e3 * ctx:8.2f} {1e3 * sampler:8.2f} {1e3 * rest:8.2f}  {(ctx + rest) / total:.2f}, "
              f"{s1 / s:.2f}")


if __name__ == "__main__":
    main()
