"""``ditwm evaluate agent``: the real-game score of a latent-stack policy (DESIGN.md §4 "Agent score").

Plays ``--episodes`` real games (one per parallel env, Atari-100k protocol) with the policy acting on the flattened
stack of the last ``K`` latents of a frozen encoder, and reports the mean and (population) std of the undiscounted
returns, greedy by default. ``--policy`` is a directory with ``agent.safetensors`` + ``agent.json`` (stage 1's
``OUT/stage1`` or a ``ditwm train-agent`` ``--out``), or ``random`` for the uniform random baseline (Pong: −20.7).
The figures are printed and written as JSON.

With sticky actions off (the protocol) a game is fixed by its start, the number of no-op frames at reset
(0 … 29), so a greedy policy has only 30 distinct games and random draws of ``--episodes`` repeat them:
``--starts all`` plays each once, and its mean is the policy's exact expected return; ``--starts 30:60`` plays
starts the protocol never draws, for choosing among policies without looking at its games.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from trainers.common import ArgError, arg, pick_device, run_cli


@dataclass(kw_only=True)
class Args:
    policy: str = arg(help="policy directory (agent.safetensors + agent.json), or 'random'")
    encoder: str = arg("", "frozen encoder: a bundle dir / env id / rssm:STAGE1_DIR or a stage-1 dir (default: "
                           "the policy dir's own autoencoder, else the world model recorded in its agent.json)")
    episodes: int = arg(10, "real episodes (DESIGN.md §4: >= 10)")
    seed: int = arg(0, "reset seed of the real games and of policy sampling")
    starts: str = arg("", "play one game per start instead of --episodes random ones: 'all' (the protocol's "
                          "no-op counts 0..29; the mean is a greedy policy's exact expected return) or 'A:B' "
                          "(no-op counts A..B-1, e.g. 30:60, starts the protocol never draws)")
    greedy: bool = arg(True, "argmax actions (DESIGN.md §4); --no-greedy samples the policy")
    game: str = arg("", "game of --policy random (default Pong); a trained policy's game is read from agent.json")
    max_steps: int = arg(27_000, "per-episode step cap (protocol: 27000 = 108000 frames)")
    device: str = arg("cpu", "torch device (cpu, cuda, auto)")
    json_out: str = arg("", "write the JSON here (default: POLICY/eval_real.json; random: only printed)")


class RandomPolicy:
    """Uniform random actions: ``act(obs (N, ·), generator, greedy) -> int64 (N,)`` (``greedy`` is ignored)."""

    def __init__(self, num_actions: int) -> None:
        self.num_actions = num_actions

    def act(self, obs: torch.Tensor, generator: torch.Generator | None = None, greedy: bool = False) -> torch.Tensor:
        return torch.randint(0, self.num_actions, (obs.shape[0],), generator=generator, device=obs.device)


class NullEncoder:
    """Stands in for an encoder where the policy ignores its input: ``encode(frames (N,...)) -> zeros (N, 1)``."""

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        return torch.zeros(frames.shape[0], 1, device=frames.device)


def _default_encoder(policy_dir: Path, meta: dict) -> str:
    if (policy_dir / "autoencoder.json").is_file():
        return str(policy_dir)
    if meta.get("world_model"):
        return str(meta["world_model"])
    raise ArgError("encoder", f"expected a bundle or stage-1 dir (the policy dir {policy_dir} names no encoder), "
                              f"got none")


def load_latent_policy(policy: str, encoder: str = "", game: str = "",
                       device: str | torch.device = "cpu") -> tuple[object, torch.nn.Module, int, str, Path]:
    """Load a trained latent-stack policy and the frozen encoder it reads.

    Args:
        policy: a policy directory (``agent.safetensors`` + ``agent.json``; a ``ditwm collect --agent rssm`` OUT
            is accepted for its ``stage1/``). encoder: a bundle dir / env id / ``rssm:STAGE1_DIR`` / stage-1 dir,
            or "" for the policy dir's own autoencoder, else the world model recorded in its ``agent.json``.
        game: the game the caller expects, or "" for any.
    Returns:
        ``(encoder with encode(uint8 (N,3,64,64)) -> float32 (N, d_z), actor with act(obs (N, K·d_z), generator,
        greedy) -> int64 (N,), K, game, policy_dir)``.
    Raises:
        ArgError: naming ``policy``, ``encoder`` or ``game`` (unloadable, or latents / game that do not fit).
    """
    from trainers.agent_io import load_agent, load_encoder

    policy_dir = Path(policy)
    if not (policy_dir / "agent.json").is_file() and (policy_dir / "stage1" / "agent.json").is_file():
        policy_dir = policy_dir / "stage1"  # a `ditwm collect --agent rssm` OUT directory
    try:
        ac, meta = load_agent(policy_dir, device)
    except (FileNotFoundError, ValueError) as e:
        raise ArgError("policy", f"expected a policy directory, got {policy!r}: {e}") from None
    own, k = meta.get("game", "Pong"), int(meta["context_len"])
    if game and game != own:
        raise ArgError("game", f"expected {own!r} (the policy's game), got {game!r}")
    game = own
    spec = encoder or _default_encoder(policy_dir, meta)
    try:
        enc, d_z, enc_game = load_encoder(spec, device)
    except (FileNotFoundError, ValueError, KeyError, OSError) as e:
        raise ArgError("encoder", f"expected a bundle or stage-1 dir, got {spec!r}: {e.args[0] if e.args else e}"
                       ) from None
    if k * d_z != ac.config.obs_dim:
        raise ArgError("encoder", f"expected latents of d_z={ac.config.obs_dim // k} (policy obs_dim "
                                  f"{ac.config.obs_dim} = K {k} x d_z), got d_z={d_z} from {spec!r}")
    if enc_game is not None and enc_game != game:
        raise ArgError("encoder", f"expected an encoder of {game!r} (the policy's game), got one of {enc_game!r}")
    return enc, ac.actor, k, game, policy_dir


def read_starts(spec: str, field: str = "starts") -> list[int] | None:
    """``--starts`` → no-op counts or None (:func:`dit_envs.envs.real.parse_starts`); :class:`ArgError` names
    ``field``."""
    from dit_envs.envs.real import parse_starts

    try:
        return parse_starts(spec)
    except ValueError as e:
        raise ArgError(field, str(e).removeprefix("starts: ")) from None


def setup(args: Args, dev: torch.device):
    """Validate and load → ``(encoder, actor, K, game, policy_dir or None)``. Raises :class:`ArgError` (names it)."""
    from dit_envs.envs.real import action_meanings, rom_id

    if args.episodes < 1:
        raise ArgError("episodes", f"expected an integer >= 1, got {args.episodes}")
    if args.max_steps < 1:
        raise ArgError("max_steps", f"expected an integer >= 1, got {args.max_steps}")
    if args.policy == "random":
        game = args.game or "Pong"
        try:
            rom_id(game)
        except ValueError as e:
            raise ArgError("game", str(e).removeprefix("game: ")) from None
        return NullEncoder(), RandomPolicy(len(action_meanings(game))), 1, game, None
    return load_latent_policy(args.policy, args.encoder, args.game, dev)


def main(args: Args) -> int:
    """Score the policy on the real game; prints a summary line and the JSON, writes the JSON file."""
    from dit_envs.io import atomic_write_json
    from trainers.policy import evaluate_policy

    dev = pick_device(args.device)
    starts = read_starts(args.starts)
    encoder, actor, k, game, policy_dir = setup(args, dev)
    out = Path(args.json_out) if args.json_out else (None if policy_dir is None else policy_dir / "eval_real.json")
    if out is not None and not out.parent.is_dir():
        raise ArgError("json_out", f"expected a path in an existing directory, got {str(out)!r}")
    res = evaluate_policy(encoder, actor, k, game, args.episodes, args.seed, greedy=args.greedy, device=dev,
                          max_steps=args.max_steps, starts=starts)
    n = len(res["returns"])
    report = {"policy": args.policy, "game": game, "episodes": n, "greedy": args.greedy,
              "seed": args.seed, **res, "args": asdict(args)}
    mode = "uniform" if args.policy == "random" else "greedy" if args.greedy else "sampled"
    where = f"the {n} starts {args.starts}" if starts else f"{n} episodes"
    print(f"{args.policy} on real {game}: {res['mean']:.2f} ± {res['std']:.2f} over {where} "
          f"({mode}), mean length {sum(res['lengths']) / n:.0f} steps")
    print(json.dumps({k_: report[k_] for k_ in ("mean", "std", "returns")}))
    if out is not None:
        atomic_write_json(out, report)
        print(f"written: {out}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    return run_cli(Args, main, "ditwm evaluate agent", argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    raise SystemExit(cli())
