"""Latent dataset: every frame of an episode store encoded once with the frozen stage-1 encoder.

Stage 2 trains on latents, never on pixels, so the store's frames are encoded once and cached beside the store:

```
STORE/latents/<sha256(autoencoder.safetensors)[:12]>.safetensors
    z           float16 (R, d_z)   frozen-encoder latents (the encoder ends in tanh: |z| < 1, float16 keeps ~3e-4)
    episode     int64   (R,)       rows in (episode, step) order, as EpisodeStore.load returns them
    step        int64   (R,)
    action      int64   (R,)       action that LED to the row's frame (−1: first frame of an episode)
    reward      float32 (R,)       reward / termination of the transition into the row (trainers.data convention)
    terminated  bool    (R,)
  metadata: format_version, encoder_sha256 (full hex digest), store_fingerprint, rows
```

The file is written atomically (:func:`dit_envs.io.atomic_save_tensors`) and reused when its ``encoder_sha256``
and ``store_fingerprint`` (sha256 over the names and bytes of the store's chunk files) match; a store that grew
(``ditwm collect --resume``) or a different encoder invalidates it. Chunks are read and encoded one at a time,
so memory holds one chunk of frames, not the whole store.
"""
from __future__ import annotations

import hashlib
import sys
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from tqdm import tqdm

from dit_envs.io import atomic_save_tensors, load_tensors, sha256_file
from trainers.data import FIELDS, EpisodeStore, SequenceSampler
from trainers.pretrain_objective import Windows

FORMAT_VERSION = "1"
COLUMNS = ("episode", "step", "action", "reward", "terminated")


@dataclass
class LatentDataset:
    """Encoded rows of a store, sorted by ``(episode, step)``.

    Attributes:
        z: float16 ``(R, d_z)``.
        episode, step, action: int64 ``(R,)`` (action −1 = first frame).
        reward: float32 ``(R,)``; terminated: bool ``(R,)``.
        encoder_sha256: hex sha256 of the ``autoencoder.safetensors`` that produced ``z``.
        path: the cache file.
    """

    z: np.ndarray
    episode: np.ndarray
    step: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    terminated: np.ndarray
    encoder_sha256: str
    path: Path

    def __len__(self) -> int:
        return len(self.step)

    def select(self, mask: np.ndarray) -> "LatentDataset":
        """The rows where bool ``mask (R,)`` is True (order kept)."""
        cols = {k: getattr(self, k)[mask] for k in ("z", *COLUMNS)}
        return LatentDataset(**cols, encoder_sha256=self.encoder_sha256, path=self.path)


def store_fingerprint(store_dir: str | Path) -> str:
    """sha256 over the sorted chunk file names and each chunk's sha256 (changes whenever a chunk does)."""
    h = hashlib.sha256()
    for path in EpisodeStore(store_dir).chunk_paths():
        h.update(path.name.encode() + b"\0" + sha256_file(path).encode() + b"\n")
    return h.hexdigest()


def latent_path(store_dir: str | Path, encoder_sha256: str) -> Path:
    """``STORE/latents/<encoder_sha256[:12]>.safetensors``."""
    return Path(store_dir) / "latents" / f"{encoder_sha256[:12]}.safetensors"


def _read_chunk(path: Path) -> dict[str, np.ndarray] | None:
    """One store chunk's fields, or None (with a warning) when unreadable — as :meth:`EpisodeStore.load`."""
    try:
        with np.load(path, allow_pickle=False) as f:
            part = {k: f[k] for k in ("obs", *COLUMNS)}
        n = len(part["step"])
        for k, arr in part.items():
            dtype, shape = FIELDS[k]
            if arr.dtype != dtype or arr.shape != (n, *shape):
                raise ValueError(f"field {k} has {arr.dtype} {arr.shape}")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        warnings.warn(f"episode store: skipping unreadable chunk {path} ({type(e).__name__}: {e})", stacklevel=3)
        return None
    return part


def store_index(store_dir: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(episode, step)`` int64 ``(R,)`` and ``reward`` float32 ``(R,)`` of every readable row, sorted — without
    decompressing any frame (:meth:`EpisodeStore.read_columns`). Unreadable chunks are skipped silently
    (:func:`encode_store` warns about them)."""
    c = EpisodeStore(store_dir).read_columns(("episode", "step", "reward"), warn=False)
    order = np.lexsort((c["step"], c["episode"]))
    return c["episode"][order], c["step"][order], c["reward"][order]


def _metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # unreadable or truncated: treat as absent, it is rebuilt
        return {}


@torch.no_grad()
def encode_store(store_dir: str | Path, autoencoder: torch.nn.Module, *, batch: int = 512,
                 progress: bool | None = None) -> dict[str, np.ndarray]:
    """Encode every readable row of a store, chunk by chunk.

    Args:
        store_dir: the episode store.
        autoencoder: anything with ``encode(uint8 (N, 3, 64, 64)) -> float (N, d_z)``; its device is that of its
            first parameter.
        batch: frames per encoder call.
        progress: show a tqdm bar (None: when stderr is a terminal).
    Returns:
        ``{"z": float16 (R, d_z), "episode", "step", "action", "reward", "terminated": (R,)}`` sorted by
        ``(episode, step)``.
    Raises:
        ValueError: the store holds no readable row (names the store).
    """
    paths = EpisodeStore(store_dir).chunk_paths()
    device = next(autoencoder.parameters()).device
    parts: list[dict[str, np.ndarray]] = []
    bar = tqdm(total=len(paths), unit="chunk", desc="encode latents",
               disable=not (sys.stderr.isatty() if progress is None else progress))
    for path in paths:
        part = _read_chunk(path)
        bar.update(1)
        if part is None:
            continue
        obs = part.pop("obs")
        zs = [autoencoder.encode(torch.from_numpy(obs[i:i + batch]).to(device)).float().cpu()
              for i in range(0, len(obs), batch)]
        part["z"] = torch.cat(zs).to(torch.float16).numpy() if zs else np.zeros((0, 0), np.float16)
        parts.append(part)
    bar.close()
    parts = [p for p in parts if len(p["step"])]
    if not parts:
        raise ValueError(f"data: expected an episode store with readable rows in {store_dir}, got none")
    data = {k: np.concatenate([p[k] for p in parts]) for k in ("z", *COLUMNS)}
    order = np.lexsort((data["step"], data["episode"]))
    return {k: v[order] for k, v in data.items()}


def load_or_encode(store_dir: str | Path, autoencoder: torch.nn.Module, encoder_sha256: str, *,
                   batch: int = 512, progress: bool | None = None) -> tuple[LatentDataset, bool]:
    """The latent dataset of ``store_dir`` for this encoder: reused from the cache file, or encoded and saved.

    Args:
        store_dir: the episode store (``meta.json`` + ``chunks/``).
        autoencoder: the frozen encoder (see :func:`encode_store`).
        encoder_sha256: sha256 hex of the weights file it was loaded from (names the cache file).
        batch, progress: as in :func:`encode_store`.
    Returns:
        ``(dataset, reused)``: ``reused`` is True when the cache file matched and nothing was encoded.
    Raises:
        ValueError: the store holds no readable row.
        OSError: the store directory is not writable.
    """
    path = latent_path(store_dir, encoder_sha256)
    fingerprint = store_fingerprint(store_dir)
    meta = _metadata(path) if path.is_file() else {}
    reused = (meta.get("format_version") == FORMAT_VERSION and meta.get("encoder_sha256") == encoder_sha256
              and meta.get("store_fingerprint") == fingerprint)
    data: dict[str, np.ndarray] = {}
    if reused:
        try:
            data = {k: v.numpy() for k, v in load_tensors(path).items()}
        except ValueError:  # unreadable despite a readable header: rebuild
            data = {}
        reused = all(k in data for k in ("z", *COLUMNS))
    if not reused:
        data = encode_store(store_dir, autoencoder, batch=batch, progress=progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_tensors(path, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in data.items()},
                            metadata={"format_version": FORMAT_VERSION, "encoder_sha256": encoder_sha256,
                                      "store_fingerprint": fingerprint, "rows": str(len(data["step"]))})
    return LatentDataset(**{k: data[k] for k in ("z", *COLUMNS)}, encoder_sha256=encoder_sha256, path=path), reused


class LatentWindows:
    """Seeded sampler of :class:`Windows` of ``length`` rows (never across an episode
    boundary) from a :class:`LatentDataset`, with the columns held on ``device`` once.

    Args:
        ds: the rows to sample from (e.g. the training episodes), sorted by ``(episode, step)``.
        length: ``L`` rows per window.
        mean, std: float32 ``(d_z,)`` standardisation of the DiT's latents.
        num_actions: the null action index replacing −1.
        seed: seed of the window draw; a ``(seed, rank)`` list gives each DDP rank its own stream.
        device: where batches are built.
    Raises:
        ValueError: no episode segment holds ``length`` rows (message gives the longest).
    """

    def __init__(self, ds: LatentDataset, length: int, *, mean: torch.Tensor, std: torch.Tensor, num_actions: int,
                 seed: int | list[int], device: torch.device) -> None:
        self.sampler = SequenceSampler({"episode": ds.episode, "step": ds.step}, length)
        self.sampler.rng = np.random.default_rng(seed)
        self.length, self.device = length, device
        self.mean, self.std = mean.to(device).float(), std.to(device).float()
        self.z = torch.from_numpy(ds.z).to(device)  # float16 (R, d_z): half the memory of float32
        self.prev_action = torch.from_numpy(np.where(ds.action < 0, num_actions, ds.action)).to(device)
        self.reward = torch.from_numpy(ds.reward).to(device)
        self.terminated = torch.from_numpy(ds.terminated).to(device)
        self.episode = torch.from_numpy(ds.episode).to(device)
        self.step = torch.from_numpy(ds.step).to(device)
        self.priority: np.ndarray | None = None  # float64 (num_windows,) from set_priorities, or uniform draws
        self.priority_fraction = 0.0

    def windows(self, starts: np.ndarray) -> Windows:
        """Windows starting at the given row indices int64 ``(B,)``."""
        idx = torch.from_numpy(starts[:, None] + np.arange(self.length)[None]).to(self.device)  # (B, L)
        z = self.z[idx].float()  # (B, L, d_z)
        return Windows(x=(z - self.mean) / self.std, z=z, prev_action=self.prev_action[idx],
                       reward=self.reward[idx], terminated=self.terminated[idx])

    def history(self, starts: np.ndarray, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ``length`` rows before each window start (a streaming student's history, oldest first).

        Args:
            starts: int64 ``(B,)`` window starts. length: ``H ≥ 0`` rows.
        Returns:
            ``(x float32 (B, H, d_z) standardised, prev_action int64 (B, H), valid bool (B, H))``; ``valid`` is
            False for rows before the start of the window's episode segment (another episode, or a gap in its
            steps such as a lost chunk: the sampler's segments); their ``x``/``prev_action`` are padding.
        """
        s = torch.from_numpy(starts).to(self.device)
        idx = s[:, None] - length + torch.arange(length, device=self.device)[None]  # (B, H)
        safe = idx.clamp(min=0)
        back = s[:, None] - idx  # (B, H) rows back from the start
        valid = (idx >= 0) & (self.episode[safe] == self.episode[s][:, None]) & (
            self.step[safe] == self.step[s][:, None] - back)
        valid = valid.flip(1).cummin(1).values.flip(1)  # nothing before an invalid row (a gap) either
        x = (self.z[safe].float() - self.mean) / self.std
        return x, self.prev_action[safe], valid

    def sample(self, batch: int) -> Windows:
        """``batch`` drawn windows (advances the sampler's RNG): uniformly, or with :meth:`set_priorities` a
        fraction of them in proportion to the priorities (:mod:`trainers.priority`)."""
        return self.windows(self.draw_starts(batch))

    def draw_starts(self, batch: int) -> np.ndarray:
        """Row index of the first row of ``batch`` drawn windows, int64 ``(B,)``; the first
        ``round(fraction·batch)`` are the prioritised draws."""
        n = int(round(self.priority_fraction * batch)) if self.priority is not None else 0
        uniform = self.sampler.window_starts(batch - n)
        if n == 0:
            return uniform
        k = np.searchsorted(self._cdf, self.sampler.rng.random(n) * self._cdf[-1], side="right")
        return np.concatenate([self._all[np.minimum(k, len(self._cdf) - 1)], uniform])

    def set_priorities(self, probs: np.ndarray | None, fraction: float) -> None:
        """Draw ``fraction`` of every batch with probabilities ``probs`` float ``(num_windows,)`` over
        :meth:`SequenceSampler.all_window_starts` (None: uniform only).

        Raises:
            ValueError: ``probs`` of another length, negative or summing to 0; ``fraction`` outside ``[0, 1]``.
        """
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction: expected a number in [0, 1], got {fraction}")
        if probs is not None:
            probs = np.asarray(probs, np.float64)
            if probs.shape != (self.sampler.num_windows,) or (probs < 0).any() or not probs.sum() > 0:
                raise ValueError(f"probs: expected {self.sampler.num_windows} non-negative numbers with a positive "
                                 f"sum, got shape {probs.shape}")
            self._cdf, self._all = np.cumsum(probs), self.sampler.all_window_starts()
        self.priority, self.priority_fraction = probs, fraction

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


def load_latents_on_ranks(d, store_dir: str | Path, autoencoder: torch.nn.Module, encoder_sha256: str,
                          out: Path, tag: str) -> LatentDataset:
    """:func:`load_or_encode` for a (possibly distributed) training run: rank 0 creates ``out``, encodes or reuses
    the cache and prints ``"<tag>: latents <file> (reused|encoded, N rows)"``; the other ranks wait at a barrier
    (:func:`trainers.distributed.barrier`, ``d`` a :class:`trainers.distributed.Dist`) and then read the cache."""
    from trainers.distributed import barrier

    ds = None
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        ds, reused = load_or_encode(store_dir, autoencoder, encoder_sha256)
        print(f"{tag}: latents {ds.path} ({'reused' if reused else 'encoded'}, {len(ds)} rows)")
    barrier(d)
    if ds is None:
        ds, _ = load_or_encode(store_dir, autoencoder, encoder_sha256, progress=False)
    return ds
