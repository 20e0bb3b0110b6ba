"""The ``ditwm`` console script: one subcommand per stage, each also ``python -m trainers.<stage>``."""
from __future__ import annotations

import importlib
import sys

#: subcommand → module with a ``cli(argv) -> int`` function (imported lazily so ``ditwm --help`` is instant).
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("trainers.quickstart", "play DiTWM/Pong-v0 in imagination, write a GIF, print imagined steps/s"),
    "collect": ("trainers.collect", "fill an episode store from the real game"),
    "merge-stores": ("trainers.merge", "merge episode stores (e.g. stage-1 and scripted play) for stage 2"),
    "train-autoencoder": ("trainers.autoencoder", "stage 1: train the frame autoencoder, report ball/paddle survival"),
    "pretrain": ("trainers.pretrain", "stage 2: train the DiT world model on frozen stage-1 latents"),
    "distill": ("trainers.distill", "stage 2b: distil the DiT into a 1-, 2- or 4-step sampler"),
    "iterate": ("trainers.iterate", "DIAMOND-style rounds: collect with the policy, fine-tune the DiT, continue it"),
    "pipeline": ("trainers.pipeline", "the whole recipe: stage 1, pretrain, distill, stage 3, evaluation, release"),
    "evaluate": ("trainers.evaluate", "measure a world model or agent (throughput, ...)"),
    "train-agent": ("trainers.train_agent", "stage 3: train a policy in imagination, score it on the real game"),
    "push": ("trainers.push", "upload a checkpoint bundle to the Hugging Face Hub"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: ditwm <command> [args]\n\ncommands:")
        for name, (_, help_) in COMMANDS.items():
            print(f"  {name:<12} {help_}")
        print("\n'ditwm <command> --help' shows a command's arguments.")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"ditwm: error: command: expected one of {', '.join(COMMANDS)}, got {name!r}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.cli(rest)


if __name__ == "__main__":
    raise SystemExit(main())
