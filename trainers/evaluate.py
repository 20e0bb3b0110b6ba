"""``ditwm evaluate <what>``: measurements of world models and agents (DESIGN.md §4 definitions)."""
from __future__ import annotations

import importlib
import sys

#: what → module with ``cli(argv) -> int``.
EVALUATIONS = {
    "throughput": "trainers.throughput",
    "fidelity": "trainers.fidelity",
    "agent": "trainers.evaluate_agent",
}


def cli(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: ditwm evaluate {{{','.join(EVALUATIONS)}}} [args]")
        return 0 if argv else 2
    if argv[0] not in EVALUATIONS:
        print(f"ditwm evaluate: error: what: expected one of {', '.join(EVALUATIONS)}, got {argv[0]!r}",
              file=sys.stderr)
        return 2
    return importlib.import_module(EVALUATIONS[argv[0]]).cli(argv[1:])


if __name__ == "__main__":
    raise SystemExit(cli())
