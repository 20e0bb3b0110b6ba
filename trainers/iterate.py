"""``ditwm iterate``: DIAMOND-style alternation in short rounds — play the real game with the current policy,
fine-tune the DiT on that play, continue the policy in the fine-tuned DiT, repeat.

DIAMOND (Alonso et al. 2024, Algorithm 1) and DreamerV3 alternate collection, world-model training and
actor-critic training in small steps, so the world model is always fitted to what the current policy does. A policy
trained long in one fixed model finds and exploits its errors (on Pong: states where the imagined ball vanishes by
the paddle), and one 100k-step round of its play corrects them only after it has drifted far. Each round here:

=========================  ===========================================================================================
``round_NNN/data/``        ``ditwm collect --agent policy``: ``--collect-steps`` real steps of the current policy
                           (sampled actions, a random one with probability ``--epsilon``), a new small store
``round_NNN/dit/``         ``ditwm pretrain --init <last DiT> --data DATA --extra-data <every round's store>
                           --recent-fraction F``: ``--model-steps`` fine-tuning steps, ``F`` of each batch from this
                           round's play (only the new store is encoded: :mod:`trainers.pretrain_data`)
``round_NNN/agent/``       ``ditwm train-agent --world-model round_NNN/dit/bundle --init policy:<last policy>``:
                           ``--agent-steps`` updates, then one real-game evaluation (its ``eval_return_mean``)
=========================  ===========================================================================================

``--pretrain-args`` and ``--agent-args`` pass more flags to those commands (e.g. ``--precision bf16`` and
``--event-fraction 0.25``; ``--sampling-steps 4 --dtype bfloat16 --epochs 4 --minibatches 4``). Rerunnable like
``ditwm pipeline``: a finished phase is skipped, a partial one resumed with ``--resume``; stop it any time (SIGTERM /
SIGINT checkpoint the running phase) and run the same command again, with a larger ``--rounds`` to go on. Every
phase's time and every round's real-game score are recorded in ``OUT/iterate.json``.
"""
from __future__ import annotations

import importlib
import json
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

from dit_envs.io import atomic_write_json
from trainers.common import ArgError, arg, run_cli
from trainers.evaluate_agent import read_starts
from trainers.pipeline import run_stage, stage_state


@dataclass(kw_only=True)
class Args:
    data: str = arg(help="the episode store the world model was trained on (pretrain --data of every round)")
    stage1: str = arg("", "stage-1 artifacts (the frozen autoencoder the policy sees); '' = DATA/stage1")
    world_model: str = arg(help="the DiT to start from: a pretrain OUT (its checkpoint) or a DiT bundle (pretrain "
                                "--init of round 1)")
    policy: str = arg(help="the policy to start from: a policy directory (agent.json + agent.safetensors)")
    out: str = arg(help="run directory (created; rerun the same command to resume)")
    rounds: int = arg(help="rounds in total (collect, fine-tune, continue the policy)")
    collect_steps: int = arg(10_000, "real env steps collected per round")
    collect_envs: int = arg(8, "parallel real games of each collection")
    epsilon: float = arg(0.1, "probability of a random action in the collections")
    collect_greedy: bool = arg(False, "collect with the policy's argmax actions (how it is scored) instead of sampled "
                                      "ones (collect --greedy)")
    model_steps: int = arg(500, "DiT fine-tuning steps per round (pretrain --steps)")
    model_lr: float = arg(3e-4, "peak learning rate of each fine-tune (pretrain --lr)")
    model_warmup: int = arg(50, "warm-up steps of each fine-tune (pretrain --warmup)")
    batch: int = arg(128, "windows per fine-tuning step (pretrain --batch)")
    recent_fraction: float = arg(0.5, "fraction of each fine-tuning batch from this round's play")
    agent_steps: int = arg(100, "actor-critic updates per round (train-agent --steps)")
    pretrain_args: str = arg("", "more ditwm pretrain flags, one shell-quoted string")
    agent_args: str = arg("", "more ditwm train-agent flags, one shell-quoted string")
    threads: int = arg(0, "torch CPU threads of the fine-tunes (0: torch's default)")
    seed: int = arg(0, "seed of round 1 (round r uses seed + r - 1 for its collection, fine-tune and policy)")
    select_episodes: int = arg(0, "real games on which each round's policy is scored, the same games every round "
                                  "(--select-seed); a round's policy is kept only when it scores at least the best "
                                  "so far (the starting policy is scored first), else the next round continues the "
                                  "best one. 0: off, every round continues the last")
    select_seed: int = arg(10_000, "reset seed of those games (away from the seeds the rounds play with)")
    select_starts: str = arg("", "instead of --select-episodes: score every policy on one game per start, 'all' (the "
                                 "protocol's 30 starts: each score is the exact greedy score, chosen on the "
                                 "protocol's own games) or 'A:B' (ditwm evaluate agent --starts)")
    continue_from: str = arg("best", "with --select-episodes / --select-starts: 'best' continues the best policy "
                                     "so far (a round below it is dropped), 'last' every round's policy (a walk "
                                     "that may pass through worse rounds; the best is reported)",
                             choices=("best", "last"))


#: the phases of a round: (name, module, folder, the file that exists once the phase is done)
PHASES = (("collect", "trainers.collect", "data", "../collected"),
          ("pretrain", "trainers.pretrain", "dit", "bundle/config.json"),
          ("train-agent", "trainers.train_agent", "agent", "agent.json"))


def validate(args: Args) -> tuple[list[str], list[str], int]:
    """Check the arguments; returns the split ``--pretrain-args`` and ``--agent-args`` and the agent's real-game step
    cap (its ``--eval-max-steps``, also the cap of the starting policy's selection games).

    Raises:
        ArgError: a count below 1, a fraction outside its range, a flag string that does not split, a flag the
            loop sets itself, or a ``--data`` / ``--policy`` / ``--world-model`` that is not there (names the field).
    """
    for name in ("rounds", "collect_steps", "collect_envs", "model_steps", "batch", "agent_steps"):
        if getattr(args, name) < 1:
            raise ArgError(name, f"expected an integer >= 1, got {getattr(args, name)}")
    for name in ("model_warmup", "threads", "select_episodes", "select_seed"):
        if getattr(args, name) < 0:
            raise ArgError(name, f"expected an integer >= 0, got {getattr(args, name)}")
    if args.select_starts:
        if args.select_episodes:
            raise ArgError("select_starts", f"expected '' with --select-episodes {args.select_episodes} (one way "
                                            f"of choosing), got {args.select_starts!r}")
        read_starts(args.select_starts, "select_starts")
    if not args.model_lr > 0:
        raise ArgError("model_lr", f"expected a number > 0, got {args.model_lr}")
    for name in ("epsilon", "recent_fraction"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise ArgError(name, f"expected a number in [0, 1], got {getattr(args, name)}")
    for name in ("data", "stage1", "world_model", "policy", "out"):  # resumed runs compare these: spell them once
        if getattr(args, name):
            setattr(args, name, str(Path(getattr(args, name)).expanduser().resolve()))
    split = []
    own = {"pretrain_args": ("--data", "--extra-data", "--init", "--out", "--steps", "--resume", "--recent-fraction",
                             "--stage1", "--lr", "--warmup", "--batch", "--seed", "--threads"),
           "agent_args": ("--world-model", "--init", "--out", "--steps", "--resume", "--eval-every", "--seed")
           + (("--eval-episodes", "--eval-seed", "--eval-starts") if _games(args) else ())}
    for name, flags in own.items():
        try:
            words = shlex.split(getattr(args, name))
        except ValueError as e:
            raise ArgError(name, f"expected shell-quoted flags, got {getattr(args, name)!r} ({e})") from None
        clash = [w for w in words if w.startswith("--") and any(  # also argparse's abbreviations of them
            f.startswith(w.split("=")[0]) or w.split("=")[0] == "--no-" + f[2:] for f in flags)]
        if clash:
            raise ArgError(name, f"expected flags other than {', '.join(flags)} (the loop sets them), got {clash[0]}")
        split.append(words)
    for name, path, want in (("data", args.data, "meta.json"), ("policy", args.policy, "agent.json")):
        if not (Path(path) / want).is_file():
            raise ArgError(name, f"expected a directory with {want}, got {path}")
    if not Path(args.world_model).is_dir():
        raise ArgError("world_model", f"expected a pretrain OUT or a DiT bundle directory, got {args.world_model}")
    if "game" not in json.loads((Path(args.data) / "meta.json").read_text()):
        raise ArgError("data", f"expected a game in {args.data}/meta.json, got none")
    record = Path(args.out) / "iterate.json"  # a resumed run chooses as it started: same games, policy and rule
    unchosen = {"select_episodes": 0, "select_starts": ""}  # a run that did not choose
    prev = json.loads(record.read_text()).get("select", unchosen) if record.is_file() else {}
    for name, value in _selection(args).items():
        if name in prev and prev[name] != value:
            raise ArgError(name, f"expected {prev[name]!r} (the run being resumed), got {value!r}")
    _check_parses("pretrain_args", "trainers.pretrain", split[0])
    agent = _check_parses("agent_args", "trainers.train_agent", split[1])
    return split[0], split[1], agent.eval_max_steps


def _selection(args: Args) -> dict:
    """The settings a selecting run is resumed with (``iterate.json``'s ``select``), keyed by field name."""
    return {k: getattr(args, k) for k in ("select_episodes", "select_starts", "select_seed", "policy",
                                          "continue_from")}


def _games(args: Args) -> int:
    """Real games each selection plays: one per ``--select-starts`` start, else ``--select-episodes`` (0: off)."""
    starts = read_starts(args.select_starts, "select_starts")
    return len(starts) if starts else args.select_episodes


def _check_parses(name: str, module: str, words: list[str]):
    """Parse ``words`` with the command's own parser (required flags filled in), so an unknown or malformed flag is
    refused before the first collection; returns the parsed namespace. Raises :class:`ArgError` naming ``name``."""
    import contextlib
    import io

    from trainers.common import build_parser

    mod = importlib.import_module(module)
    required = {"trainers.pretrain": ["--data", "D", "--out", "O", "--steps", "1"],
                "trainers.train_agent": ["--world-model", "W", "--out", "O", "--steps", "1"]}[module]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return build_parser(mod.Args, module).parse_args(required + words)
    except SystemExit:
        raise ArgError(name, f"expected flags of {module}, got {shlex.join(words)!r}: "
                             f"{err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else ''}") from None


def _round_argv(args: Args, r: int, folders: dict[str, Path], stores: list[str], model: str, policy: str,
                extra: tuple[list[str], list[str], int]) -> dict[str, list[str]]:
    stage1 = args.stage1 or str(Path(args.data) / "stage1")
    seed = str(args.seed + r - 1)
    thr = ["--threads", str(args.threads)] if args.threads else []
    select = (["--eval-starts", args.select_starts] if args.select_starts else
              ["--eval-episodes", str(args.select_episodes), "--eval-seed", str(args.select_seed)]
              if args.select_episodes else [])
    return {
        "collect": ["--game", json.loads((Path(args.data) / "meta.json").read_text())["game"], "--agent", "policy",
                    "--policy", policy, "--encoder", stage1, "--epsilon", str(args.epsilon), "--steps",
                    str(args.collect_steps), "--num-envs", str(args.collect_envs), "--seed", seed,
                    "--out", str(folders["collect"]), *(["--greedy"] if args.collect_greedy else [])],
        "pretrain": ["--data", args.data, "--extra-data", *stores, "--stage1", stage1, "--init", model,
                     "--out", str(folders["pretrain"]), "--steps", str(args.model_steps), "--lr", str(args.model_lr),
                     "--warmup", str(args.model_warmup), "--batch", str(args.batch), "--recent-fraction",
                     str(args.recent_fraction), "--seed", seed, *thr, *extra[0]],
        "train-agent": ["--world-model", str(folders["pretrain"] / "bundle"), "--init", f"policy:{policy}",
                        "--out", str(folders["train-agent"]), "--steps", str(args.agent_steps), "--eval-every", "0",
                        "--seed", seed, *select, *extra[1]],
    }


def _last_eval(agent_dir: Path) -> dict:
    """The last real-game evaluation in a train-agent run's metrics.jsonl ({} if none)."""
    path, last = agent_dir / "metrics.jsonl", {}
    if path.is_file():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if "eval_return_mean" in rec:
                last = rec
    return last


def _run_phase(log: dict, record: Path, r: int, name: str, module: str, argv: list[str]) -> int:
    """Run one phase in this process, record its exit code and minutes in ``log`` (saved to ``record``)."""
    print(f"iterate: round {r}: ditwm {name} {shlex.join(argv)}", flush=True)
    t0 = time.perf_counter()
    rc = run_stage(module, argv)
    minutes = (time.perf_counter() - t0) / 60
    log["phases"].append({"round": r, "phase": name, "exit": rc, "minutes": round(minutes, 3)})
    atomic_write_json(record, log)
    print(f"iterate: round {r}: {name}: exit {rc} after {minutes:.1f} min", flush=True)
    return rc


def main(args: Args) -> int:
    """Run every round not done yet; returns 0, or the exit code of the first phase that failed or was stopped.

    With ``--select-episodes N`` (or ``--select-starts``) the starting policy is first scored on the selection games
    (``OUT/start_eval.json``); every round's policy is scored on the same games, and only a round that scores at
    least the best so far passes its policy on (``--continue-from last``: every round's does, the best is
    reported). The world model always goes on from the last round's DiT: it is
    fitted to more real play each round whoever played it. The selection games are real interaction spent on
    choosing, not on training; their steps are counted in ``OUT/iterate.json`` (``select_steps``).

    Raises:
        ArgError: bad arguments (:func:`validate`); a phase's own bad arguments are raised by it, naming its flag.
    """
    extra = validate(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = out / "iterate.json"
    log = json.loads(record.read_text()) if record.is_file() else {"phases": [], "rounds": []}
    model, policy, stores = args.world_model, args.policy, []
    best, spent, lineage = -float("inf"), 0, {policy: 0}  # lineage: the updates behind each policy
    games = _games(args)
    if games:
        log["select"] = _selection(args)
        start = out / "start_eval.json"
        if not start.is_file():
            how = ["--starts", args.select_starts] if args.select_starts else ["--episodes", str(args.select_episodes)]
            argv = ["--policy", args.policy, "--encoder", args.stage1 or str(Path(args.data) / "stage1"),
                    *how, "--seed", str(args.select_seed),
                    "--max-steps", str(extra[2]), "--json-out", str(start)]
            rc = _run_phase(log, record, 0, "evaluate-agent", "trainers.evaluate_agent", argv)
            if rc != 0:
                return rc
        res = json.loads(start.read_text())
        best, spent = res["mean"], sum(res["lengths"])
        print(f"iterate: starting policy: {best:.2f} ± {res['std']:.2f} on the {games} selection games",
              flush=True)
    for r in range(1, args.rounds + 1):
        base = out / f"round_{r:03d}"
        folders = {name: base / sub for name, _, sub, _ in PHASES}
        stores.append(str(folders["collect"]))
        argvs = _round_argv(args, r, folders, stores, model, policy, extra)
        for name, module, _, done in PHASES:
            state = stage_state(folders[name], folders[name] / done)
            if state == "done":
                continue
            rc = _run_phase(log, record, r, name, module, argvs[name] + (["--resume"] if state == "resume" else []))
            if rc != 0:
                return rc
            if name == "collect":  # collect writes meta.json first: this marks a complete store
                (base / "collected").touch()
        model, ev = str(folders["pretrain"]), _last_eval(folders["train-agent"])
        score = ev.get("eval_return_mean", -float("inf"))
        spent += round(ev.get("eval_length_mean", 0) * games)
        is_best, this = bool(ev) and score >= best, str(folders["train-agent"])
        lineage[this] = lineage[policy] + args.agent_steps
        best = max(best, score) if ev else best
        kept = not games or args.continue_from == "last" or is_best
        if kept:
            policy = this
        if ev and not any(x["round"] == r for x in log["rounds"]):
            log["rounds"].append({"round": r, "eval_return_mean": score, "eval_return_std": ev["eval_return_std"],
                                  "best": is_best if games else None, "kept": kept,
                                  "updates": lineage[this],
                                  "real_steps": r * args.collect_steps,
                                  "select_steps": spent if games else None,
                                  "imagined_return_mean": ev.get("imagined_return_mean")})
            atomic_write_json(record, log)
            print(f"iterate: round {r}: real return {score:.2f} ± {ev['eval_return_std']:.2f} "
                  f"({'the best so far; ' if is_best and games else ''}"
                  f"{'continued' if kept else f'dropped, below {best:.2f}'}; next policy {policy}, "
                  f"world model {model})", flush=True)
    _report(args, out, log)
    return 0


def _report(args: Args, out: Path, log: dict) -> None:
    if _games(args):
        best = ([x for x in log["rounds"] if x["best"]] or [None])[-1]
    else:
        best = max(log["rounds"], key=lambda x: x["eval_return_mean"], default=None)
    if best is None:
        print("iterate: no round's policy scored at least the starting policy on the selection games")
        return
    where = out / f"round_{best['round']:03d}" / "agent"
    again = ("the protocol's own games: no game is left to confirm it on" if args.select_starts == "all" else
             "score it again with `ditwm evaluate agent --starts all`")
    print(f"iterate: best evaluation {best['eval_return_mean']:.2f} ± {best['eval_return_std']:.2f} in round "
          f"{best['round']} ({where}; chosen on these games; {again})")


def cli(argv: list[str] | None = None) -> int:
    return run_cli(Args, main, "ditwm iterate", argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    raise SystemExit(cli())
