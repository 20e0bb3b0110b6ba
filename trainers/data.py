"""Episode store (append-only, chunked, atomic) and a seeded sequence sampler.

Row convention (DreamerV3's ``is_first`` / previous-action layout): row ``i`` of an episode holds the frame
``obs[i]`` together with the transition that *reached* it — ``action[i]`` taken at frame ``i-1`` (−1 for the
first frame of an episode), ``reward[i]`` received on that transition, and ``terminated[i]`` / ``truncated[i]``
set on the episode's last frame. Every frame is stored, the final one included, so a window of rows is a
self-contained trajectory for world-model training.

On disk: ``DIR/meta.json`` (game, action meanings, protocol, format_version) and ``DIR/chunks/chunk-XXXXXXXX.npz``
(numpy ``.npz``, compressed; never pickled). Each chunk is written with :func:`dit_envs.io.atomic_write_bytes`,
so a writer killed at any point leaves only complete chunks (and perhaps a hidden ``.tmp`` file, ignored and
removed on resume). A chunk that is unreadable anyway (disk corruption) is skipped with a warning naming it.
"""
from __future__ import annotations

import io
import json
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dit_envs.io import atomic_write_bytes, atomic_write_json

FORMAT_VERSION = 1
FIELDS: dict[str, tuple[np.dtype, tuple[int, ...]]] = {
    "obs": (np.dtype(np.uint8), (3, 64, 64)),
    "action": (np.dtype(np.int64), ()),
    "reward": (np.dtype(np.float32), ()),
    "terminated": (np.dtype(np.bool_), ()),
    "truncated": (np.dtype(np.bool_), ()),
    "episode": (np.dtype(np.int64), ()),
    "step": (np.dtype(np.int64), ()),
}


class EpisodeStore:
    """Writer and reader of a chunked episode store directory.

    Args:
        root: the store directory (created if missing).
        chunk_rows: rows buffered before a chunk is written (a crash loses at most this many rows).
    """

    def __init__(self, root: str | Path, chunk_rows: int = 4096) -> None:
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows: expected >= 1, got {chunk_rows}")
        self.root = Path(root)
        self.chunk_dir = self.root / "chunks"
        self.chunk_rows = chunk_rows
        self._buf: dict[str, list[np.ndarray]] = {k: [] for k in FIELDS}
        self._buffered = 0

    # ---- metadata -------------------------------------------------------------------------------------------
    def write_meta(self, **meta: object) -> None:
        """Create the directory and write ``meta.json`` (game, action meanings, protocol, ...) atomically."""
        self.chunk_dir.mkdir(parents=True, exist_ok=True)
        for tmp in self.chunk_dir.glob(".*.tmp"):  # leftovers of a writer killed mid-write
            tmp.unlink(missing_ok=True)
        atomic_write_json(self.root / "meta.json", {"format_version": FORMAT_VERSION, **meta})

    def read_meta(self) -> dict:
        """Contents of ``meta.json``. Raises FileNotFoundError (no store here) or ValueError (bad version)."""
        path = self.root / "meta.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: expected an episode store's meta.json, found none")
        meta = json.loads(path.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: format_version expected {FORMAT_VERSION}, got {meta.get('format_version')!r}")
        return meta

    # ---- writing --------------------------------------------------------------------------------------------
    def add(self, **rows: np.ndarray) -> None:
        """Append a batch of rows, one per env: every field of :data:`FIELDS` with leading dimension ``N``.

        Raises:
            ValueError: a missing/unknown field or a shape/dtype that does not match :data:`FIELDS`.
        """
        if set(rows) != set(FIELDS):
            raise ValueError(f"rows: expected fields {sorted(FIELDS)}, got {sorted(rows)}")
        n = len(rows["step"])
        for k, (dtype, shape) in FIELDS.items():
            v = np.asarray(rows[k])
            if v.shape != (n, *shape):
                raise ValueError(f"{k}: expected shape {(n, *shape)}, got {v.shape}")
            if not np.can_cast(v.dtype, dtype, casting="same_kind"):
                raise ValueError(f"{k}: expected dtype {dtype}, got {v.dtype}")
            self._buf[k].append(v.astype(dtype, copy=True))
        self._buffered += n
        if self._buffered >= self.chunk_rows:
            self.flush()

    def flush(self) -> None:
        """Write buffered rows as one new chunk (atomically); no-op when nothing is buffered."""
        if not self._buffered:
            return
        data = {k: np.concatenate(v) for k, v in self._buf.items()}
        bio = io.BytesIO()
        np.savez_compressed(bio, **data)
        self.chunk_dir.mkdir(parents=True, exist_ok=True)
        existing = [int(p.stem.split("-")[1]) for p in self.chunk_dir.glob("chunk-*.npz")]
        index = max(existing, default=-1) + 1
        atomic_write_bytes(self.chunk_dir / f"chunk-{index:08d}.npz", bio.getvalue())
        self._buf = {k: [] for k in FIELDS}
        self._buffered = 0

    # ---- reading --------------------------------------------------------------------------------------------
    def chunk_paths(self) -> list[Path]:
        return sorted(self.chunk_dir.glob("chunk-*.npz"))

    @staticmethod
    def read_chunk(path: Path) -> dict[str, np.ndarray] | None:
        """One chunk file's rows ``{field: array}`` (dtypes/shapes of :data:`FIELDS`), or None with a warning naming
        the file when it is unreadable or malformed."""
        try:
            with np.load(path, allow_pickle=False) as z:
                part = {k: z[k] for k in FIELDS}
            n = len(part["step"])
            for k, (dtype, shape) in FIELDS.items():
                if part[k].dtype != dtype or part[k].shape != (n, *shape):
                    raise ValueError(f"field {k} has {part[k].dtype} {part[k].shape}")
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            warnings.warn(f"episode store: skipping unreadable chunk {path} ({type(e).__name__}: {e})", stacklevel=3)
            return None
        return part

    def read_columns(self, names: tuple[str, ...], *, warn: bool = True) -> dict[str, np.ndarray]:
        """The 1-D columns ``names`` (e.g. ``("episode", "step")``) of every readable chunk, in file order, plus
        ``chunk`` (index into :meth:`chunk_paths`) and ``row`` (row inside that chunk), all ``(R,)`` — without
        decompressing any frame (``np.load`` of an ``.npz`` reads only the members asked for). A chunk that cannot
        be read, lacks frames, or whose columns disagree with :data:`FIELDS` is skipped, with a warning naming it
        when ``warn``.

        Returns:
            ``{name: array (R,)}`` with the dtypes of :data:`FIELDS`; ``chunk`` and ``row`` int64.
        """
        cols: dict[str, list[np.ndarray]] = {k: [] for k in (*names, "chunk", "row")}
        for c, path in enumerate(self.chunk_paths()):
            try:
                with np.load(path, allow_pickle=False) as f:
                    if "obs" not in f.files:
                        raise KeyError("obs")
                    part = {k: f[k] for k in names}
                n = len(part[names[0]]) if names else 0
                for k, arr in part.items():
                    if arr.dtype != FIELDS[k][0] or arr.shape != (n,):
                        raise ValueError(f"field {k} has {arr.dtype} {arr.shape}")
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
                if warn:
                    warnings.warn(f"episode store: skipping unreadable chunk {path} ({type(e).__name__}: {e})",
                                  stacklevel=2)
                continue
            for k, arr in part.items():
                cols[k].append(arr)
            cols["chunk"].append(np.full(n, c, np.int64))
            cols["row"].append(np.arange(n, dtype=np.int64))
        dtypes = {**{k: FIELDS[k][0] for k in names}, "chunk": np.dtype(np.int64), "row": np.dtype(np.int64)}
        return {k: np.concatenate(v) if v else np.zeros(0, dtypes[k]) for k, v in cols.items()}

    def load(self) -> dict[str, np.ndarray]:
        """All readable rows, sorted by ``(episode, step)``; unreadable chunks are skipped with a warning.

        Returns:
            ``{field: array}`` with the dtypes/shapes of :data:`FIELDS` and a common leading length.
        """
        parts = [part for part in map(self.read_chunk, self.chunk_paths()) if part is not None]
        if not parts:
            return {k: np.zeros((0, *shape), dtype) for k, (dtype, shape) in FIELDS.items()}
        data = {k: np.concatenate([p[k] for p in parts]) for k in FIELDS}
        order = np.lexsort((data["step"], data["episode"]))
        return {k: v[order] for k, v in data.items()}


def segments(episode: np.ndarray, step: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maximal runs of rows that are one episode with consecutive step indices.

    Args:
        episode, step: int64 ``(R,)`` sorted by ``(episode, step)`` as :meth:`EpisodeStore.load` returns them.
    Returns:
        ``(starts, lengths)`` int64 arrays; a lost chunk splits an episode into separate segments.
    """
    if len(step) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    brk = np.flatnonzero((episode[1:] != episode[:-1]) | (step[1:] != step[:-1] + 1)) + 1
    starts = np.concatenate([[0], brk]).astype(np.int64)
    lengths = np.diff(np.concatenate([starts, [len(step)]])).astype(np.int64)
    return starts, lengths


@dataclass
class SequenceBatch:
    """A ``(B, T)`` batch of windows, each inside one episode segment (never across a boundary).

    ``obs`` uint8 ``(B, T, 3, 64, 64)``; ``action`` int64 ``(B, T)`` (−1 = none: first frame);
    ``reward`` float32, ``terminated`` / ``truncated`` / ``is_first`` bool ``(B, T)``; ``index`` int64 ``(B, T)``
    row indices into the loaded store.
    """

    obs: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    is_first: np.ndarray
    index: np.ndarray


class SequenceSampler:
    """Seeded sampler of ``(B, T)`` windows that never cross an episode boundary (by construction).

    A window start is drawn uniformly among all positions whose ``T`` rows lie in one segment (see
    :func:`segments`), so every valid window is equally likely. ``state_dict``/``load_state_dict`` carry the RNG
    state for bit-exact resume.

    Args:
        data: rows from :meth:`EpisodeStore.load`.
        seq_len: ``T`` >= 1.
        seed: RNG seed.
    Raises:
        ValueError: ``seq_len`` < 1, or no segment holds ``seq_len`` rows.
    """

    def __init__(self, data: dict[str, np.ndarray], seq_len: int, seed: int = 0) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len: expected >= 1, got {seq_len}")
        self.data, self.seq_len = data, seq_len
        starts, lengths = segments(data["episode"], data["step"])
        n_windows = np.maximum(lengths - seq_len + 1, 0)
        keep = n_windows > 0
        if not keep.any():
            longest = int(lengths.max()) if len(lengths) else 0
            raise ValueError(f"seq_len: expected <= the longest episode segment ({longest} rows), got {seq_len}")
        self._starts, self._cum = starts[keep], np.cumsum(n_windows[keep])
        self.rng = np.random.default_rng(seed)

    @property
    def num_windows(self) -> int:
        return int(self._cum[-1])

    def all_window_starts(self) -> np.ndarray:
        """The first row of every valid window, int64 ``(num_windows,)``, in row order (window ``k`` of
        :meth:`window_starts`'s uniform draw is entry ``k``)."""
        n = np.diff(np.concatenate([[0], self._cum]))
        return np.repeat(self._starts, n) + (np.arange(self.num_windows) - np.repeat(self._cum - n, n))

    def window_starts(self, batch_size: int) -> np.ndarray:
        """Row index of the first row of ``batch_size`` uniformly drawn windows, int64 ``(B,)``."""
        k = self.rng.integers(0, self.num_windows, size=batch_size)
        seg = np.searchsorted(self._cum, k, side="right")
        offset = k - np.concatenate([[0], self._cum])[seg]
        return self._starts[seg] + offset

    def sample(self, batch_size: int) -> SequenceBatch:
        """Draw a :class:`SequenceBatch` of ``batch_size`` windows of ``seq_len`` rows."""
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        idx = self.window_starts(batch_size)[:, None] + np.arange(self.seq_len)[None]
        d = self.data
        return SequenceBatch(obs=d["obs"][idx], action=d["action"][idx], reward=d["reward"][idx],
                             terminated=d["terminated"][idx], truncated=d["truncated"][idx],
                             is_first=d["step"][idx] == 0, index=idx)

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]


HELDOUT_EVERY = 10


def heldout_mask(episode: np.ndarray, every: int = HELDOUT_EVERY) -> np.ndarray:
    """Rows of held-out episodes: episode ids ``≡ every−1 (mod every)``, i.e. every ``every``-th episode.

    The split is a pure function of the episode id, so every stage (pretraining, distillation, the fidelity
    evaluator) holds out the same episodes of a store, spread evenly over the collection run.

    Args:
        episode: int64 ``(R,)`` episode ids.
    Returns:
        bool ``(R,)``, True for rows of held-out episodes.
    """
    return np.asarray(episode) % every == every - 1


def select_rows(data: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    """The rows of ``data`` (as from :meth:`EpisodeStore.load`) where ``mask`` is True."""
    return {k: v[mask] for k, v in data.items()}


def context_rows(episode: np.ndarray, step: np.ndarray, k: int, m: int, seed: int = 0) -> np.ndarray:
    """Rows of ``m`` uniformly drawn windows of ``k`` consecutive frames inside one episode each.

    Args:
        episode, step: int ``(R,)`` of the rows, in any row order.
    Returns:
        int64 ``(m, k)`` indices into the given rows, each window in step order.
    Raises:
        ValueError: no episode segment holds ``k`` rows.
    """
    order = np.lexsort((step, episode))
    sampler = SequenceSampler({"episode": episode[order], "step": step[order]}, k, seed=seed)
    return order[sampler.window_starts(m)[:, None] + np.arange(k)[None]]


def sample_contexts(z: np.ndarray, action: np.ndarray, episode: np.ndarray, step: np.ndarray, k: int, m: int,
                    num_actions: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``m`` real start contexts of ``k`` consecutive frames (inside one episode each) for a bundle.

    Args:
        z: float ``(R, d_z)`` latents; action, episode, step: ``(R,)`` in any row order.
        num_actions: the null action index that replaces −1 (no previous action).
    Returns:
        ``(start_z float32 (m, k, d_z), start_a int64 (m, k))``.
    Raises:
        ValueError: no episode segment holds ``k`` rows.
    """
    idx = context_rows(episode, step, k, m, seed)
    a = action[idx]
    return z[idx].astype(np.float32), np.where(a < 0, num_actions, a).astype(np.int64)
