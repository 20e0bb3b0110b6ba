"""``ditwm merge-stores``: one episode store from several, for training on data of several behaviour policies.

A weak stage-1 agent shows the world model few of the game's rare events (in our Pong store the agent's paddle
returns the ball 193 times in 100k steps); a store of scripted play (``ditwm collect --agent track``) shows many.
Stage 2 trains on one store, so the stores are merged: every chunk is copied with its episode ids shifted past the
previous stores' ids, by a multiple of :data:`trainers.data.HELDOUT_EVERY`, so that each source keeps exactly its
own held-out episodes (:func:`trainers.data.heldout_mask`) and the fidelity evaluator, run on the first source,
holds out the same contexts as before. ``meta.json`` is the first source's, with a ``merged_from`` list naming
every source, its collector, its episode offset and its row count. Unreadable chunks are skipped with a warning,
as :meth:`trainers.data.EpisodeStore.load` does.

The output is written into a temporary sibling directory and renamed into place at the end, so a killed merge
leaves no half-written store.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainers.common import ArgError, arg, check_out_dir, run_cli
from trainers.data import HELDOUT_EVERY, EpisodeStore

#: meta fields that must agree between merged stores (frames and actions must mean the same thing)
SAME = ("game", "action_meanings", "protocol", "format_version")


@dataclass(kw_only=True)
class Args:
    sources: list[str] = arg(help="episode store directories, in order (the first one's held-out episodes are "
                                  "the evaluator's)")
    out: str = arg(help="the merged store's directory (new or empty)")


def next_offset(offset: int, highest: int) -> int:
    """The episode-id offset of the next source: the smallest multiple of ``HELDOUT_EVERY`` past every id so far
    (``offset``: this source's offset, ``highest``: its largest episode id, −1 when empty)."""
    return -(-(offset + highest + 1) // HELDOUT_EVERY) * HELDOUT_EVERY


def merge_stores(sources: list[str | Path], out: str | Path) -> dict:
    """Merge episode stores into ``out`` (see the module docstring).

    Args:
        sources: at least two store directories with equal ``game``, ``action_meanings`` and ``protocol``.
        out: a new (or empty) directory.
    Returns:
        The merged store's ``meta.json`` contents.
    Raises:
        ValueError: fewer than two sources, a source that is not a store, or meta fields that differ (named).
    """
    if len(sources) < 2:
        raise ValueError(f"sources: expected at least 2 episode stores, got {len(sources)}")
    metas = [EpisodeStore(s).read_meta() for s in sources]
    for k in SAME:
        for s, m in zip(sources[1:], metas[1:]):
            if m.get(k) != metas[0].get(k):
                raise ValueError(f"{k}: expected {metas[0].get(k)!r} (as in {sources[0]}), got {m.get(k)!r} in {s}")
    out = Path(out)
    tmp = out.parent / f".{out.name}.merging"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "chunks").mkdir(parents=True)
    try:
        index, offset, merged_from = 0, 0, []
        for s, m in zip(sources, metas):  # one pass: a source's offset only needs the previous sources' ids
            rows, highest = 0, -1
            for part in map(EpisodeStore.read_chunk, EpisodeStore(s).chunk_paths()):
                if part is None or not len(part["step"]):
                    continue
                highest = max(highest, int(part["episode"].max()))
                rows += len(part["step"])
                part["episode"] = part["episode"] + offset
                np.savez_compressed(tmp / "chunks" / f"chunk-{index:08d}.npz", **part)
                index += 1
            merged_from.append({"store": str(s), "episode_offset": offset, "rows": rows,
                                "collector": None if "merged_from" in m else m.get("collector"),
                                **({"merged_from": m["merged_from"]} if "merged_from" in m else {})})
            offset = next_offset(offset, highest)
        meta = {k: v for k, v in metas[0].items() if k not in ("format_version", "merged_from")}
        EpisodeStore(tmp).write_meta(**meta, merged_from=merged_from)
        if out.exists():
            out.rmdir()  # empty (checked by the CLI), replaced by the finished merge
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written is left behind
        raise
    return EpisodeStore(out).read_meta()


def main(args: Args) -> int:
    check_out_dir(args.out, resume=False)
    for i, s in enumerate(args.sources):
        if not (Path(s) / "meta.json").is_file():
            raise ArgError("sources", f"expected episode store directories, got {s!r} (no meta.json) at position {i}")
    try:
        meta = merge_stores(args.sources, args.out)
    except ValueError as e:
        raise ArgError("sources", str(e)) from None
    rows = sum(m["rows"] for m in meta["merged_from"])
    offs = ", ".join(f"{m['store']} +{m['episode_offset']}" for m in meta["merged_from"])
    print(f"merge-stores: {args.out} holds {rows} rows from {len(args.sources)} stores (episode offsets: {offs})")
    return 0


def cli(argv: list[str] | None = None) -> int:
    return run_cli(Args, main, "ditwm merge-stores", argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    raise SystemExit(cli())
