"""``ditwm push``: upload a checkpoint bundle to a Hugging Face Hub model repo and print its pinned catalog line.

    ditwm push --checkpoint runs/pong/bundle --repo my-org/ditwm-pong [--private]
    python -m trainers.push --checkpoint runs/pong/bundle --repo my-org/ditwm-pong

Authentication: ``HF_TOKEN`` or ``hf auth login`` (preferred over ``--token``, which shows in the process list).
Prints the commit sha and a ``register("DiTWM/<Game>-v<k>", "hf://org/name@<commit>", ..., sha256={...})`` line.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from registry.hub import COMMIT_RE, DEFAULT_COMMIT_MESSAGE, check_bundle_dir, check_repo_id, push
from trainers.common import ArgError, arg, run_cli


@dataclass
class Args:
    """Arguments of ``ditwm push`` (one flag per field)."""

    checkpoint: str = arg(help="checkpoint bundle directory to upload (must contain config.json)")
    repo: str = arg(help="Hub model repo id 'org/name' (created if missing)")
    private: bool = arg(False, help="create the repo as private (no effect on an existing repo)")
    token: str | None = arg(None, help="Hub token (default: HF_TOKEN or the `hf auth login` token)")
    revision: str = arg("main", help="branch to commit to")
    message: str = arg(DEFAULT_COMMIT_MESSAGE, help="commit message")


def check_args(args: Args) -> None:
    """Validate ``args`` without any network call.

    Raises:
        ArgError: ``checkpoint`` missing / not a directory / without config.json; ``repo`` not ``org/name``;
            ``revision`` empty or a commit sha.
    """
    try:
        check_bundle_dir(args.checkpoint, field="checkpoint")
    except OSError as e:
        raise ArgError("checkpoint", str(e).removeprefix("checkpoint: ")) from e
    try:
        check_repo_id(args.repo, field="repo")
    except ValueError as e:
        raise ArgError("repo", str(e).removeprefix("repo: ")) from e
    if not args.revision.strip() or COMMIT_RE.fullmatch(args.revision):
        raise ArgError("revision", f"expected a branch name to commit to, got {args.revision!r}")


def main(args: Args, api: Any = None) -> int:
    """Push ``args.checkpoint`` to ``args.repo``; print the commit and the catalog line. Returns 0.

    Args:
        args: parsed arguments.
        api: an ``HfApi``-like object (``create_repo``, ``create_branch``, ``upload_folder``); default a real
            ``huggingface_hub.HfApi`` — tests pass a fake.

    Raises:
        ArgError: bad arguments (before any network call).
    """
    check_args(args)
    sha, line = push(args.checkpoint, args.repo, token=args.token, private=args.private,
                     revision=args.revision, commit_message=args.message, api=api)
    print(f"pushed {args.checkpoint} to https://huggingface.co/{args.repo} (revision {args.revision}) "
          f"at commit {sha}")
    print("catalog entry:")
    print(line)
    return 0


def cli(argv: list[str] | None = None) -> int:
    """Command-line entry point (``ditwm push``); returns the exit code (2 on a bad argument)."""
    return run_cli(Args, main, "ditwm push", argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    raise SystemExit(cli())
