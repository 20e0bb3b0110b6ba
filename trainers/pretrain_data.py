"""The training rows of ``ditwm pretrain``: one episode store (``--data``) or several (``--extra-data``), and the
biased part of each batch (``--event-fraction``, ``--return-fraction``, ``--recent-fraction``).

Several stores train as one, without copying them: each keeps its own latent cache (:mod:`trainers.latents`), so a
small store appended in every round of a DIAMOND-style alternation (``ditwm iterate``) is the only one encoded, and
its episode ids are shifted as :func:`trainers.merge.merge_stores` shifts them (by multiples of
``HELDOUT_EVERY``, so every store keeps its held-out episodes). ``--recent-fraction`` draws that share of each
batch from the windows of the last store: the current policy's play, which DIAMOND (Alonso et al. 2024) keeps the
world model fitted to by training it between short collections.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from trainers.common import ArgError
from trainers.data import EpisodeStore
from trainers.latents import LatentDataset, load_latents_on_ranks, store_index
from trainers.merge import SAME, next_offset
from trainers.pong_objects import agent_return_rows, store_ball_columns
from trainers.priority import event_probabilities, flag_probabilities


def check_stores(data: str, extra: list[str]) -> dict:
    """The ``meta.json`` of ``data`` after checking that every ``extra`` store is an episode store of the same
    game, action set, protocol and format (the fields :func:`trainers.merge.merge_stores` requires equal).

    Raises:
        ArgError: ``data`` or an ``extra`` store that is not a store, or whose game / action meanings / protocol /
            format version differ.
    """
    metas = []
    for name, path in (("data", data), *(("extra_data", p) for p in extra)):
        try:
            metas.append(EpisodeStore(path).read_meta())
        except (FileNotFoundError, ValueError) as e:
            raise ArgError(name, f"expected an episode store, got {e}") from None
        if "action_meanings" not in metas[-1] or "game" not in metas[-1]:
            raise ArgError(name, f"expected game and action_meanings in {path}/meta.json, got {sorted(metas[-1])}")
    for path, m in zip(extra, metas[1:]):
        for key in SAME:
            if m.get(key) != metas[0].get(key):
                raise ArgError("extra_data", f"expected {key} {metas[0].get(key)!r} (as in --data {data}), got "
                                             f"{m.get(key)!r} in {path}")
    return metas[0]


def _shifted(episodes: list[np.ndarray]) -> list[np.ndarray]:
    """Each store's episode ids int64 ``(R_i,)``, shifted past all earlier stores' ids
    (:func:`trainers.merge.next_offset`)."""
    out, offset = [], 0
    for ep in episodes:
        out.append(ep + offset)
        offset = next_offset(offset, int(ep.max()) if len(ep) else -1)
    return out


def stores_index(stores: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(episode, step)`` int64 ``(R,)``, ``reward`` float32 ``(R,)`` and ``source`` int64 ``(R,)`` (index into
    ``stores``) of every readable row of the stores, in order, episode ids shifted (module docstring); sorted by
    ``(episode, step)`` since each store is and the shifts grow."""
    index = [store_index(path) for path in stores]
    sources = [np.full(len(step), i, np.int64) for i, (_, step, _) in enumerate(index)]
    episode = _shifted([ep for ep, _, _ in index])
    return (np.concatenate(episode), np.concatenate([s for _, s, _ in index]), np.concatenate([r for _, _, r in index]),
            np.concatenate(sources))


def load_stores(d, stores: list[str], autoencoder: torch.nn.Module, encoder_sha256: str, out: Path,
                tag: str) -> tuple[LatentDataset, np.ndarray]:
    """Every store's latents (:func:`trainers.latents.load_latents_on_ranks`, one cache per store) as one dataset
    with the episode ids of :func:`stores_index`, and its ``source`` int64 ``(R,)``."""
    parts = [load_latents_on_ranks(d, path, autoencoder, encoder_sha256, out, tag) for path in stores]
    for ds, episode in zip(parts, _shifted([ds.episode for ds in parts])):
        ds.episode = episode
    sources = [np.full(len(ds), i, np.int64) for i, ds in enumerate(parts)]
    if len(parts) == 1:
        return parts[0], sources[0]
    cols = {k: np.concatenate([getattr(p, k) for p in parts]) for k in ("z", "episode", "step", "action", "reward",
                                                                        "terminated")}
    return LatentDataset(**cols, encoder_sha256=encoder_sha256, path=parts[0].path), np.concatenate(sources)


def return_rows(stores: list[str], episode: np.ndarray, train: np.ndarray) -> np.ndarray:
    """bool ``(R,)``: the rows of :func:`stores_index` (``episode`` int64 ``(R,)``, ``train`` bool ``(R,)``) where
    the agent's paddle returns the ball, located in the stores' frames (one chunk in memory at a time).

    Raises:
        ArgError: the frames disagree with ``episode`` (a store changed meanwhile), or no return in a training row.
    """
    flags, eps = [], []
    for path in stores:
        ep, col = store_ball_columns(EpisodeStore(path))
        flags.append(agent_return_rows(col, ep))
        eps.append(ep)
    eps = _shifted(eps)
    if not np.array_equal(np.concatenate(eps), episode):
        raise ArgError("data", f"expected readable frames for all {len(episode)} rows of {', '.join(stores)}, got "
                               f"{sum(map(len, eps))}")
    returns = np.concatenate(flags)
    if not returns[train].any():
        raise ArgError("return_fraction", f"expected returns of the ball by the agent's paddle in the training "
                                          f"episodes, found none in {int(train.sum())} rows")
    return returns


def biased_draw(args, train: LatentDataset, starts: np.ndarray, *, first_target: int, length: int,
                train_mask: np.ndarray, returns: np.ndarray | None, recent: np.ndarray | None
                ) -> tuple[np.ndarray, float]:
    """The biased part of each batch: ``(probs float64 (N,), fraction)`` over the window ``starts`` int64 ``(N,)``
    of ``train``, mixing in proportion to their fractions the reward-event draw (``args.event_fraction``), the
    return draw (``args.return_fraction``; ``returns`` bool ``(R,)`` over all rows) and the recent-store draw
    (``args.recent_fraction``; ``recent`` bool ``(R,)``: rows of the last store, uniform over its windows).

    Raises:
        ArgError: no reward event, return or recent row within reach of a training window (names the flag).
    """
    kw = dict(first_target=first_target, length=length, horizon=args.event_horizon)
    parts = []
    if args.event_fraction:
        try:
            parts.append((args.event_fraction, event_probabilities(train.reward, train.episode, starts, **kw)))
        except ValueError as e:  # validate() saw events; here none is within reach of a window
            raise ArgError("event_fraction", f"expected reward events within reach of a window, got: {e}") from None
    for name, flags in (("return_fraction", returns), ("recent_fraction", recent)):
        if not getattr(args, name):
            continue
        if len(flags) != len(train_mask):
            raise ArgError("data", f"expected the stores' rows to match their latents ({len(train_mask)} rows), "
                                   f"got {len(flags)}: was a store changed meanwhile?")
        if name == "recent_fraction":
            p = flags[train_mask][starts].astype(np.float64)  # a window lies in its start's episode: one store
            if not p.any():
                raise ArgError(name, "expected a training window in the last --extra-data store, got none")
            parts.append((args.recent_fraction, p / p.sum()))
            continue
        try:
            parts.append((args.return_fraction, flag_probabilities(flags[train_mask], train.episode, starts,
                                                                   name="returns", **kw)))
        except ValueError as e:  # return_rows() saw returns; here none is within reach of a window
            raise ArgError(name, f"expected returns of the ball within reach of a window, got: {e}") from None
    fraction = sum(f for f, _ in parts)
    return sum(f * p for f, p in parts) / fraction, min(1.0, fraction)  # validate() allowed a rounding excess
