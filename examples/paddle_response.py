"""Does the imagined Pong paddle answer the actions? Mean paddle move per action while a ball-tracking policy plays.

Plays ``--num-envs`` imagined games of ``DiTWM/Pong-v0`` (or ``--checkpoint``) for ``--steps`` steps with the
quickstart's tracking policy (:func:`trainers.pong_objects.track_actions`) and locates the objects in every frame
(:mod:`trainers.pong_objects`). Prints, per action, the mean row change of the agent's paddle over the step it was
taken (negative = up; in Pong's minimal set RIGHT moves up, LEFT down) and the fraction of frames with a ball.

Run::

    python examples/paddle_response.py --num-envs 32 --steps 150
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout without install

import dit_envs  # noqa: E402,F401  (registers the DiTWM ids)
from trainers.pong_objects import locate_pong_objects, track_actions  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="bundle dir / hf:// source (default: the bundled model)")
    p.add_argument("--num-envs", type=int, default=32, help="imagined games played together")
    p.add_argument("--steps", type=int, default=150, help="steps per game")
    p.add_argument("--sampling-steps", type=int, default=0, help="denoising steps (0: the checkpoint's default)")
    p.add_argument("--seed", type=int, default=0, help="env and policy seed")
    args = p.parse_args(argv)
    kw = {"checkpoint": args.checkpoint} if args.checkpoint else {}
    if args.sampling_steps:
        kw["sampling_steps"] = args.sampling_steps
    envs = gym.make_vec("DiTWM/Pong-v0", num_envs=args.num_envs, **kw)
    meanings = list(envs.unwrapped.bundle.config["action_meanings"])
    rng = np.random.default_rng(args.seed)
    obs, _ = envs.reset(seed=args.seed)
    moves: dict[str, list[float]] = {}
    visible = []
    for _ in range(args.steps):
        actions = track_actions(obs, meanings, rng)
        before = locate_pong_objects(obs).agent_y
        obs, _, terminated, truncated, _ = envs.step(actions)
        after = locate_pong_objects(obs)
        dy = after.agent_y - before
        ok = ~np.isnan(dy) & ~(terminated | truncated)
        for a, d in zip(actions[ok], dy[ok]):
            moves.setdefault(meanings[a], []).append(float(d))
        visible.append(float(np.mean(~np.isnan(after.ball[:, 0]))))
    envs.close()
    out = {}
    for name, d in sorted(moves.items()):
        out[name] = float(np.mean(d))
        print(f"{name:<10} {len(d):6d} steps  mean paddle move {np.mean(d):+.2f} px  "
              f"(up > 1 px: {np.mean(np.array(d) < -1):.2f}, down > 1 px: {np.mean(np.array(d) > 1):.2f})")
    print(f"ball visible in {np.mean(visible):.2f} of the imagined frames")
    return out


if __name__ == "__main__":
    main()
