"""The action-sensitivity metric (DESIGN.md §4) on the real game: its ceiling for a perfect world model.

From real Pong states (``--envs`` games after T random steps, T in ``--times``; ale-py's vector env cannot clone a
state, so two identically seeded copies replay the same actions), one copy holds UP (RIGHT) and the other DOWN
(LEFT) for 8 steps; prints the fraction of states whose agent paddles end >= 2 px apart and how often a paddle is
not found — the figures ``ditwm evaluate fidelity`` reports for a world model.

Run::

    python examples/real_action_sensitivity.py
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout without install

from dit_envs import make_real_env  # noqa: E402
from dit_envs.envs.real import action_meanings  # noqa: E402
from trainers.pong_objects import locate_pong_objects  # noqa: E402


def main(argv: list[str] | None = None) -> tuple[float, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--envs", type=int, default=64, help="real games per start time")
    p.add_argument("--times", type=int, nargs="+", default=[60, 150, 300, 500], help="random steps before holding")
    p.add_argument("--hold", type=int, default=8, help="steps UP or DOWN")
    args = p.parse_args(argv)
    names = action_meanings("Pong")
    up, down = names.index("RIGHT"), names.index("LEFT")
    apart, missing = [], []
    for seed, t in enumerate(args.times):
        rng = np.random.default_rng(seed)
        actions = [rng.integers(0, len(names), args.envs) for _ in range(t)]
        ys = []
        for hold in (up, down):
            env = make_real_env("Pong", num_envs=args.envs, seed=seed)
            obs, _ = env.reset(seed=seed)
            for a in actions:
                obs, *_ = env.step(a)
            for _ in range(args.hold):
                obs, *_ = env.step(np.full(args.envs, hold))
            ys.append(locate_pong_objects(obs).agent_y)
            env.close()
        lost = np.isnan(ys[0]) | np.isnan(ys[1])
        apart += list(((ys[1] - ys[0]) >= 2) & ~lost)
        missing += list(lost)
    print(f"real Pong, {len(apart)} states: paddles >= 2 px apart {np.mean(apart):.3f}, paddle missing "
          f"{np.mean(missing):.3f}")
    return float(np.mean(apart)), float(np.mean(missing))


if __name__ == "__main__":
    main()
