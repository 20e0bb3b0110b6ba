"""Does the world model let the agent's paddle return the Pong ball? Open-loop bounce recall on real events.

For every frame of an episode store where the real ball turns round at the agent's paddle (a return,
:func:`trainers.pong_objects.ball_reversals`), the world model starts from the real context ending ``--lead``
steps before it, imagines ``--lead + 3`` steps with the real actions, and we check whether its ball turns round at
the agent's side too (*return recall*). The same is done from contexts before real misses (the ball past the
paddle's column moving right), where a bounce is wrong (*false-return rate*). Both are split into training and
held-out episodes (:func:`trainers.data.heldout_mask`). Both are also given for the real future frames passed through
the frozen autoencoder: the ceiling a perfect dynamics model would reach through this decoder and ball detector.

An agent trained in imagination can only learn to return the ball if the world model bounces it where the real
game does: the return recall is the number to watch when imagination-trained Pong agents do not transfer.

Run::

    python examples/ball_returns.py --data artifacts/pong-stage1-100k                 # the bundled DiTWM/Pong-v0
    python examples/ball_returns.py --data artifacts/pong-stage1-100k --world-model runs/dit/bundle
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout without install

from dit_envs.bundle import load_bundle  # noqa: E402
from dit_envs.envs.loading import set_temperature  # noqa: E402
from registry import get, resolve  # noqa: E402
from trainers.data import EpisodeStore, heldout_mask  # noqa: E402
from trainers.pong_objects import agent_return_rows, ball_columns, ball_reversals, locate_pong_objects  # noqa: E402

MISS_COL = 57.0  # a ball at or past this column, moving right, has passed the agent's paddle (column ~56)


def find_events(ball_col: np.ndarray, episode: np.ndarray, *, context_len: int, lead: int,
                tail: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Rows of real agent-side returns and of misses with room for a context before and ``tail`` frames after.

    Args:
        ball_col: float ``(R,)`` ball column per row (rows sorted by episode, then step); episode: int ``(R,)``.
        context_len: ``K``. lead: steps between the context's last row and the event.
    Returns:
        ``(returns, misses)`` int64 row indices of the apex / of the first frame past ``MISS_COL``.
    """
    R = len(ball_col)
    first = lead + context_len - 1
    rows = np.arange(first, R - tail)
    ok = episode[rows - first] == episode[rows + tail]  # the context and the tail in one episode
    agent = agent_return_rows(ball_col, episode)
    prev = np.concatenate([[np.nan], ball_col[:-1]])
    with np.errstate(invalid="ignore"):
        miss = (ball_col >= MISS_COL) & (ball_col > prev) & ~(prev >= MISS_COL)
    return rows[ok & agent[rows]], rows[ok & miss[rows]]


@torch.no_grad()
def bounce_rate(model, frames: np.ndarray, actions: np.ndarray, ball_col: np.ndarray, events: np.ndarray, *,
                lead: int, tail: int = 3, seed: int = 0, batch: int = 256) -> float:
    """Fraction of ``events`` after which the imagined ball turns round at the agent's side.

    Args:
        model: a world model (``encode``, ``initial_state``, ``step``, ``decode``; ``context_len``, ``num_actions``).
        frames: uint8 ``(R, 3, 64, 64)``; actions: int64 ``(R,)`` (−1: none); ball_col: float ``(R,)``.
        events: int64 ``(E,)`` event rows from :func:`find_events`.
    Returns:
        The fraction in ``[0, 1]`` (NaN without events).
    """
    if len(events) == 0:
        return float("nan")
    K, null = model.context_len, model.num_actions
    gen = torch.Generator(device=model.device).manual_seed(seed)
    hits = 0
    for i in range(0, len(events), batch):
        end = events[i:i + batch] - lead  # (B,) last context row
        ctx = end[:, None] + np.arange(-K + 1, 1)[None]  # (B, K)
        z = model.encode(torch.from_numpy(frames[ctx.reshape(-1)])).reshape(len(end), K, -1)
        a = torch.from_numpy(np.where(actions[ctx] < 0, null, actions[ctx]))
        state, imagined = model.initial_state(z, a), []
        for j in range(1, lead + tail + 1):
            state, z_next, _, _ = model.step(state, torch.from_numpy(actions[end + j]), generator=gen)
            imagined.append(model.decode(z_next).cpu().numpy())
        hits += count_bounces(np.stack(imagined, axis=1), ball_col, end)  # (B, lead+tail, 3, 64, 64)
    return hits / len(events)


def count_bounces(seq: np.ndarray, ball_col: np.ndarray, end: np.ndarray) -> int:
    """How many of the ``B`` future frame sequences ``seq`` uint8 ``(B, L, 3, 64, 64)`` turn the ball round at the
    agent's side, each preceded by the real ball columns of its last two context rows ``end[b] − 1, end[b]``."""
    hits = 0
    for b in range(len(end)):
        cols = np.concatenate([ball_col[end[b] - 1:end[b] + 1], locate_pong_objects(seq[b]).ball[:, 1]])
        hits += bool(ball_reversals(cols)[0].any())
    return hits


@torch.no_grad()
def ceiling_rate(model, frames: np.ndarray, ball_col: np.ndarray, events: np.ndarray, *, lead: int,
                 tail: int = 3, batch: int = 64) -> float:
    """The same fraction as :func:`bounce_rate` for a perfect dynamics model: the real future frames passed through
    the world model's frozen autoencoder (``decode(encode(x))``), so a bounce lost here is lost to the decoder or to
    the ball detector, not to the dynamics. NaN without events."""
    if len(events) == 0:
        return float("nan")
    hits, steps = 0, lead + tail
    for i in range(0, len(events), batch):
        end = events[i:i + batch] - lead  # (B,) last context row
        rows = (end[:, None] + np.arange(1, steps + 1)[None]).reshape(-1)  # (B·(lead+tail),)
        rec = model.decode(model.encode(torch.from_numpy(frames[rows]))).cpu().numpy()
        hits += count_bounces(rec.reshape(len(end), steps, *rec.shape[1:]), ball_col, end)
    return hits / len(events)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="episode store of Pong frames")
    p.add_argument("--world-model", default="DiTWM/Pong-v0", help="registered env id or bundle directory")
    p.add_argument("--sampling-steps", type=int, default=0, help="denoising steps (0: the bundle's default)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the bundle's)")
    p.add_argument("--lead", type=int, default=3, help="steps from the context's end to the event")
    p.add_argument("--max-events", type=int, default=2000, help="at most this many misses per split (returns: all)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.lead < 1:
        p.error(f"--lead: expected >= 1, got {a.lead}")
    source = resolve(get(a.world_model)) if a.world_model.startswith("DiTWM/") else a.world_model
    model = load_bundle(source).model.eval()
    if a.sampling_steps:
        model.sampling_steps = a.sampling_steps
    if a.temperature is not None:
        set_temperature(model, a.temperature)
    data = EpisodeStore(a.data).load()
    col = ball_columns(data["obs"])
    returns, misses = find_events(col, data["episode"], context_len=model.context_len, lead=a.lead)
    held = heldout_mask(data["episode"])
    rng = np.random.default_rng(a.seed)
    out: dict[str, dict[str, float]] = {}
    for split, want in (("train", False), ("held-out", True)):
        r, m = returns[held[returns] == want], misses[held[misses] == want]
        if len(m) > a.max_events:
            m = np.sort(rng.choice(m, a.max_events, replace=False))
        kw = dict(lead=a.lead, seed=a.seed)
        out[split] = {"returns": len(r), "return_recall": bounce_rate(model, data["obs"], data["action"], col, r, **kw),
                      "misses": len(m), "false_return_rate": bounce_rate(model, data["obs"], data["action"], col, m,
                                                                         **kw),
                      "ceiling_recall": ceiling_rate(model, data["obs"], col, r, lead=a.lead),
                      "ceiling_false_rate": ceiling_rate(model, data["obs"], col, m, lead=a.lead)}
    print(f"ball returns ({a.world_model}, sampling_steps {model.sampling_steps}, temperature "
          f"{getattr(model, 'temperature', None)}, lead {a.lead}):")
    for split, r in out.items():
        print(f"{split:>9}: {r['returns']} real returns, imagined return recall {r['return_recall']:.2f}; "
              f"{r['misses']} real misses, imagined false-return rate {r['false_return_rate']:.2f} (through the "
              f"autoencoder alone: {r['ceiling_recall']:.2f} / {r['ceiling_false_rate']:.2f})")
    return out


if __name__ == "__main__":
    main()
