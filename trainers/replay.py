"""In-memory replay of latent transitions for the stage-1 Dreamer loop (row convention of :mod:`trainers.data`).

Rows are appended in collection order (parallel envs interleaved). Windows are drawn through a ``(episode,
step)``-sorted view with :class:`trainers.data.SequenceSampler`, so they never cross an episode boundary.
"""
from __future__ import annotations

import numpy as np
import torch

from trainers.data import SequenceSampler

_FIELDS = {"action": np.int64, "reward": np.float32, "terminated": np.bool_, "episode": np.int64, "step": np.int64}


class Replay:
    """Growing arrays ``z (R, d_z)`` float32, ``action, reward, terminated, episode, step (R,)``.

    Latents may be added later (:meth:`set_latents`) for rows collected before the autoencoder was trained.
    """

    def __init__(self, latent_dim: int) -> None:
        self.latent_dim = latent_dim
        self.size = 0
        self._cap = 1024
        self.z = np.zeros((self._cap, latent_dim), np.float32)
        self.cols = {k: np.zeros(self._cap, t) for k, t in _FIELDS.items()}

    def _grow(self, need: int) -> None:
        while self._cap < need:
            self._cap *= 2
        self.z = np.resize(self.z, (self._cap, self.latent_dim))
        self.cols = {k: np.resize(v, self._cap) for k, v in self.cols.items()}

    def add(self, z: np.ndarray | None, action, reward, terminated, episode, step) -> np.ndarray:
        """Append ``n`` rows (``z (n, d_z)`` or None); returns their row indices int64 ``(n,)``."""
        n = len(step)
        self._grow(self.size + n)
        rows = np.arange(self.size, self.size + n)
        if z is not None:
            self.z[rows] = z
        for k, v in zip(_FIELDS, (action, reward, terminated, episode, step)):
            self.cols[k][rows] = v
        self.size += n
        return rows

    def set_latents(self, z: np.ndarray) -> None:
        """Set the latents of all ``R`` rows at once: float32 ``(R, d_z)``."""
        if z.shape != (self.size, self.latent_dim):
            raise ValueError(f"z: expected shape {(self.size, self.latent_dim)}, got {z.shape}")
        self.z[: self.size] = z

    def lookup(self, episode: np.ndarray, step: np.ndarray) -> np.ndarray:
        """For every replay row, its index in arrays sorted by ``(episode, step)`` (e.g. the store's rows).

        Raises:
            KeyError: a replay row missing from ``(episode, step)``.
        """
        key = episode.astype(np.int64) * (1 << 32) + step
        mine = self.cols["episode"][: self.size] * (1 << 32) + self.cols["step"][: self.size]
        pos = np.searchsorted(key, mine)
        if (pos >= len(key)).any() or (key[np.minimum(pos, len(key) - 1)] != mine).any():
            raise KeyError("replay rows missing from the episode store")
        return pos

    def sample(self, rng: np.random.Generator, batch: int, seq_len: int) -> np.ndarray:
        """Row indices int64 ``(batch, seq_len)`` of windows inside one episode each, drawn with ``rng``."""
        ep, st = self.cols["episode"][: self.size], self.cols["step"][: self.size]
        order = np.lexsort((st, ep))
        sampler = SequenceSampler({"episode": ep[order], "step": st[order]}, seq_len)
        sampler.rng = rng
        starts = sampler.window_starts(batch)
        return order[starts[:, None] + np.arange(seq_len)[None]]

    def batch(self, idx: np.ndarray, num_actions: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Training batch ``(B, T)`` for :meth:`RSSM.loss_with_posts` (action −1 → the null index)."""
        a = self.cols["action"][idx]
        return {"z": torch.as_tensor(self.z[idx], device=device),
                "action": torch.as_tensor(np.where(a < 0, num_actions, a), device=device),
                "reward": torch.as_tensor(self.cols["reward"][idx], device=device),
                "terminated": torch.as_tensor(self.cols["terminated"][idx], device=device),
                "is_first": torch.as_tensor(self.cols["step"][idx] == 0, device=device)}

    def tensors(self) -> dict[str, torch.Tensor]:
        """The filled rows as ``replay.*`` tensors for a checkpoint."""
        out = {"replay.z": torch.from_numpy(self.z[: self.size].copy())}
        out.update({f"replay.{k}": torch.from_numpy(v[: self.size].copy()) for k, v in self.cols.items()})
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`tensors`."""
        n = tensors["replay.step"].shape[0]
        self.size = 0
        self._grow(n)
        self.z[:n] = tensors["replay.z"].cpu().numpy()
        for k in _FIELDS:
            self.cols[k][:n] = tensors[f"replay.{k}"].cpu().numpy()
        self.size = n
