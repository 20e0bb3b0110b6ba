"""Imagined env steps/s of several (checkpoint, sampling_steps) pairs, timed interleaved in one process.

``ditwm evaluate throughput`` times one model per run against the real game; on a shared machine whose speed drifts
between runs, a student-vs-teacher speed ratio is better measured like this: every configuration gets the same
number of timed blocks, taken in turns, and the median block rate is reported with its ratio to the first one.

Run::

    python examples/compare_sampling_speed.py runs/dit_ro4/bundle:4 registry/bundled/pong-v0:1 registry/bundled/pong-v0:2
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout without install

import dit_envs  # noqa: E402,F401  (registers the DiTWM ids)


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("configs", nargs="+", help="CHECKPOINT:SAMPLING_STEPS, the first one is the reference")
    p.add_argument("--env-id", default="DiTWM/Pong-v0", help="registered id whose spaces the checkpoints match")
    p.add_argument("--num-envs", type=int, default=256, help="envs per vector env")
    p.add_argument("--steps", type=int, default=10, help="batched steps per timed block")
    p.add_argument("--repeats", type=int, default=5, help="timed blocks per configuration")
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
    for _ in range(args.repeats):
        for k, env in envs.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                env.step(actions)
            rates[k].append(args.steps * args.num_envs / (time.perf_counter() - t0))
    medians = {k: statistics.median(v) for k, v in rates.items()}
    ref = next(iter(medians.values()))
    for k, v in medians.items():
        print(f"{k:<50} {v:8.0f} imagined env steps/s  ({v / ref:.2f} x the first)")
    for env in envs.values():
        env.close()
    return medians


if __name__ == "__main__":
    main()
