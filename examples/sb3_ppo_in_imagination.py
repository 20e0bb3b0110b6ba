"""Stable-Baselines3 PPO trained purely in a DiT-WM world model, then scored on the real game.

PPO never sees the real game while it trains: its experience comes from
``to_sb3(gym.make_vec("DiTWM/Pong-v0", num_envs=..., obs_type=..., checkpoint=...))``, one batched world-model call
per step. Afterwards the deterministic policy plays ``--episodes`` imagined episodes and ``--episodes`` real ones
(``dit_envs.make_real_env``, the Atari-100k protocol), and both scores are printed.

* ``--obs-type pixels``: ``CnnPolicy`` on uint8 ``(3, 64, 64)`` frames — the real env serves the same format, so
  the policy plays the real game directly.
* ``--obs-type latent``: ``MlpPolicy`` on float32 ``(K, d_z)`` latent stacks — on the real game, frames go through
  the bundle's frozen encoder and a rolling stack (:class:`~dit_envs.envs.real_latent.RealLatentVectorEnv`,
  "reset" padding like the world model's start contexts).

Run::

    python examples/sb3_ppo_in_imagination.py --checkpoint path/to/bundle --timesteps 200000 --obs-type latent
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

import gymnasium as gym
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout without install

import dit_envs  # noqa: E402  (registers the DiTWM ids)
from dit_envs.sb3 import to_sb3  # noqa: E402
from dit_envs.envs.real import make_start_env, parse_starts  # noqa: E402
from dit_envs.envs.real_latent import RealLatentVectorEnv  # noqa: E402
from trainers.agent_envs import attach_keep_ball, attach_uncertainty  # noqa: E402
from trainers.agent_io import evaluation_encoder  # noqa: E402
from trainers.common import ArgError  # noqa: E402
from trainers.train_agent_args import Args as TrainAgentArgs  # noqa: E402


ACTIVATIONS = {"tanh": "Tanh", "relu": "ReLU", "silu": "SiLU", "elu": "ELU"}  # name -> torch.nn class


def score(envs: gym.vector.VectorEnv, predict: Callable[[np.ndarray], np.ndarray], max_steps: int,
          seed: int | np.ndarray = 0) -> list[float]:
    """Play one episode per env (the first to end in each) and return the undiscounted returns.

    ``seed``: the reset seed, or one per env (e.g. those of :func:`dit_envs.envs.real.make_start_env`). Episodes
    still running after ``max_steps`` batched steps are scored with what they collected so far.
    """
    obs, _ = envs.reset(seed=seed)
    returns, running = np.zeros(envs.num_envs), np.ones(envs.num_envs, bool)
    for _ in range(max_steps):
        obs, reward, term, trunc, _ = envs.step(predict(obs))
        returns[running] += reward[running]
        running &= ~(term | trunc)
        if not running.any():
            break
    return returns.tolist()


def _sizes(text: str) -> list[int]:
    """``--net-arch``: ``"512,512"`` → ``[512, 512]``; argparse reports the ArgumentTypeError under the flag."""
    try:
        sizes = [int(v) for v in text.split(",")]
    except ValueError:
        sizes = [0]
    if not all(v >= 1 for v in sizes):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1 (e.g. 512,512), got {text!r}")
    return sizes


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env-id", default="DiTWM/Pong-v0", help="registered DiT-WM env id")
    p.add_argument("--checkpoint", default=None, help="bundle dir / hf:// source (default: the id's catalog entry)")
    p.add_argument("--timesteps", type=int, default=200_000, help="PPO timesteps in imagination")
    p.add_argument("--obs-type", choices=("pixels", "latent"), default="pixels", help="observation type")
    p.add_argument("--episodes", type=int, default=10, help="episodes scored in imagination and on the real game")
    p.add_argument("--num-envs", type=int, default=16, help="parallel imagined envs for PPO")
    p.add_argument("--n-steps", type=int, default=128, help="PPO rollout length per env")
    p.add_argument("--episode-steps", type=int, default=0, help="imagined episode truncation (0: the env's default)")
    p.add_argument("--max-steps", type=int, default=27_000, help="per-episode step cap of the real game")
    p.add_argument("--starts", default="",
                   help="score the real game on one game per start instead of --episodes random ones: 'all' (the "
                        "protocol's 30, the deterministic policy's exact score) or 'A:B' (ditwm evaluate agent "
                        "--starts)")
    p.add_argument("--seed", type=int, default=0, help="PPO and env seed")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the bundle's)")
    p.add_argument("--sampling-steps", type=int, default=0, help="denoising steps per env step (0: the bundle's)")
    p.add_argument("--sampling-shift", type=float, default=None, help="sampler time shift (default: the bundle's)")
    p.add_argument("--dtype", default=None, help="float dtype of the world model (float32, bfloat16, auto)")
    p.add_argument("--keep-ball", type=int, default=0,
                   help="Pong: draw a step again up to this many times when it loses the ball in mid-field "
                        "(as ditwm train-agent --keep-ball; 0: off)")
    p.add_argument("--lost-ball-truncate", action="store_true",
                   help="with --keep-ball: in training, a step lost in every draw is undone and truncates its "
                        "episode (bootstrapped from the state before it; train-agent --lost-ball-truncate)")
    p.add_argument("--uncertainty-penalty", type=float, default=0.0,
                   help="in training, subtract this from the reward of every imagined step whose spread of "
                        "--uncertainty-draws draws passes its --uncertainty-quantile on real start contexts "
                        "(as ditwm train-agent --uncertainty-penalty; 0: off)")
    p.add_argument("--uncertainty-truncate", action="store_true",
                   help="in training, end an imagined episode at a step whose spread passes the threshold "
                        "(as ditwm train-agent --uncertainty-truncate)")
    p.add_argument("--uncertainty-draws", type=int, default=TrainAgentArgs.uncertainty_draws,
                   help="with --uncertainty-*: draws per step")
    p.add_argument("--uncertainty-quantile", type=float, default=TrainAgentArgs.uncertainty_quantile,
                   help="with --uncertainty-*: the spread's threshold as a quantile")
    p.add_argument("--lr", type=float, default=3e-4, help="PPO learning rate (SB3's default 3e-4)")
    p.add_argument("--gamma", type=float, default=0.99, help="PPO discount")
    p.add_argument("--ent-coef", type=float, default=0.0, help="PPO entropy coefficient (SB3's default 0)")
    p.add_argument("--n-epochs", type=int, default=10, help="PPO epochs per rollout (SB3's default 10)")
    p.add_argument("--batch-size", type=int, default=256, help="PPO minibatch size (at most n_steps × num_envs)")
    p.add_argument("--net-arch", type=_sizes, default=None,
                   help="hidden sizes of the policy and value MLPs, comma-separated (default: SB3's, 64,64 for "
                        "MlpPolicy, none after CnnPolicy's CNN; train-agent's actor and critic from scratch: 256,256)")
    p.add_argument("--activation", choices=sorted(ACTIVATIONS), default="tanh",
                   help="hidden activation of those MLPs (SB3's default tanh)")
    p.add_argument("--device", default="cpu", help="torch device of the world model and PPO")
    p.add_argument("--save", default=None, help="write the trained PPO model here (SB3's zip; PPO.load reads it)")
    args = p.parse_args(argv)
    for name in ("timesteps", "episodes", "num_envs", "n_steps", "max_steps", "n_epochs", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected an integer >= 1, got {getattr(args, name)}")
    if args.keep_ball < 0:
        p.error(f"--keep-ball: expected an integer >= 0, got {args.keep_ball}")
    try:
        args.start_list = parse_starts(args.starts)
    except ValueError as e:
        p.error(f"--{e}")
    return args


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train PPO in imagination, score it in imagination and on the real game; returns both mean returns."""
    from stable_baselines3 import PPO
    from torch import nn

    args = parse(argv)
    kw: dict[str, Any] = dict(obs_type=args.obs_type, device=args.device)
    if args.checkpoint:
        kw["checkpoint"] = args.checkpoint
    if args.episode_steps:
        kw["max_episode_steps"] = args.episode_steps
    for name in ("temperature", "sampling_shift", "dtype"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    if args.sampling_steps:
        kw["sampling_steps"] = args.sampling_steps
    train_envs = gym.make_vec(args.env_id, num_envs=args.num_envs, **kw)
    try:
        attach_keep_ball(train_envs, args.keep_ball, None, truncate_lost=args.lost_ball_truncate)
        threshold = attach_uncertainty(train_envs, args.uncertainty_penalty, args.uncertainty_draws,
                                       args.uncertainty_quantile, args.uncertainty_truncate)
    except ArgError as e:
        raise SystemExit(f"sb3_ppo_in_imagination.py: error: {e}") from None
    if threshold is not None:
        print(f"uncertain imagined steps (spread of {args.uncertainty_draws} draws above {threshold:.3e}): penalty "
              f"{args.uncertainty_penalty}{', truncated' if args.uncertainty_truncate else ''}")
    venv = to_sb3(train_envs)
    venv.seed(args.seed)
    policy = "CnnPolicy" if args.obs_type == "pixels" else "MlpPolicy"
    model = PPO(policy, venv, n_steps=args.n_steps, batch_size=min(args.batch_size, args.n_steps * args.num_envs),
                learning_rate=args.lr, gamma=args.gamma, ent_coef=args.ent_coef, n_epochs=args.n_epochs,
                seed=args.seed, device=args.device, verbose=0,
                policy_kwargs=dict(activation_fn=getattr(nn, ACTIVATIONS[args.activation]),
                                   **({} if args.net_arch is None else dict(net_arch=args.net_arch))))
    model.learn(total_timesteps=args.timesteps)
    venv.close()
    if args.save:
        model.save(args.save)

    def predict(obs: np.ndarray) -> np.ndarray:
        return np.asarray(model.predict(obs, deterministic=True)[0], dtype=np.int64)

    imagined = gym.make_vec(args.env_id, num_envs=args.episodes, **kw)
    attach_keep_ball(imagined, args.keep_ball, None)
    bundle = imagined.unwrapped.bundle
    imag = score(imagined, predict, args.max_steps)
    imagined.close()
    frames = min(108_000, 4 * args.max_steps)  # the protocol's frameskip is 4
    seeds: int | np.ndarray = 0
    if args.start_list:
        real, _, seeds = make_start_env(bundle.config["game"], args.start_list, max_num_frames_per_episode=frames)
    else:
        real = dit_envs.make_real_env(bundle.config["game"], num_envs=args.episodes, max_num_frames_per_episode=frames)
    if args.obs_type == "latent":
        model_ = bundle.model  # read the real frames in float32 whatever --dtype the imagination ran in
        encoder = evaluation_encoder(args.checkpoint or args.env_id, model_, args.device)
        real = RealLatentVectorEnv(real, encoder, model_.context_len, model_.latent_dim, args.device)
    real_returns = score(real, predict, args.max_steps, seeds)
    real.close()
    res = {"imagined_mean": float(np.mean(imag)), "imagined_std": float(np.std(imag)),
           "real_mean": float(np.mean(real_returns)), "real_std": float(np.std(real_returns))}
    net = args.net_arch or "default"
    games = f"the {len(real_returns)} starts {args.starts}" if args.start_list else f"{args.episodes} episodes"
    print(f"PPO ({policy} {net} {args.activation}, {args.obs_type}) after {model.num_timesteps} imagined steps, "
          f"deterministic, {args.episodes} imagined episodes, real games: {games}:")
    print(f"  imagination return: {res['imagined_mean']:8.2f} ± {res['imagined_std']:.2f}")
    print(f"  real {bundle.config['game']} return: {res['real_mean']:8.2f} ± {res['real_std']:.2f}")
    return res


if __name__ == "__main__":
    main()
