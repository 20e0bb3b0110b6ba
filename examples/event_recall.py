"""Does the world model imagine the real game's reward events? Open-loop recall per reward sign.

For every row of an episode store where the real game gives a reward of sign ``σ`` (in Pong: a point won, +1, or
lost, −1), the world model starts from the real context ending ``--lead`` steps before it, imagines
``--lead + --tail`` steps with the real actions, and we count the rollouts whose imagined rewards include one of
sign ``σ`` (*recall*) and of sign ``−σ`` (*wrong sign*). Split into training and held-out episodes
(:func:`trainers.data.heldout_mask`).

``ditwm evaluate fidelity`` scores reward events over random windows, where in Pong nearly every event is a point
lost; an agent can only learn to score if the model also imagines the rare sign. On a DiT fine-tuned on 500k rows
of agent and scripted play, 3 steps before a real point won the model imagined it in 2 % of rollouts (a point lost:
42 %), although its reward head recognised 93 % of real points won from the real frames (printed as "the head
on the real frames"): the dynamics, not the head, lose the event.

Run::

    python examples/event_recall.py --data artifacts/pong-stage1-100k                 # the bundled DiTWM/Pong-v0
    python examples/event_recall.py --data runs/pong_agent3 --world-model runs/dit_mix4/bundle --sampling-steps 4
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout without install

from dit_envs.envs.loading import load_for_env  # noqa: E402
from trainers.data import EpisodeStore, heldout_mask  # noqa: E402


def event_rows(reward: np.ndarray, episode: np.ndarray, sign: int, *, context_len: int, lead: int,
               tail: int) -> np.ndarray:
    """Rows with a reward of ``sign`` that have a full context ``lead`` steps before and ``tail`` rows after them
    in the same episode.

    Args:
        reward: float ``(R,)`` reward of the transition reaching each row; episode: int ``(R,)``; rows sorted by
            episode then step. sign: ``+1`` or ``−1``. context_len: ``K``. lead: ``≥ 1``. tail: ``≥ 0``.
    Returns:
        int64 row indices, ascending.
    Raises:
        ValueError: ``sign`` not ±1, ``lead < 1`` or ``tail < 0``.
    """
    if sign not in (1, -1) or lead < 1 or tail < 0:
        raise ValueError(f"sign, lead, tail: expected ±1, >= 1, >= 0, got {sign}, {lead}, {tail}")
    rows = np.flatnonzero(np.sign(reward) == sign)
    first = rows - lead - context_len + 1
    last = rows + tail
    ok = (first >= 0) & (last < len(reward))
    rows, first, last = rows[ok], first[ok], last[ok]
    return rows[(episode[first] == episode[rows]) & (episode[last] == episode[rows])]


@torch.no_grad()
def imagined_signs(model, frames: np.ndarray, actions: np.ndarray, rows: np.ndarray, *, lead: int, tail: int,
                   seed: int = 0, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Which rollouts from ``lead`` steps before each event row imagine a positive / a negative reward.

    Args:
        model: a world model (``encode``, ``initial_state``, ``step``; ``context_len``, ``num_actions``).
        frames: uint8 ``(R, 3, H, W)``; actions: int64 ``(R,)`` action that led to each row (−1: none).
        rows: int64 ``(E,)`` from :func:`event_rows`. lead, tail: as there.
        seed: the sampler's generator seed (the same seed gives the same rollouts).
    Returns:
        ``(positive, negative)`` bool ``(E,)`` each.
    """
    K, null = model.context_len, model.num_actions
    gen = torch.Generator(device=model.device).manual_seed(seed)
    pos, neg = np.zeros(len(rows), bool), np.zeros(len(rows), bool)
    for i in range(0, len(rows), batch):
        end = rows[i:i + batch] - lead  # (B,) last context row
        ctx = end[:, None] + np.arange(-K + 1, 1)[None]  # (B, K)
        z = model.encode(torch.from_numpy(frames[ctx.reshape(-1)])).reshape(len(end), K, -1)
        a = torch.from_numpy(np.where(actions[ctx] < 0, null, actions[ctx]))
        state = model.initial_state(z, a)
        for j in range(1, lead + tail + 1):
            state, _, r, _ = model.step(state, torch.from_numpy(actions[end + j]), generator=gen)
            r = r.cpu().numpy()
            pos[i:i + batch] |= r > 0
            neg[i:i + batch] |= r < 0
    return pos, neg


@torch.no_grad()
def head_signs(model, frames: np.ndarray, actions: np.ndarray, rows: np.ndarray,
               batch: int = 512) -> np.ndarray | None:
    """The sign the model's reward head gives each real event transition ``(frame[e−1], action[e], frame[e])``
    (both frames real and encoded): whether the head, not the dynamics, would miss the event.

    Args:
        model: a world model with a transition head ``heads.predict(z, a, z_next)`` (the DiT); others: None.
        frames: uint8 ``(R, 3, H, W)``; actions: int64 ``(R,)``; rows: int64 ``(E,)`` event rows (``e ≥ 1``).
    Returns:
        float ``(E,)`` in ``{−1, 0, 1}``, or None when the model has no such head.
    """
    predict = getattr(getattr(model, "heads", None), "predict", None)
    if predict is None:
        return None
    out = []
    for i in range(0, len(rows), batch):
        e = rows[i:i + batch]
        z0, z1 = model.encode(torch.from_numpy(frames[e - 1])), model.encode(torch.from_numpy(frames[e]))
        r, _ = predict(z0, torch.from_numpy(actions[e]).to(z0.device), z1)
        out.append(np.sign(r.cpu().numpy()))
    return np.concatenate(out)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="episode store")
    p.add_argument("--lead", type=int, default=3, help="steps from the context's end to the event")
    p.add_argument("--tail", type=int, default=3, help="steps imagined after the event's step")
    p.add_argument("--max-events", type=int, default=512, help="at most this many events per sign and split")
    p.add_argument("--world-model", default="DiTWM/Pong-v0", help="registered env id or bundle directory")
    p.add_argument("--sampling-steps", type=int, default=0, help="denoising steps (0: the bundle's default)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the bundle's)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    for name, lo in (("lead", 1), ("tail", 0), ("max_events", 1), ("sampling_steps", 0)):
        if getattr(a, name) < lo:
            p.error(f"--{name.replace('_', '-')}: expected >= {lo}, got {getattr(a, name)}")
    env_id = a.world_model if a.world_model.startswith("DiTWM/") else None
    bundle, _ = load_for_env(env_id, None if env_id else a.world_model, sampling_steps=a.sampling_steps or None,
                             temperature=a.temperature)
    model = bundle.model.eval()
    data = EpisodeStore(a.data).load()
    held = heldout_mask(data["episode"])
    rng = np.random.default_rng(a.seed)
    out: dict[str, dict[str, float]] = {}
    print(f"reward events ({a.world_model}, sampling_steps {model.sampling_steps}, temperature "
          f"{getattr(model, 'temperature', None)}, lead {a.lead}, tail {a.tail}):")
    for sign, name in ((1, "positive"), (-1, "negative")):
        rows = event_rows(data["reward"], data["episode"], sign, context_len=model.context_len, lead=a.lead,
                          tail=a.tail)
        for split, want in (("train", False), ("held-out", True)):
            r = rows[held[rows] == want]
            if len(r) > a.max_events:
                r = np.sort(rng.choice(r, a.max_events, replace=False))
            key = f"{name} {split}"
            if len(r) == 0:
                out[key] = {"events": 0, "recall": float("nan"), "wrong_sign": float("nan")}
            else:
                pos, neg = imagined_signs(model, data["obs"], data["action"], r, lead=a.lead, tail=a.tail,
                                          seed=a.seed)
                same, other = (pos, neg) if sign > 0 else (neg, pos)
                out[key] = {"events": len(r), "recall": float(same.mean()), "wrong_sign": float(other.mean())}
                head = head_signs(model, data["obs"], data["action"], r)
                if head is not None:
                    out[key]["head_recall"] = float((head == sign).mean())
            o = out[key]
            print(f"{key:>18}: {o['events']} real events, imagined recall {o['recall']:.2f}, wrong sign "
                  f"{o['wrong_sign']:.2f}" + (f"; the head on the real frames: {o['head_recall']:.2f}"
                                              if "head_recall" in o else ""))
    return out


if __name__ == "__main__":
    main()
