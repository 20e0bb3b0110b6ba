"""Imagined distillation contexts for ``ditwm distill --imagined-fraction``: teacher rollouts under sticky random
actions.

The store's real contexts show the states its own (stage-1) policy visits. An agent in imagination drives the model
elsewhere — e.g. it holds the paddle against a wall for many steps — and there the student, trained only on real
contexts, renders the teacher's few-pixel objects worst (measured on Pong: a 2-block 1-step student loses the paddle
in 9–13 % of the one-step predictions from such states, its teacher in 1–2 %). This module rolls the frozen teacher
world model, exactly as the env does (:meth:`~dit_envs.models.dit_world_model.DiTWorldModel.step`: its sampler, its
clamp), from real training contexts under sticky random actions, and keeps every visited context together with
the next action: distillation on the teacher's own state distribution under exploratory actions, in the spirit of
on-policy distillation (DAgger, Ross et al. 2011; Agarwal et al. 2024) — the student learns the teacher's jumps
where a policy will query it, not only where the data's policy went.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from trainers.latents import LatentWindows


@torch.no_grad()
def imagined_pool(wm, windows: LatentWindows, *, size: int, steps: int, seed: int, sticky: float = 0.75,
                  chunk: int = 1024, history: int = 0) -> tuple[torch.Tensor, ...]:
    """Contexts visited by ``steps``-step teacher rollouts from real windows under sticky random actions.

    Args:
        wm: the teacher :class:`~dit_envs.models.dit_world_model.DiTWorldModel` (on the device of ``windows``).
        windows: the training windows (length ≥ ``K``); only their first ``K`` rows are used as start contexts.
        size: pool size at most; ``ceil(size / steps)`` start windows are drawn (uniformly, with replacement) and
            every visited context is kept (the first ``size``) until the teacher's head predicts a game over: the
            env resets there, so later contexts are never queried.
        steps: imagined steps per rollout (``≥ 1``).
        seed: the only randomness (start windows, actions, the sampler's noise): the same seed gives the same pool.
        sticky: probability of repeating the previous action at each step (else a uniform random action).
        chunk: rollouts per batched model call.
        history: also keep the ``H`` rows before each context (a streaming student's history): the real rows
            before the start window (:meth:`LatentWindows.history`) followed by the rollout's own imagined ones.
    Returns:
        ``(context, context_action, action)``: float32 ``(M, K, d_z)`` standardised latents (the units of
        ``windows.x``), int64 ``(M, K)`` the action preceding each latent, int64 ``(M,)`` the action taken next —
        the arguments of :func:`trainers.distill_objective.make_distill_inputs`; ``M ≤ size``, rollout after
        rollout in order of the steps within each chunk. With ``history``, three more: float32 ``(M, H, d_z)``,
        int64 ``(M, H)`` and bool ``(M, H)`` validity (False before an episode start), oldest first.
    Raises:
        ValueError: ``size``, ``steps`` or ``chunk`` < 1, or ``sticky`` outside ``[0, 1]``.
    """
    if min(size, steps, chunk) < 1 or history < 0:
        raise ValueError(f"size/steps/chunk/history: expected >= 1, >= 1, >= 1, >= 0, got {size}, {steps}, {chunk}"
                         f" and {history}")
    if not 0.0 <= sticky <= 1.0:
        raise ValueError(f"sticky: expected a probability in [0, 1], got {sticky}")
    K, A, dev = wm.context_len, wm.num_actions, wm.device
    rng = np.random.default_rng(seed)
    starts = rng.choice(windows.sampler.all_window_starts(), size=math.ceil(size / steps))
    gen = torch.Generator(device=dev).manual_seed(seed)
    out: list[tuple[torch.Tensor, ...]] = []
    for i in range(0, len(starts), chunk):
        w = windows.windows(starts[i:i + chunk])
        n = w.x.shape[0]
        if history:
            hx, ha, hv = windows.history(starts[i:i + chunk], history)  # (n, H, d_z), (n, H), (n, H)
        state = wm.initial_state(w.z[:, :K], w.prev_action[:, :K])
        action = torch.randint(A, (n,), generator=gen, device=dev)
        alive = torch.ones(n, dtype=torch.bool, device=dev)
        for _ in range(steps):
            if history:  # the context's oldest row moves into the history
                hx = torch.cat([hx, wm.normalize(state["z"][:, :1])], dim=1)[:, 1:]
                ha = torch.cat([ha, state["a"][:, :1]], dim=1)[:, 1:]
                hv = torch.cat([hv, torch.ones(n, 1, dtype=torch.bool, device=dev)], dim=1)[:, 1:]
            state, _, _, terminated = wm.step(state, action, gen)
            alive &= ~terminated  # the env resets after a game over: its context is never queried
            redraw = torch.rand(n, generator=gen, device=dev) >= sticky
            action = torch.where(redraw, torch.randint(A, (n,), generator=gen, device=dev), action)
            rows = (wm.normalize(state["z"]), state["a"], action) + ((hx, ha, hv) if history else ())
            out.append(tuple(r[alive] for r in rows))
    return tuple(torch.cat(parts)[:size] for parts in zip(*out))  # type: ignore[return-value]
