"""``ditwm collect``: fill an episode store from the real game (DESIGN.md §2 protocol).

``--agent random`` plays uniformly random actions from the minimal action set; ``--agent track`` (Pong only)
moves the agent's paddle towards the ball (:func:`trainers.pong_objects.track_actions`) and plays a uniformly random
action instead with probability ``--epsilon``: scripted exploration that shows the world model what a weak stage-1
agent rarely does (the paddle returning the ball; our 100k-step stage-1 store holds 193 returns); ``--agent
intercept`` (Pong only) aims the paddle where the ball will cross its line (:mod:`trainers.pong_intercept`) and
wins points, which the stage-1 agent and the tracker rarely do (same ``--epsilon``; ``--intercept-offset LOW
HIGH`` aims each approach at a new offset from the paddle's centre: returns and misses at the paddle's edge);
``--agent rssm`` (stage 1) trains the DreamerV3-style agent online while it collects; ``--agent policy --policy DIR``
plays a trained latent-stack policy (a ``ditwm train-agent`` run, sampled actions, a random one with probability
``--epsilon``) on the latents of its frozen encoder: the data of a DIAMOND-style alternation (Alonso et al. 2024:
collect with the current agent, fine-tune the world model with ``ditwm pretrain --init``, train the agent on in
imagination again), which shows the model the states where its imagination and the real game part. Every
transition goes to the store (:mod:`trainers.data`). SIGINT/SIGTERM flush what is buffered and exit (143 for
SIGTERM, 130 for SIGINT); ``--resume`` continues an interrupted store with new episodes until ``--steps``
transitions are stored.
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dit_envs.envs.real import PROTOCOL, make_real_env, rom_id
from trainers.common import ArgError, arg, catch_stop_signals, check_out_dir, pick_device, run_cli, signal_exit_code
from trainers.data import EpisodeStore
from trainers.pong_intercept import InterceptPlayer
from trainers.pong_objects import track_actions

AGENTS = ("random", "track", "intercept", "rssm", "policy")


@dataclass(kw_only=True)
class Args:
    game: str = arg("Pong", "Atari game name, as in ALE/<Game>-v5")
    agent: str = arg("random", "who plays: 'random' (uniform over the minimal action set), 'track' (Pong: follow "
                               "the ball, a random action with probability --epsilon), 'intercept' (Pong: aim where "
                               "the ball will cross the paddle's line; wins points), 'rssm' (stage 1: "
                               "DreamerV3-style agent learning while it collects) or 'policy' (a trained --policy)",
                    choices=AGENTS)
    epsilon: float = arg(0.25, "track, intercept, policy: probability of a uniformly random action instead of the "
                               "agent's")
    intercept_offset: list[float] = arg([1.0], "intercept: pixels below the predicted crossing row to aim the "
                                               "paddle's centre; two numbers LOW HIGH: a new offset drawn "
                                               "uniformly from that range at each approach of the ball (e.g. -7 7: "
                                               "balls at the paddle's edge, some returned, some missed)")
    policy: str = arg("", "policy: the policy directory (agent.safetensors + agent.json, e.g. a train-agent --out)")
    encoder: str = arg("", "policy: its frozen encoder (bundle dir / env id / stage-1 dir; default: the world model "
                           "recorded in its agent.json)")
    greedy: bool = arg(False, "policy: argmax actions (how it is scored, DESIGN.md §4) instead of sampled ones; a "
                              "random action still with probability --epsilon")
    steps: int = arg(help="number of real env transitions to store in total (all envs together)")
    out: str = arg(help="episode store directory (new or empty unless --resume)")
    num_envs: int = arg(8, "parallel real games")
    seed: int = arg(0, "seed of the games and the agent")
    resume: bool = arg(False, "continue an existing store in --out")
    chunk_rows: int = arg(4096, "rows per chunk file (a crash loses at most one chunk)")
    device: str = arg("cpu", "rssm: torch device (cpu, cuda, auto)")
    size: str = arg("default", "rssm: model sizes, 'default' or 'tiny' (tests)", choices=("default", "tiny"))
    prefill: int = arg(20_000, "rssm: random-play env steps before the autoencoder trains")
    ae_steps: int = arg(16_000, "rssm: autoencoder updates (then it is frozen)")
    train_every: int = arg(32, "rssm: env steps per RSSM + actor-critic update (inverse train ratio)")
    checkpoint_every: int = arg(10_000, "rssm: env steps between training checkpoints")
    segment_reset: bool = arg(False, "rssm: restart the games at every checkpoint, so that a resumed run is "
                                     "bit-identical to an uninterrupted one (cuts episodes; for tests)")


def validate(args: Args) -> None:
    """Raise :class:`ArgError` for any bad argument; writes nothing."""
    try:
        rom_id(args.game)
    except ValueError as e:
        raise ArgError("game", str(e).removeprefix("game: ")) from None
    if args.agent not in AGENTS:
        raise ArgError("agent", f"expected one of {AGENTS}, got {args.agent!r}")
    if not 0.0 <= args.epsilon <= 1.0:
        raise ArgError("epsilon", f"expected a number in [0, 1], got {args.epsilon}")
    if args.agent in ("track", "intercept") and args.game != "Pong":
        raise ArgError("agent", f"expected 'random', 'rssm' or 'policy' for game {args.game!r} ({args.agent!r} "
                                f"plays Pong only), got {args.agent!r}")
    io = list(args.intercept_offset)
    if not 1 <= len(io) <= 2 or not np.isfinite(io).all() or io[0] > io[-1]:
        raise ArgError("intercept_offset", f"expected one finite number or LOW HIGH with LOW <= HIGH, got {io}")
    if args.agent != "intercept" and io != [1.0]:
        raise ArgError("intercept_offset", f"expected only with --agent intercept, got {io} with --agent "
                                           f"{args.agent}")
    if args.agent in ("rssm", "policy"):
        pick_device(args.device)
    if (args.agent == "policy") != bool(args.policy):
        raise ArgError("policy", f"expected a policy directory with --agent policy and none otherwise, got "
                                 f"{args.policy!r} with --agent {args.agent}")
    if args.greedy and args.agent != "policy":
        raise ArgError("greedy", f"expected only with --agent policy, got --greedy with --agent {args.agent}")
    for name in ("steps", "num_envs", "chunk_rows", "prefill", "ae_steps", "train_every", "checkpoint_every"):
        if getattr(args, name) <= 0:
            raise ArgError(name, f"expected an integer > 0, got {getattr(args, name)}")
    out = check_out_dir(args.out, args.resume)
    if args.resume and out.exists() and any(out.iterdir()):
        try:
            meta = EpisodeStore(out).read_meta()
        except (FileNotFoundError, ValueError) as e:
            raise ArgError("out", f"expected an episode store to resume, got {e}") from None
        if meta.get("collector", {}).get("agent", args.agent) != args.agent:
            raise ArgError("agent", f"expected {meta['collector']['agent']!r} (the agent of the store being "
                                    f"resumed), got {args.agent!r}")
        if meta.get("game") != args.game:
            raise ArgError("game", f"expected {meta.get('game')!r} (the game of the store being resumed), "
                                   f"got {args.game!r}")
        prev_io = meta["collector"].get("intercept_offset", [1.0])
        if args.agent == "intercept" and prev_io != io:
            raise ArgError("intercept_offset", f"expected {prev_io} (the offset of the store being resumed), got "
                                               f"{io}")
        if args.agent == "policy" and meta["collector"].get("policy") != args.policy:
            raise ArgError("policy", f"expected {meta['collector'].get('policy')!r} (the policy of the store being "
                                     f"resumed), got {args.policy!r}")
        if meta["collector"].get("greedy", False) != args.greedy:
            raise ArgError("greedy", f"expected {meta['collector'].get('greedy', False)} (the store being resumed), "
                                     f"got {args.greedy}")


def _policy_agent(args: Args):
    """The ``--agent policy`` player: :class:`trainers.policy.StackedPolicy` of the loaded policy and encoder.

    Raises:
        ArgError: naming ``policy``, ``encoder`` or ``game`` (:func:`trainers.evaluate_agent.load_latent_policy`).
    """
    from trainers.evaluate_agent import load_latent_policy
    from trainers.policy import StackedPolicy

    dev = pick_device(args.device)
    encoder, actor, k, _, _ = load_latent_policy(args.policy, args.encoder, args.game, dev)
    return StackedPolicy(encoder, actor, args.num_envs, k, device=dev)


def _existing(store: EpisodeStore) -> tuple[int, int]:
    """(stored transitions, next free episode id) of a store being resumed."""
    data = store.load()
    if len(data["step"]) == 0:
        return 0, 0
    return int((data["action"] >= 0).sum()), int(data["episode"].max()) + 1


def main(args: Args) -> int:
    """Collect ``args.steps`` transitions into ``args.out``; returns the exit code (0, or 143 after SIGTERM)."""
    validate(args)
    if args.agent == "rssm":
        from trainers.stage1_cli import run_rssm

        return run_rssm(args)
    policy = _policy_agent(args) if args.agent == "policy" else None
    out = Path(args.out)
    store = EpisodeStore(out, chunk_rows=args.chunk_rows)
    env = make_real_env(args.game, args.num_envs)
    done_steps, next_ep = _existing(store) if args.resume and (out / "meta.json").exists() else (0, 0)
    first_ep = next_ep  # seeds this run's draws: a resumed run draws fresh ones
    store.write_meta(game=args.game, action_meanings=list(env.action_meanings), protocol=PROTOCOL,
                     collector={k: v for k, v in asdict(args).items() if k != "out"})
    n = args.num_envs
    rng = np.random.default_rng([args.seed, next_ep])  # a resumed run draws fresh actions
    obs, _ = env.reset(seed=args.seed + next_ep)
    if policy is not None:  # sampled actions (collection explores), fresh draws in a resumed run
        policy.reset(obs, seed=args.seed + 1_000_003 * next_ep)
    episode = np.arange(next_ep, next_ep + n, dtype=np.int64)
    next_ep += n
    step = np.zeros(n, np.int64)
    zeros_f, zeros_b = np.zeros(n, np.float32), np.zeros(n, bool)
    store.add(obs=obs, action=np.full(n, -1), reward=zeros_f, terminated=zeros_b, truncated=zeros_b,
              episode=episode, step=step)

    stop = {"signal": None}
    restore = catch_stop_signals(lambda signum: stop.__setitem__("signal", signum))
    t0, start_steps = time.perf_counter(), done_steps
    bar = tqdm(total=args.steps, initial=done_steps, unit="step", desc=f"collect {args.game}",
               disable=not sys.stderr.isatty())
    meanings = list(env.action_meanings)
    player = (InterceptPlayer(meanings, n, offset=(args.intercept_offset[0], args.intercept_offset[-1]),
                              seed=[args.seed, first_ep, 1]) if args.agent == "intercept" else None)
    try:
        while done_steps < args.steps and stop["signal"] is None:
            action = rng.integers(0, len(meanings), size=n)
            if args.agent == "track":
                tracked = track_actions(obs, meanings, rng)
                action = np.where(rng.random(n) < args.epsilon, action, tracked)
            elif player is not None:
                action = np.where(rng.random(n) < args.epsilon, action, player.act(obs))
            elif policy is not None:
                action = np.where(rng.random(n) < args.epsilon, action, policy.act(greedy=args.greedy))
            nxt, reward, term, trunc, info = env.step(action)
            done = term | trunc
            last_iter = done_steps + n >= args.steps
            frame, obs = nxt.copy(), nxt
            for i in np.flatnonzero(done):
                frame[i] = info["final_obs"][i]
            store.add(obs=frame, action=action, reward=reward, terminated=term,
                      truncated=trunc | (last_iter & ~done), episode=episode, step=step + 1)
            step += 1
            if policy is not None:
                policy.observe(nxt, done)
            if player is not None:
                player.episode_ended(done)
            if done.any():
                k = int(done.sum())
                episode[done] = np.arange(next_ep, next_ep + k)
                next_ep += k
                step[done] = 0
                store.add(obs=nxt[done], action=np.full(k, -1), reward=np.zeros(k, np.float32),
                          terminated=np.zeros(k, bool), truncated=np.zeros(k, bool),
                          episode=episode[done], step=step[done])
            done_steps += n
            bar.update(n)
    finally:
        store.flush()
        bar.close()
        env.close()
        restore()
    dt = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"collected {done_steps - start_steps} steps in {dt:.1f} s: {(done_steps - start_steps) / dt:.0f} steps/s; "
          f"store {out} holds {done_steps} steps, {size / 2**20:.1f} MiB on disk")
    return 0 if stop["signal"] is None else signal_exit_code(stop["signal"])


def cli(argv: list[str] | None = None) -> int:
    return run_cli(Args, main, "ditwm collect", argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    raise SystemExit(cli())
