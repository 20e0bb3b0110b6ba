"""Closed-loop reward statistics of a fixed policy (random, tracking, intercepting): imagination vs the real game.

Open-loop fidelity (``ditwm evaluate fidelity``) scores reward events over 64 steps from real contexts; an agent
trained in imagination lives in long closed-loop episodes instead. This script plays the same policy for
``--steps`` steps in ``--num-envs`` imagined games (no truncation) and in as many real games, and prints per 1000
steps: reward events won (+) and lost (−) and episode ends. ``--policy random`` plays uniform-random actions;
``--policy track`` moves the paddle towards the ball seen in the (imagined or real) frame
(:func:`trainers.pong_objects.track_actions`), a competent policy whose returns and points the world model must
reproduce for an agent to learn them; ``--policy intercept`` aims where the ball will cross the paddle's line
(:class:`trainers.pong_intercept.InterceptPlayer`) and wins points on the real game, so its ``wins`` row shows
whether the model imagines points won at all. ``--policy DIR`` plays a trained latent-stack policy (a ``ditwm
train-agent`` run; sampled actions, as it trains, or with ``--greedy`` the argmax, as ``ditwm evaluate agent``
scores it): on the imagined game it reads the env's latent observations, on
the real game the latents of its frozen encoder, so the two rows show how far the model's imagination of *that*
agent's play is from the real game (an agent that exploits its model imagines fewer losses than it suffers). A world
model that an agent can learn from reproduces these rates; one that under-produces the agent's wins gives a policy
nothing to learn scoring from, and one that under-produces losses can be exploited. ``--fates`` (Pong) also counts
what happens to the ball at the agent's paddle (:mod:`trainers.pong_fates`): returns, *phantom* returns (the ball
turns round with the paddle more than 8 px away) and *vanished* balls (gone near the paddle without a point) — the
ways a model lets an agent keep the ball that the real game never does — and the fraction of frames that show the
ball at all (``ball_seen``: in real play 0.6–0.8; a model that loses the ball often imagines a game with little of
it, where no point is lost). With ``--keep-ball R`` (train-agent's rejection sampling) it also prints the share of
imagined steps rejected at the first draw (the model's one-step rate of losing the ball in that play) and after R
more.

Run::

    python examples/reward_rates.py                       # the bundled DiTWM/Pong-v0
    python examples/reward_rates.py --world-model runs/pipeline/distill/bundle --sampling-steps 1
    python examples/reward_rates.py --policy track        # ball-tracking play (pixel observations)
    python examples/reward_rates.py --policy intercept    # a scripted player that wins points
    python examples/reward_rates.py --policy runs/agent --world-model runs/dit/bundle --sampling-steps 4 --fates
    python examples/reward_rates.py --policy runs/agent --world-model runs/dit/bundle --sampling-steps 4 --greedy
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout without install

import dit_envs  # noqa: E402  (registers the DiTWM ids)
from trainers.agent_envs import attach_keep_ball, resample_rates  # noqa: E402
from trainers.common import ArgError  # noqa: E402
from trainers.evaluate_agent import load_latent_policy  # noqa: E402
from trainers.policy import StackedPolicy  # noqa: E402
from trainers.pong_fates import ball_fates  # noqa: E402
from trainers.pong_intercept import InterceptPlayer  # noqa: E402
from trainers.pong_objects import locate_pong_objects  # noqa: E402
from trainers.pong_objects import track_actions  # noqa: E402
from trainers.rollout import latent_obs  # noqa: E402

POLICIES = ("random", "track", "intercept")
PIXEL_POLICIES = ("track", "intercept")


class LatentPolicy:
    """A trained latent-stack policy (``ditwm train-agent`` output) for :func:`play`: actions int64 ``(N,)``, sampled
    or (``greedy``) the argmax.

    Imagined envs give it their latent observations ``(N, K_env, d_z)`` (it reads the last ``K``); real envs give
    uint8 frames ``(N, 3, 64, 64)``, which its frozen encoder turns into a rolling stack
    (:class:`trainers.policy.StackedPolicy`, restarted at episode ends).
    """

    def __init__(self, policy_dir: str, encoder: str = "", seed: int = 0, greedy: bool = False) -> None:
        self.encoder, self.actor, self.k, _, _ = load_latent_policy(policy_dir, encoder)
        self.seed, self.gen, self.real, self.greedy = seed, torch.Generator().manual_seed(seed), None, greedy

    @torch.no_grad()
    def __call__(self, obs: np.ndarray, done: np.ndarray | None) -> np.ndarray:
        if np.asarray(obs).dtype != np.uint8:  # imagined latents (N, K_env, d_z); ValueError if K_env < K
            return self.actor.act(latent_obs(obs, self.k, "cpu"), self.gen, greedy=self.greedy).numpy()
        if self.real is None or done is None:
            self.real = StackedPolicy(self.encoder, self.actor, len(obs), self.k, self.seed)
            self.real.reset(obs)
        else:
            self.real.observe(obs, done)
        return self.real.act(self.greedy)


def play(envs: gym.vector.VectorEnv, steps: int, seed: int, policy: str = "random",
         action_meanings: list[str] | None = None, fates: bool = False) -> dict[str, float]:
    """Play ``policy`` for ``steps`` batched steps → events per 1000 env steps.

    Args:
        envs: a vector env with a discrete action space; pixel observations ``(N, 3, 64, 64)`` for ``"track"`` and
            ``"intercept"``.
        policy: ``"random"`` (uniform actions), ``"track"`` (:func:`~trainers.pong_objects.track_actions`),
            ``"intercept"`` (:class:`~trainers.pong_intercept.InterceptPlayer`, default offset) or a
            :class:`LatentPolicy`.
        action_meanings: the game's action names (needed by ``"track"`` and ``"intercept"``).
        fates: also count the ball's fates at the agent's paddle (Pong; :func:`trainers.pong_fates.ball_fates`) on
            the frames: the observations where they are uint8 frames, else ``envs.render()`` (an imagined env made
            with ``render_mode="rgb_array"``).
    Returns:
        ``{"wins", "losses", "episode_ends"}``: counts of reward > 0, reward < 0 and terminations, per 1000 env
        steps (summed over envs); with ``fates`` also ``"returns"``, ``"phantom_returns"`` and ``"vanished"`` per
        1000 steps and ``"ball_seen"``, the fraction of frames in which the ball is located.
    Raises:
        ValueError: an unknown ``policy``, no ``action_meanings`` for a pixel policy, or ``fates`` on an env that
            gives neither frames nor renders.
    """
    if not isinstance(policy, LatentPolicy) and policy not in POLICIES:
        raise ValueError(f"policy: expected one of {POLICIES} or a LatentPolicy, got {policy!r}")
    if policy in PIXEL_POLICIES and action_meanings is None:
        raise ValueError(f"action_meanings: expected the game's action names for policy {policy!r}, got None")
    rng = np.random.default_rng(seed)
    obs, _ = envs.reset(seed=seed)
    wins = losses = ends = 0
    n = envs.num_envs
    done = None
    player = InterceptPlayer(action_meanings, n) if policy == "intercept" else None
    record: dict[str, list[np.ndarray]] = {"ball": [], "paddle": [], "reward": [], "done": []}
    for _ in range(steps):
        if fates:
            frames = np.asarray(obs)
            if frames.dtype != np.uint8:  # latent observations: the env's decoded newest frames (N, 64, 64, 3)
                rendered = envs.render()
                if rendered is None:
                    raise ValueError("envs: expected uint8 frame observations or render_mode='rgb_array' for "
                                     "fates, got latent observations and no render mode")
                frames = np.ascontiguousarray(np.asarray(rendered).transpose(0, 3, 1, 2))
            objs = locate_pong_objects(frames)
            record["ball"].append(objs.ball)
            record["paddle"].append(objs.agent_y)
        if isinstance(policy, LatentPolicy):
            action = policy(obs, done)
        elif policy == "track":
            action = track_actions(np.asarray(obs), action_meanings, rng)
        elif player is not None:
            action = player.act(np.asarray(obs))
        else:
            action = rng.integers(0, envs.single_action_space.n, n)
        obs, reward, term, trunc, _ = envs.step(action)
        done = np.asarray(term) | np.asarray(trunc)
        if player is not None:
            player.episode_ended(done)
        wins += int((np.asarray(reward) > 0).sum())
        losses += int((np.asarray(reward) < 0).sum())
        ends += int(np.asarray(term).sum())
        if fates:
            record["reward"].append(np.asarray(reward, np.float64))
            record["done"].append(done)
    per = 1000.0 / (steps * n)
    out = {"wins": wins * per, "losses": losses * per, "episode_ends": ends * per}
    if fates:
        counts = ball_fates(*(np.stack(record[k], axis=1) for k in ("ball", "paddle", "reward", "done")))
        out.update({k: v * per for k, v in counts.items()})
        out["ball_seen"] = float(np.mean([~np.isnan(b[:, 1]) for b in record["ball"]]))
    return out


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world-model", default="DiTWM/Pong-v0", help="registered env id or bundle directory")
    p.add_argument("--num-envs", type=int, default=64, help="imagined and real games played at once")
    p.add_argument("--steps", type=int, default=1000, help="steps per game")
    p.add_argument("--sampling-steps", type=int, default=0, help="denoising steps (0: the bundle's default)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the bundle's)")
    p.add_argument("--sampling-shift", type=float, default=None,
                   help="time shift of the sampler's steps (default: the bundle's; > 1: more steps at high noise)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--policy", default="random",
                   help="random: uniform actions; track: follow the ball; intercept: aim where the ball will cross "
                        "the paddle's line (both pixel observations); or a policy "
                        "directory (a train-agent run; latent observations)")
    p.add_argument("--encoder", default="", help="policy DIR: its frozen encoder (default: its agent.json's)")
    p.add_argument("--greedy", action="store_true", help="policy DIR: argmax actions instead of sampled ones")
    p.add_argument("--fates", action="store_true",
                   help="Pong: also count returns, phantom returns and vanished balls at the agent's paddle")
    p.add_argument("--keep-ball", type=int, default=0,
                   help="Pong: draw an imagined step again up to this many times when it loses the ball in "
                        "mid-field (train-agent --keep-ball)")
    p.add_argument("--keep-ball-returns", action="store_true",
                   help="with --keep-ball: also draw again a return without the paddle")
    a = p.parse_args(argv)
    policy = a.policy
    if a.greedy and policy in POLICIES:
        p.error(f"--greedy: expected it only with --policy DIR (a trained policy), got --policy {policy}")
    if policy not in POLICIES:
        try:
            policy = LatentPolicy(policy, a.encoder, a.seed, a.greedy)
        except ArgError as e:
            p.error(str(e))
    for name in ("num_envs", "steps"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(a, name)}")
    kw = {"num_envs": a.num_envs, "obs_type": "pixels" if a.policy in PIXEL_POLICIES else "latent",
          "max_episode_steps": a.steps + 1, "render_mode": "rgb_array" if a.fates else None}
    if a.sampling_steps:
        kw["sampling_steps"] = a.sampling_steps
    if a.temperature is not None:
        kw["temperature"] = a.temperature
    if a.sampling_shift is not None:
        kw["sampling_shift"] = a.sampling_shift
    try:
        if a.world_model.startswith("DiTWM/"):
            imagined = gym.make_vec(a.world_model, **kw)
        else:
            imagined = gym.make_vec("DiTWM/Pong-v0", checkpoint=a.world_model, **kw)
    except ValueError as e:  # a sampler setting the model refuses (names it), or a bundle that does not load
        p.error(str(e))
    game = imagined.bundle.config["game"]
    meanings = list(imagined.bundle.config["action_meanings"])
    if a.fates and game != "Pong":
        p.error(f"--fates: expected a Pong world model, got game {game!r}")
    try:
        attach_keep_ball(imagined, a.keep_ball, None, a.keep_ball_returns)
    except ArgError as e:
        p.error(str(e))
    rates = {"imagined": play(imagined, a.steps, a.seed, policy, meanings, a.fates)}
    drawn = resample_rates(imagined)  # {} without --keep-ball
    real = dit_envs.make_real_env(game, num_envs=a.num_envs, seed=a.seed)
    rates["real"] = play(real, a.steps, a.seed, policy, meanings, a.fates)
    real.close()
    imagined.close()
    print(f"{a.policy} play, {a.num_envs} games x {a.steps} steps, events per 1000 steps ({game}, {a.world_model}, "
          f"sampling_steps {imagined.sampling_steps}, temperature {imagined.temperature}, sampling_shift "
          f"{imagined.sampling_shift}):")
    extra = ("returns", "phantom_returns", "vanished", "ball_seen") if a.fates else ()
    print(f"{'':>9} {'wins':>7} {'losses':>7} {'ends':>7}" + "".join(f" {k:>15}" for k in extra))
    for name, r in rates.items():
        print(f"{name:>9} {r['wins']:7.3f} {r['losses']:7.2f} {r['episode_ends']:7.3f}"
              + "".join(f" {r[k]:15.2f}" for k in extra))
    if drawn:
        print(f"imagined steps rejected (the ball lost{', or a phantom return' if a.keep_ball_returns else ''}) "
              f"at the first draw: {drawn['rejected_rate']:.4f}; after {a.keep_ball} more: "
              f"{drawn['still_rejected_rate']:.4f}")
        rates["imagined"].update(drawn)
    return rates


if __name__ == "__main__":
    main()
