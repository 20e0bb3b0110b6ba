"""Imagination start contexts drawn from an episode store (DIAMOND's starts from the replay buffer).

A bundle ships a few hundred real start contexts (``ditwm pretrain --start-contexts``, default 256) drawn from its
pretraining data. An agent trained in imagination with short episodes (``ditwm train-agent --episode-steps 15``,
DreamerV3's and DIAMOND's 15-step imagination from real states, Hafner et al. 2023; Alonso et al. 2024) starts
every rollout from one of them, so it should start from many, and from the states its own play reaches: DIAMOND
samples them from the replay buffer the current policy fills. :func:`draw_start_contexts` draws ``M`` windows of
``K`` consecutive frames uniformly from a store (e.g. ``ditwm collect --agent policy`` output, or a merged store)
and encodes them with the world model's frozen encoder.

Memory: one chunk of frames at a time plus the ``M·K`` drawn frames (4 096 × 4 frames: 200 MB of uint8).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from trainers.data import EpisodeStore, context_rows

ENCODE_BATCH = 1024


def store_rows(store_dir: str | Path) -> int:
    """Number of readable rows of an episode store (columns only, no frame decompressed) — what a resumed
    ``train-agent --start-data`` compares to notice a store that changed since the run began."""
    return len(EpisodeStore(store_dir).read_columns(("step",), warn=False)["step"])


@torch.no_grad()
def draw_start_contexts(store_dir: str | Path, encoder, *, k: int, m: int, num_actions: int, seed: int = 0,
                        device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``m`` real contexts of ``k`` consecutive frames (inside one episode each) from a store and encode them.

    Windows are drawn uniformly over all valid windows of the store (with replacement), as
    :func:`trainers.data.sample_contexts` draws a bundle's, from every episode: unlike a bundle's contexts, which
    come from training episodes only, these may include the store's held-out episodes (they start imagined
    rollouts; nothing is evaluated on them).

    Args:
        store_dir: an episode store (``meta.json`` + ``chunks/``).
        encoder: module with ``encode(uint8 (N, 3, 64, 64)) -> float (N, d_z)`` — the world model's own frozen
            encoder (a bundle's model), so the latents match what its dynamics were trained on.
        k: context length ``K`` of the world model; m: number of contexts ``M``; num_actions: the null action
            index that replaces −1 (no previous action: the first frame of an episode).
        seed: seed of the draw.
        device: where the encoder runs and the results live.
    Returns:
        ``(z float32 (m, k, d_z), prev_action int64 (m, k))`` — the arguments of
        ``DiTWMVectorEnv(start_contexts=...)``.
    Raises:
        ValueError: ``k`` or ``m`` < 1, a store with no readable row (names the directory), no episode segment
            with ``k`` rows, or a chunk whose frames cannot be decompressed although its other columns could
            (names the chunk).
    """
    for name, v in (("k", k), ("m", m)):
        if v < 1:
            raise ValueError(f"{name}: expected >= 1, got {v}")
    store = EpisodeStore(store_dir)
    paths = store.chunk_paths()
    cols = store.read_columns(("episode", "step", "action"))  # warns about every chunk it skips
    episode, step, action, chunk, row = (cols[k] for k in ("episode", "step", "action", "chunk", "row"))
    if not len(episode):
        raise ValueError(f"store_dir: expected an episode store with readable chunks, got {str(store_dir)!r}")
    try:
        idx = context_rows(episode, step, k, m, seed).reshape(-1)  # (m·k,) into the readable rows
    except ValueError as e:
        raise ValueError(f"k: {e.args[0].split(': ', 1)[1]} in {str(store_dir)!r}") from None
    frames = np.zeros((len(idx), 3, 64, 64), np.uint8)
    for c in np.unique(chunk[idx]):
        part = EpisodeStore.read_chunk(paths[c])
        if part is None:  # its frames (or a column the index pass did not read) are corrupt
            raise ValueError(f"store_dir: expected readable frames in chunk {paths[c]}, got an unreadable chunk")
        sel = np.flatnonzero(chunk[idx] == c)
        frames[sel] = part["obs"][row[idx[sel]]]
    z = torch.cat([encoder.encode(torch.from_numpy(frames[i:i + ENCODE_BATCH]).to(device)).float()
                   for i in range(0, len(frames), ENCODE_BATCH)])
    a = action[idx]
    prev = torch.as_tensor(np.where(a < 0, num_actions, a), device=device).reshape(m, k)
    return z.reshape(m, k, -1), prev
