"""``ditwm quickstart``: play ``DiTWM/Pong-v0`` in imagination, write a GIF of the imagined game, print steps/s.

Offline and download-free with the bundled checkpoint: ``gym.make_vec("DiTWM/Pong-v0", num_envs=N)`` loads it from
the package, and a policy plays ``--steps`` batched imagined steps. ``--policy track`` is a hand-written Pong
policy that reads the imagined frames (:mod:`trainers.pong_objects`) and moves its paddle towards the ball's row
(RIGHT = up, LEFT = down in Pong's minimal action set), so the GIF shows whether the imagined paddle answers the
actions; ``--policy random`` plays uniform random actions. The GIF tiles the first ``--gif-envs`` envs side by
side, upscaled ×3. The printed rate counts imagined env steps (all envs) per second of ``env.step`` calls
alone; the policy's own time is excluded.
"""
from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from PIL import Image

import dit_envs  # noqa: F401  (registers the DiTWM ids)
from dit_envs.io import atomic_write_bytes
from trainers.common import ArgError, arg, check_temperature, run_cli, setting_arg_error
from trainers.pong_objects import track_actions

POLICIES = ("track", "random")


@dataclass(kw_only=True)
class Args:
    env_id: str = arg("DiTWM/Pong-v0", "registered DiT-WM env id")
    checkpoint: str = arg("", "override the id's checkpoint: a bundle directory or hf://org/name@<commit> ('' = "
                              "the registered one, bundled for Pong)")
    num_envs: int = arg(16, "imagined envs stepped together")
    steps: int = arg(300, "vector-env steps")
    policy: str = arg("track", "track: follow the imagined ball; random: uniform actions", choices=POLICIES)
    sampling_steps: int = arg(0, "denoising steps per env step (0: the checkpoint's default)")
    temperature: float | None = arg(None, "sampling temperature: std of the initial noise (default: the checkpoint's)")
    gif_envs: int = arg(4, "envs shown side by side in the GIF")
    out: str = arg("pong_imagined.gif", "GIF to write")
    seed: int = arg(0, "seed of the env (start contexts, sampling) and of the random policy")
    threads: int = arg(0, "torch CPU threads (0: torch's default)")


def gif_bytes(frames: list[np.ndarray], scale: int = 3, frame_ms: int = 66) -> bytes:
    """An animated GIF of uint8 ``(G, 3, 64, 64)`` frame batches, the ``G`` envs side by side, ×``scale``."""
    images = []
    for batch in frames:
        row = np.concatenate(list(batch.transpose(0, 2, 3, 1)), axis=1)  # (64, G*64, 3)
        images.append(Image.fromarray(row).resize((row.shape[1] * scale, row.shape[0] * scale), Image.NEAREST))
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=frame_ms, loop=0)
    return buf.getvalue()


def main(args: Args) -> int:
    """Run the quickstart; returns 0. Raises :class:`ArgError` for bad arguments before anything is written."""
    for name in ("num_envs", "steps", "gif_envs"):
        if getattr(args, name) < 1:
            raise ArgError(name, f"expected an integer >= 1, got {getattr(args, name)}")
    for name in ("sampling_steps", "threads", "seed"):
        if getattr(args, name) < 0:
            raise ArgError(name, f"expected an integer >= 0, got {getattr(args, name)}")
    if args.policy not in POLICIES:
        raise ArgError("policy", f"expected one of {POLICIES}, got {args.policy!r}")
    check_temperature(args.temperature)
    if not Path(args.out).absolute().parent.is_dir():
        raise ArgError("out", f"expected a file in an existing directory, got {args.out}")
    if args.threads:
        torch.set_num_threads(args.threads)
    kw = {"checkpoint": args.checkpoint} if args.checkpoint else {}
    if args.sampling_steps:
        kw["sampling_steps"] = args.sampling_steps
    if args.temperature is not None:
        kw["temperature"] = args.temperature
    try:
        envs = gym.make_vec(args.env_id, num_envs=args.num_envs, obs_type="pixels", **kw)
    except gym.error.Error as e:
        raise ArgError("env_id", f"expected a registered DiT-WM id, got {args.env_id!r} ({e})") from None
    except ValueError as e:
        raise setting_arg_error(e, "checkpoint" if args.checkpoint else "env_id",
                                f"expected a loadable world model, got {e}") from None
    except (FileNotFoundError, NotADirectoryError) as e:
        raise ArgError("checkpoint" if args.checkpoint else "env_id", f"expected a loadable world model, got {e}") \
            from None
    meanings = list(envs.unwrapped.bundle.config["action_meanings"])
    if args.policy == "track" and not {"NOOP", "RIGHT", "LEFT"} <= set(meanings):
        envs.close()
        raise ArgError("policy", f"expected 'random' for a game without Pong's NOOP/RIGHT/LEFT actions, got 'track' "
                                 f"with actions {meanings}")
    rng = np.random.default_rng(args.seed)
    obs, _ = envs.reset(seed=args.seed)
    g = min(args.gif_envs, args.num_envs)
    frames, returns, finished, ep_ret = [obs[:g]], [], 0, np.zeros(args.num_envs)
    stepping = 0.0
    for _ in range(args.steps):
        if args.policy == "track":
            actions = track_actions(obs, meanings, rng)
        else:
            actions = rng.integers(0, len(meanings), args.num_envs)
        t0 = time.perf_counter()
        obs, reward, terminated, truncated, _ = envs.step(actions)
        stepping += time.perf_counter() - t0
        ep_ret += reward
        done = terminated | truncated
        returns += ep_ret[done].tolist()
        finished += int(done.sum())
        ep_ret[done] = 0.0
        frames.append(obs[:g])
    envs.close()
    atomic_write_bytes(Path(args.out), gif_bytes(frames))
    rate = args.steps * args.num_envs / stepping
    print(f"quickstart: {args.env_id} ({envs.unwrapped.bundle.path}), {args.num_envs} envs x {args.steps} steps, "
          f"policy {args.policy}, sampling_steps {envs.unwrapped.sampling_steps}, "
          f"temperature {envs.unwrapped.temperature}")
    print(f"quickstart: {rate:.0f} imagined env steps/s; imagined reward {float(np.sum(returns) + ep_ret.sum()):+.0f} "
          f"in total ({finished} episodes ended)")
    print(f"quickstart: wrote {args.out} ({len(frames)} frames, {g} envs side by side)")
    return 0


def cli(argv: list[str] | None = None) -> int:
    return run_cli(Args, main, "ditwm quickstart", argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    raise SystemExit(cli())
