"""Imagined distillation contexts for ``ditwm distill --imagined-fraction``: teacher rollouts under sticky random
actions (and with ``--imagined-refresh`` the student's own).

The store's real contexts show the states its own (stage-1) policy visits. An agent in imagination drives the model
elsewhere — e.g. it holds the paddle against a wall for many steps — and there the student, trained only on real
contexts, renders the teacher's few-pixel objects worst (measured on Pong: a 2-block 1-step student loses the paddle
in 9–13 % of the one-step predictions from such states, its teacher in 1–2 %). This module rolls the frozen teacher
world model, exactly as the env does (:meth:`~dit_envs.models.dit_world_model.DiTWorldModel.step`: its sampler, its
clamp), from real training contexts under sticky random actions, and keeps every visited context together with
the next action: distillation on the teacher's own state distribution under exploratory actions, in the spirit of
on-policy distillation (DAgger, Ross et al. 2011; Agarwal et al. 2024) — the student learns the teacher's jumps
where a policy will query it, not only where the data's policy went. :class:`OwnRolloutPool` (``--imagined-refresh``)
adds the student's own rollouts, rebuilt as it trains: DAgger proper, the states its own drift leads to.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch

from dit_envs.models.dit_world_model import DiTWorldModel
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


class OwnRolloutPool:
    """The imagined pool of ``ditwm distill --imagined-refresh R``: the teacher's rollouts plus, from step ``R`` on,
    the student's own, rebuilt every ``R`` steps — DAgger (Ross, Gordon & Bagnell 2011): a sequential predictor is
    trained on the states its own predictions lead to, with the expert's answers there (here the teacher's jumps,
    unchanged), so that it learns to follow the teacher from where its open-loop drift takes it, not only from where
    the teacher's or the data's rollouts go. On-policy distillation of language models (GKD, Agarwal et al. 2024)
    does the same with the student's own generations.

    The student part has as many contexts as the teacher part (so with ``--imagined-fraction f`` each batch draws
    about ``f / 2`` from each), split evenly over the student's sampler step counts ``levels`` and the sampling
    ``temperatures`` it is distilled at, each rolled exactly as the env rolls it (:func:`imagined_pool` on a
    :class:`~dit_envs.models.dit_world_model.DiTWorldModel` with the student's DiT and the teacher's head and latent
    statistics). The rollouts use the weights passed to
    :meth:`refresh` (the EMA student: the one exported) and a seed of ``(seed, step)``; :meth:`state_dict` holds
    those weights, so a resumed run rebuilds the same pool (:meth:`load_state_dict`).

    Args:
        wm: the teacher world model.
        windows: the training windows (start contexts, history rows).
        teacher_rows: the teacher's pool, as :func:`imagined_pool` returns it.
        every: ``R``, steps between rebuilds (``≥ 1``).
        levels: the student's sampler step counts to roll with, e.g. ``[1, 2]``.
        temperatures: the sampling temperatures to roll with (``None``: the teacher's), e.g. those of
            ``ditwm distill --temperatures``: a student distilled at 0.5 only is not rolled where it was never trained.
        size, steps, sticky, history: as for :func:`imagined_pool` (``size`` contexts in the student part at most).
        seed: base seed (per process).
    Raises:
        ValueError: ``every`` < 1 or no ``levels``.
    """

    def __init__(self, wm, windows: LatentWindows, teacher_rows: tuple[torch.Tensor, ...], *, every: int,
                 levels: list[int], size: int, steps: int, sticky: float, history: int, seed: int,
                 temperatures: list[float] | None = None) -> None:
        if every < 1 or not levels:
            raise ValueError(f"every/levels: expected >= 1 and a non-empty list, got {every} and {levels}")
        self.wm, self.windows, self.teacher_rows, self.every, self.levels = wm, windows, teacher_rows, every, levels
        self.temperatures = list(temperatures) if temperatures else [wm.temperature]
        self.size, self.steps, self.sticky, self.history, self.seed = size, steps, sticky, history, seed
        self.rows, self.at, self.source = teacher_rows, 0, None

    def due(self, step: int) -> bool:
        """Whether the student part must be rebuilt before training step ``step`` runs."""
        return step > 0 and step % self.every == 0 and step != self.at

    @torch.no_grad()
    def refresh(self, step: int, student) -> int:
        """Rebuild the student part from ``student`` (a :class:`~dit_envs.models.dit.DiT`, not modified) at ``step``;
        returns the number of student contexts."""
        self.source = {k: v.detach().clone() for k, v in student.state_dict().items()}
        was_training = student.training
        student.eval()
        parts = []
        combos = [(k, tau) for k in self.levels for tau in self.temperatures]
        for i, (k, tau) in enumerate(combos):
            swm = DiTWorldModel(self.wm.autoencoder, student, self.wm.heads, sampling_steps=k,
                                temperature=tau).to(self.wm.device)
            swm.set_latent_stats(self.wm.latent_mean, self.wm.latent_std)
            size = math.ceil(self.size / len(combos))
            seed = int(np.random.SeedSequence([self.seed, step, i]).generate_state(1)[0])
            parts.append(imagined_pool(swm, self.windows, size=size, steps=self.steps, seed=seed, sticky=self.sticky,
                                       history=self.history))
        student.train(was_training)
        own = tuple(torch.cat(p)[:self.size] for p in zip(*parts))
        self.rows = tuple(torch.cat([t, o]) for t, o in zip(self.teacher_rows, own))
        self.at = step
        return len(own[0])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The student weights of the last rebuild (``source.*``) and its step (``at``); empty before the first."""
        if self.source is None:
            return {}
        return {"at": torch.tensor(self.at), **{f"source.{k}": v for k, v in self.source.items()}}

    def load_state_dict(self, state: dict[str, torch.Tensor], student_like, step: int) -> None:
        """Rebuild the pool a run had at its checkpoint of step ``step``: from the saved weights (loaded into a copy
        of ``student_like``); nothing before the first rebuild, or at a rebuild step (the loop rebuilds there).

        Raises:
            ValueError: ``state`` lacks the weights of the last rebuild before ``step``.
        """
        last = step // self.every * self.every
        if last in (0, step):
            return
        if not state or int(state["at"]) != last:
            got = int(state["at"]) if state else "none"
            raise ValueError(f"checkpoint: expected the student weights of the pool rebuilt at step {last}, got {got}")
        student = copy.deepcopy(student_like)
        student.load_state_dict({k[len("source."):]: v for k, v in state.items() if k.startswith("source.")})
        self.refresh(last, student)
