"""Objective of ``ditwm distill``: step-size-conditioned trajectory distillation of a few-step rectified-flow DiT.

Method — why this one. The stage-2 teacher already samples with a short uniform Euler schedule of ``N`` steps
(``N = 4`` by default), so its whole sampling trajectory ``x_1 = ε`` (or, with a previous-latent source, the last
context latent plus ``σ·ε``), ``x_{1−1/N}, …, x_0`` costs only ``N`` cheap
single-token evaluations against a cached context. The student is the teacher plus a zero-initialised step-size
embedding (shortcut models, Frans et al. 2024, "One Step Diffusion via Shortcut Models"): it is asked for the
velocity of a jump of size ``d ∈ {1/N, 2/N, 4/N, …, 1}`` from a point of the teacher trajectory, and regresses the
*exact* average velocity of the teacher over that segment, ``(x_t − x_{t−d}) / d``. This is the shortcut
objective with its self-consistency target (two student half-steps) replaced by the teacher's own integration —
possible exactly because the teacher is already few-step, and free of the bootstrapping error of progressive
distillation's stage-by-stage halving (Salimans & Ho 2022) and of consistency distillation's single-step ODE
targets (Song et al. 2023). One student serves every power-of-two step count, so ``sampling_steps`` stays a runtime
setting; at ``d = 1/N`` the target is the teacher's own velocity, so the ``N``-step student stays the teacher
(or, for a student with fewer blocks, learns to be it: plain knowledge distillation of the velocity field).

Every jump of a trajectory at once (:func:`all_jumps`, ``ditwm distill --jumps all``, the default): the ``2N − 1``
jumps of one teacher trajectory share its context, so the student encodes the context once (with gradients) and
answers each jump with one more query token against it (:func:`student_velocities`) — ``2N − 1`` targets for one
context encoding and one teacher trajectory, the same expected loss as one drawn jump per context without its
sampling noise.

Pure functions (tested by hand): :func:`teacher_trajectory`, :func:`shortcut_targets`, :func:`all_jumps`,
:func:`distill_loss`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dit_envs.models.dit import DiT
from trainers.pretrain_objective import PixelDecoder


def step_levels(teacher_steps: int) -> list[int]:
    """Teacher steps per student jump: ``[1, 2, 4, …, teacher_steps]``.

    Raises:
        ValueError: ``teacher_steps`` is not a power of two ≥ 1.
    """
    if teacher_steps < 1 or teacher_steps & (teacher_steps - 1):
        raise ValueError(f"teacher_steps: expected a power of two >= 1, got {teacher_steps}")
    return [2 ** k for k in range(teacher_steps.bit_length())]


@torch.no_grad()
def teacher_trajectory(teacher: DiT, context: torch.Tensor, context_action: torch.Tensor, action: torch.Tensor,
                       noise: torch.Tensor, steps: int) -> torch.Tensor:
    """The teacher's uniform ``steps``-step Euler trajectory from its source (t = 1; ``noise``, or with
    ``prev_source`` the last context latent plus ``prev_source·noise``, :meth:`DiT.flow_source`) to its sample (t = 0).

    Args:
        teacher: the frozen DiT.
        context: float32 ``(B, K, d_z)`` clean normalised context latents.
        context_action: int64 ``(B, K)`` actions preceding them. action: int64 ``(B,)`` the action taken.
        noise: float32 ``(B, d_z)``; with ``prev_source`` the start is ``context[:, -1] + prev_source·noise``.
        steps: ``N`` Euler steps.
    Returns:
        float32 ``(N + 1, B, d_z)``: ``x`` at times ``1, 1 − 1/N, …, 0``.
    Raises:
        ValueError: with ``prev_source > 0``, ``noise`` not shaped like ``context[:, -1]``.
    """
    cache = teacher.context_cache(context, context_action)
    x = teacher.flow_source(noise, context[:, -1])  # the flow's start (noise, or the last latent + noise)
    xs = [x]
    d = torch.full((noise.shape[0],), 1.0 / steps, device=noise.device)
    for j in range(steps):
        t = torch.full_like(d, 1.0 - j / steps)
        x = x - (1.0 / steps) * teacher.predict_next(x, t, action, cache, step_size=d, shared_level=True).float()
        xs.append(x)
    return torch.stack(xs)


def shortcut_targets(traj: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Draw one jump per sample along the teacher trajectory and its exact average velocity.

    For each sample a level ``m`` (teacher steps per jump) is drawn uniformly from :func:`step_levels` and a start
    ``j`` uniformly from ``0, m, 2m, …`` (the points a uniform ``N/m``-step sampler visits).

    Args:
        traj: float32 ``(N + 1, B, d_z)`` from :func:`teacher_trajectory`.
        generator: the only randomness (on ``traj``'s device).
    Returns:
        ``x`` float32 ``(B, d_z)`` start point, ``t`` ``(B,)`` its time ``1 − j/N``, ``step_size`` ``(B,)`` the jump
        ``m/N``, ``v`` ``(B, d_z)`` target velocity ``(x_j − x_{j+m}) / (m/N)``.
    """
    n, B = traj.shape[0] - 1, traj.shape[1]
    dev = traj.device
    levels = torch.tensor(step_levels(n), device=dev)
    m = levels[torch.randint(len(levels), (B,), generator=generator, device=dev)]  # (B,)
    u = torch.floor(torch.rand(B, generator=generator, device=dev) * (n // m)).long()  # (B,) in [0, N/m)
    j = u * m
    rows = torch.arange(B, device=dev)
    x_start, x_end = traj[j, rows], traj[j + m, rows]  # (B, d_z)
    d = m.float() / n
    return {"x": x_start, "t": 1.0 - j.float() / n, "step_size": d, "v": (x_start - x_end) / d[:, None]}


def all_jumps(traj: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every jump of every level along the teacher trajectory, with its exact average velocity and its weight.

    The jumps of level ``m`` start at ``j = 0, m, 2m, …`` (the points an ``N/m``-step sampler visits); weights make
    each level's jumps share ``1 / len(levels)`` equally, so the weighted loss is the expectation of
    :func:`shortcut_targets`' one drawn jump, without its sampling noise (``2N − 1`` targets per teacher trajectory
    instead of one, for one context encoding: :func:`student_velocities`).

    Args:
        traj: float32 ``(N + 1, B, d_z)`` from :func:`teacher_trajectory`.
    Returns:
        ``x`` float32 ``(J, B, d_z)`` start points, ``t`` ``(J,)`` their times ``1 − j/N``, ``step_size`` ``(J,)``
        ``m/N``, ``v`` ``(J, B, d_z)`` target velocities ``(x_j − x_{j+m}) / (m/N)``, ``weight`` ``(J,)`` summing to
        1, with ``J = 2N − 1``; ``final`` int64 ``(len(levels),)`` the jumps that end at the sample (``t = m/N``),
        fixed by ``N`` (no device sync to find them).
    """
    n = traj.shape[0] - 1
    levels = step_levels(n)
    starts = [(j, m) for m in levels for j in range(0, n, m)]
    j = torch.tensor([a for a, _ in starts], device=traj.device)
    m = torch.tensor([b for _, b in starts], device=traj.device)
    d = m.float() / n  # (J,)
    x_start = traj[j]  # (J, B, d_z)
    final = torch.tensor([i for i, (a, b) in enumerate(starts) if a + b == n], device=traj.device)
    return {"x": x_start, "t": 1.0 - j.float() / n, "step_size": d, "v": (x_start - traj[j + m]) / d[:, None, None],
            "weight": d / len(levels), "final": final}


class DistillNet(nn.Module):
    """The trainable student with one ``forward`` returning the loss (so DDP / compile wrap one module).

    Args:
        student: the step-conditioned :class:`DiT` (``config.shortcut_steps > 0``).
    """

    def __init__(self, student: DiT) -> None:
        super().__init__()
        self.dit = student
        self.pixel_weight = 0.0
        self.pixel: PixelDecoder | None = None  # a plain object: outside the module tree

    def set_decoder(self, decoder: nn.Module, mean: torch.Tensor, std: torch.Tensor, *, pixel_weight: float,
                    motion_boost: float = 100.0, motion_threshold: float = 0.1) -> None:
        """Add ``pixel_weight ·`` :meth:`pixel_loss` to the loss; the other arguments build its
        :class:`~trainers.pretrain_objective.PixelDecoder` (kept outside the module tree)."""
        self.pixel = PixelDecoder(decoder, mean, std, motion_boost=motion_boost,
                                 threshold=motion_threshold)
        self.pixel_weight = pixel_weight

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Float32 scalar: the loss of a batch from :func:`make_distill_inputs` — with every jump (``x`` ``(J, B,
        d_z)``, :func:`all_jumps`) the ``weight``-ed sum of each jump's mean squared velocity error, with one drawn jump
        (``x`` ``(B, d_z)``) :func:`distill_loss` — plus the pixel term when :meth:`set_decoder` enabled it."""
        if inputs["x"].ndim == 3:  # every jump of each trajectory (all_jumps)
            v = student_velocities(self.dit, inputs)  # (J, B, d_z)
            loss = ((v.float() - inputs["v"]).square().mean(dim=(1, 2)) * inputs["weight"]).sum()
            if self.pixel is not None and self.pixel_weight:
                loss = loss + self.pixel_weight * self.pixel_loss_all(inputs, v)
            return loss
        v = student_velocity(self.dit, inputs)
        loss = F.mse_loss(v.float(), inputs["v"])
        if self.pixel is not None and self.pixel_weight:
            loss = loss + self.pixel_weight * self.pixel_loss(inputs, v)
        return loss

    def pixel_loss_all(self, inputs: dict[str, torch.Tensor], v: torch.Tensor) -> torch.Tensor:
        """:meth:`pixel_loss` for a batch of :func:`all_jumps`: the jumps ending at the sample (one per level), each
        weighted by the chance ``m/N`` that :func:`shortcut_targets` draws it among the ones ending there (the same
        expectation as :meth:`pixel_loss`); the teacher's end point of them all is its sample ``x_j − d·v``.

        Args:
            inputs: a batch from :func:`make_distill_inputs` with ``jumps="all"``.
            v: the student's velocities float ``(J, B, d_z)``.
        Returns:
            float32 scalar.
        Raises:
            RuntimeError: :meth:`set_decoder` was not called.
        """
        final = inputs["final"]  # (F,) one per level
        d = inputs["step_size"][final]  # (F,)
        x = inputs["x"][final]  # (F, B, d_z)
        n, B = x.shape[:2]
        err = self._end_point_error((x - d[:, None, None] * v[final].float()).flatten(0, 1),
                                    x[0] - d[0] * inputs["v"][final[0]], inputs["context"][:, -1])  # (F·B,)
        return (err.view(n, B).mean(dim=1) * (d / d.sum())).sum()

    def _end_point_error(self, student_end: torch.Tensor, teacher_end: torch.Tensor,
                         before: torch.Tensor) -> torch.Tensor:
        """Object-weighted pixel MSE float32 ``(R·M,)`` of decoded student end points ``(R·M, d_z)`` against the
        decoded teacher end points ``(M, d_z)``, with ``before`` ``(M, d_z)`` the newest context latents (the
        teacher's side decoded once, without gradients, for the ``R`` student rows of each). Raises RuntimeError
        without :meth:`set_decoder`."""
        px = self.pixel
        if px is None:
            raise RuntimeError("decoder: expected set_decoder() before the pixel term, got none")
        img = px.images(student_end, clamp=True)  # (R·M, 3, 64, 64)
        r = student_end.shape[0] // teacher_end.shape[0]
        with torch.no_grad():
            target = px.images(teacher_end, clamp=True).repeat(r, 1, 1, 1)
            prev = px.images(before, clamp=True).repeat(r, 1, 1, 1)
        return px.weighted_mse(img, target, prev, foreground=True)

    def pixel_loss(self, inputs: dict[str, torch.Tensor], v: torch.Tensor) -> torch.Tensor:
        """Object-weighted pixel MSE between the decoded end points of the student's and the teacher's jumps.

        Only jumps that end at the sample (``t − step_size = 0``) count; both end points are clamped to the
        encoder's range ``[-1, 1]`` as the env does before decoding, and weighted with
        :func:`~trainers.pretrain_objective.motion_weighted_mse` (``foreground=True``, the newest context frame as
        the "before" frame), so small objects (a 1–5 pixel paddle, the ball), which a latent MSE barely weighs,
        count in the student's one-step samples, moving or not.

        Args:
            inputs: a batch from :func:`make_distill_inputs`.
            v: the student's velocities float ``(B, d_z)``.
        Returns:
            float32 scalar, 0 when no jump ends at the sample.
        Raises:
            RuntimeError: :meth:`set_decoder` was not called.
        """
        if self.pixel is None:
            raise RuntimeError("decoder: expected set_decoder() before the pixel term, got none")
        final = (inputs["t"] - inputs["step_size"]).abs() < 1e-6  # (B,)
        if not bool(final.any()):
            return v.float().sum() * 0.0
        d, x = inputs["step_size"][final, None], inputs["x"][final]
        return self._end_point_error(x - d * v[final].float(), x - d * inputs["v"][final],
                                     inputs["context"][final, -1]).mean()


def context_rows(inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The rows before the jumps of ``inputs``: a streaming student's optional ``history (B, H, d_z)``,
    ``history_action (B, H)`` (the rows its rolling cache has seen in an env), then the context.

    Returns:
        ``(z (B, H+K, d_z), prev_action (B, H+K), valid)``; ``valid`` bool ``(B, H+K)`` from ``history_valid``
        ``(B, H)`` (the context rows are valid), or None when every row is.
    """
    ctx, ctx_a, valid = inputs["context"], inputs["context_action"], None
    if "history" in inputs:
        ctx = torch.cat([inputs["history"], ctx], dim=1)  # (B, H+K, d_z)
        ctx_a = torch.cat([inputs["history_action"], ctx_a], dim=1)
        hv = inputs["history_valid"]
        if not bool(hv.all()):
            valid = torch.cat([hv, torch.ones_like(inputs["context_action"], dtype=torch.bool)], dim=1)  # (B, H+K)
    return ctx, ctx_a, valid


def student_velocity(student: DiT, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The student's velocity ``(B, d_z)`` for each drawn jump of ``inputs`` (see :func:`distill_loss`), one forward
    pass over the whole sequence; a streaming student also reads the rows of :func:`context_rows`."""
    ctx, ctx_a, valid = context_rows(inputs)
    B, L = ctx_a.shape
    dev = ctx.device
    if valid is not None:
        valid = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool, device=dev)], dim=1)  # (B, L+1)
    seq = torch.cat([ctx, inputs["x"][:, None]], dim=1)  # (B, L+1, d_z)
    t = torch.cat([torch.zeros(B, L, device=dev), inputs["t"][:, None]], dim=1)  # (B, L+1)
    d = torch.cat([torch.zeros(B, L, device=dev), inputs["step_size"][:, None]], dim=1)  # (B, L+1)
    a = torch.cat([ctx_a, inputs["action"][:, None]], dim=1)  # (B, L+1)
    return student(seq, t, a, step_size=d, key_valid=valid)[:, -1]  # (B, d_z)


def student_velocities(student: DiT, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The student's velocity ``(J, B, d_z)`` for every jump of a batch of :func:`all_jumps`: the rows of
    :func:`context_rows` are encoded once (:meth:`DiT.context_cache`, with gradients), then every jump is one query
    token against them, all ``J·B`` in one batched :meth:`DiT.predict_next` (each exactly the last position of
    :meth:`DiT.forward` on its whole sequence, as :func:`student_velocity`; one batch instead of ``J`` calls took the
    3-block streaming student's distillation from 2.53 to 3.86 steps/s on 2 CPU cores)."""
    ctx, ctx_a, valid = context_rows(inputs)
    J, B = inputs["x"].shape[:2]
    cache = [(k.repeat(J, 1, 1, 1), v.repeat(J, 1, 1, 1))  # row j·B + b: context b, for jump j
             for k, v in student.context_cache(ctx, ctx_a, key_valid=valid)]
    v = student.predict_next(inputs["x"].flatten(0, 1), inputs["t"].repeat_interleave(B), inputs["action"].repeat(J),
                             cache, step_size=inputs["step_size"].repeat_interleave(B), per_token=True)  # (J·B, d_z)
    return v.view(J, B, -1)


def distill_loss(student: DiT, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean squared error between the student's velocity for the drawn jump and the teacher's average velocity (a
    batch of one jump per context, ``jumps="one"``; :class:`DistillNet` takes both kinds).

    Args:
        student: step-conditioned DiT.
        inputs: ``context (B, K, d_z)``, ``context_action (B, K)``, ``action (B,)``, ``x``, ``t``, ``step_size``,
            ``v`` as from :func:`shortcut_targets`.
    Returns:
        float32 scalar.
    """
    return F.mse_loss(student_velocity(student, inputs).float(), inputs["v"])


JUMPS = ("all", "one")
"""Targets per teacher trajectory: every jump (:func:`all_jumps`) or one drawn jump (:func:`shortcut_targets`)."""


def make_distill_inputs(teacher: DiT, context: torch.Tensor, context_action: torch.Tensor, action: torch.Tensor,
                        *, teacher_steps: int, generator: torch.Generator, jumps: str = "all",
                        temperatures: tuple[float, ...] | list[float] = (1.0,)) -> dict[str, torch.Tensor]:
    """One batch: noise, the teacher trajectory and its jumps: one drawn per sample (:func:`shortcut_targets`) or
    every one (:func:`all_jumps`).

    Args:
        teacher, context, context_action, action, teacher_steps: as in :func:`teacher_trajectory`.
        generator: draws the noise (and the jumps, and with several ``temperatures`` each sample's).
        jumps: one of :data:`JUMPS`.
        temperatures: sampling temperatures ``τ`` (:attr:`~dit_envs.models.dit_world_model.DiTWorldModel.
            temperature`): each sample's trajectory starts at ``τ·ε`` (with ``prev_source = σ``: at the last context
            latent plus ``σ·τ·ε``), ``τ`` drawn uniformly from these (none drawn for one value). A student learns the
            teacher's map only from the start points it is trained on, and in ``d_z`` dimensions ``‖τ·ε‖ ≈ τ·√d_z``:
            the starts of different temperatures do not overlap.
    Returns:
        The ``inputs`` of :class:`DistillNet`.
    Raises:
        ValueError: an unknown ``jumps``; no ``temperatures``, or one that is not a finite number ``>= 0``.
    """
    if jumps not in JUMPS:
        raise ValueError(f"jumps: expected one of {JUMPS}, got {jumps!r}")
    check_temperatures(temperatures)
    noise = torch.randn(context.shape[0], context.shape[2], generator=generator, device=context.device)
    if len(temperatures) > 1:
        pick = torch.randint(len(temperatures), (noise.shape[0],), generator=generator, device=noise.device)
        noise = noise * noise.new_tensor(temperatures)[pick, None]
    else:  # no draw: one temperature keeps the generator's stream (and 1.0 · ε is ε, bit for bit)
        noise = noise * float(temperatures[0])
    traj = teacher_trajectory(teacher, context, context_action, action, noise, teacher_steps)
    targets = all_jumps(traj) if jumps == "all" else shortcut_targets(traj, generator)
    return {"context": context, "context_action": context_action, "action": action, **targets}


def check_temperatures(temperatures: tuple[float, ...] | list[float]) -> None:
    """Validate the distillation temperatures (at least one; each a finite number ``>= 0``).

    Raises:
        ValueError: naming ``temperatures``, the expected and the actual value.
    """
    if not len(temperatures):
        raise ValueError("temperatures: expected at least one temperature, got none")
    for t in temperatures:
        if not (isinstance(t, (int, float)) and math.isfinite(t) and t >= 0):
            raise ValueError(f"temperatures: expected finite numbers >= 0, got {list(temperatures)}")


@torch.no_grad()
def sample_gap(student: DiT, teacher: DiT, context: torch.Tensor, context_action: torch.Tensor, action: torch.Tensor,
               *, teacher_steps: int, student_steps: int, seed: int = 0, temperature: float = 1.0) -> float:
    """Mean squared distance (normalised units) between the student's ``student_steps``-step sample and the
    teacher's ``teacher_steps``-step sample from the same noise ``temperature · ε`` and context — the distillation
    gap."""
    gen = torch.Generator(device=context.device).manual_seed(seed)
    noise = temperature * torch.randn(context.shape[0], context.shape[2], generator=gen, device=context.device)
    last = context[:, -1]
    ref = teacher.sample_next(noise, action, teacher.context_cache(context, context_action), teacher_steps, x_prev=last)
    got = student.sample_next(noise, action, student.context_cache(context, context_action), student_steps,
                              x_prev=last)
    return (got - ref).square().mean().item()
