"""The student of ``ditwm distill``: built from the teacher's weights (:func:`make_student`, with fewer blocks
:func:`student_blocks`) and exported as a drop-in world-model bundle (:func:`export_student`)."""
from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from dit_envs.bundle import save_bundle
from dit_envs.models.dit import DiT
from dit_envs.models.dit_world_model import DiTWorldModel
from trainers.distill_objective import step_levels

if TYPE_CHECKING:  # annotations only: trainers.distill imports this module
    from trainers.distill import Args, Setup


def student_blocks(teacher_depth: int, depth: int) -> list[int]:
    """Indices of the teacher blocks a ``depth``-block student starts from: evenly spaced, the first and the last
    included (``[0]`` for one block), e.g. ``4 → 2: [0, 3]``, ``4 → 3: [0, 2, 3]``, ``8 → 4: [0, 2, 5, 7]`` — layer
    selection as in DistilBERT (Sanh et al. 2019) and in the block removal of BK-SDM (Kim et al. 2023).

    Raises:
        ValueError: ``depth`` outside ``[1, teacher_depth]``.
    """
    if not 1 <= depth <= teacher_depth:
        raise ValueError(f"depth: expected 1 .. {teacher_depth} (the teacher's depth), got {depth}")
    if depth == 1:
        return [0]
    return [round(i * (teacher_depth - 1) / (depth - 1)) for i in range(depth)]


def make_student(teacher: DiT, teacher_steps: int, depth: int = 0, streaming: bool = False) -> DiT:
    """A step-conditioned student (``shortcut_steps = teacher_steps``) built from ``teacher``'s weights.

    Args:
        teacher: an undistilled DiT.
        teacher_steps: ``N``.
        depth: student blocks (0: the teacher's). At the teacher's depth the student is an exact copy and outputs
            what the teacher does until trained (its step embedding ends in zeros); with fewer blocks it keeps the
            teacher's embeddings, output layer and the blocks :func:`student_blocks` picks.
        streaming: a streaming student (``DiTConfig.streaming``: windowed attention, rolling cache) with zero
            relative position embeddings; it must learn the order of its context the teacher read from positions.
    Raises:
        ValueError: a distilled ``teacher`` or a ``depth`` outside ``[0, teacher depth]``.
    """
    if teacher.config.shortcut_steps:
        raise ValueError(f"teacher: expected an undistilled DiT, got shortcut_steps {teacher.config.shortcut_steps}")
    keep = student_blocks(teacher.config.depth, depth or teacher.config.depth)
    student = DiT(replace(teacher.config, shortcut_steps=teacher_steps, depth=len(keep), streaming=streaming))
    state = {}
    for k, v in teacher.state_dict().items():
        if k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            if int(i) not in keep:
                continue
            k = f"blocks.{keep.index(int(i))}.{rest}"
        state[k] = v
    missing, unexpected = student.load_state_dict(state, strict=False)
    fresh = lambda k: k.startswith("step_embed.") or streaming and k.endswith((".rel_k", ".rel_v"))  # noqa: E731
    if unexpected or not all(fresh(k) for k in missing):
        raise ValueError(f"teacher: expected a DiT without step conditioning, got missing {missing}, "
                         f"unexpected {unexpected}")
    return student


def export_student(out_dir: Path, s: Setup, student: DiT, args: Args, *, step: int, final: dict) -> Path:
    """Save the student as a bundle: the teacher's autoencoder, head, standardisation and start contexts with the
    student's DiT, sampling at the first of ``--temperatures`` by default; the model card is the teacher's plus a
    distillation section."""
    teacher: DiTWorldModel = s.bundle.model
    wm = DiTWorldModel(copy.deepcopy(teacher.autoencoder).cpu().float(), copy.deepcopy(student).cpu().float(),
                       copy.deepcopy(teacher.heads).cpu().float(), sampling_steps=args.sampling_steps,
                       temperature=args.temperatures[0])
    wm.set_latent_stats(teacher.latent_mean.cpu().float(), teacher.latent_std.cpu().float())
    rows = {"teacher": f"{args.teacher} (dynamics sha256 {s.teacher_sha256[:12]})",
            "method": "step-size-conditioned trajectory distillation (shortcut models, Frans et al. 2024)",
            "teacher steps N": s.teacher_steps, "student steps": ", ".join(str(s.teacher_steps // m)
                                                                          for m in step_levels(s.teacher_steps)),
            "student blocks": f"{student.config.depth} of the teacher's {teacher.dit.config.depth}",
            "streaming (rolling context cache)": student.config.streaming,
            "default sampling_steps": args.sampling_steps, "distillation steps": step, "batch": args.batch,
            "lr": args.lr, "jumps per trajectory": args.jumps,
            "distilled at temperatures": ", ".join(f"{t:g}" for t in args.temperatures),
            "pixel weight": args.pixel_weight, "imagined fraction": args.imagined_fraction,
            **({"imagined rollouts (steps, sticky)": f"{args.imagined_steps}, {args.imagined_sticky}"}
               if args.imagined_fraction else {}),
            **({"student's own rollouts rebuilt every (steps)": args.imagined_refresh} if args.imagined_refresh else {}),
            **{k: f"{v:.4g}" for k, v in final.items()}}
    card = ("## Stage 2b: distillation\n\n| field | value |\n| --- | --- |\n"
            + "\n".join(f"| {k} | {v} |" for k, v in rows.items()) + "\n")
    readme = Path(args.teacher) / "README.md"
    teacher_card = readme.read_text() if readme.is_file() else ""
    if "\n## " in teacher_card:
        card += "\n" + teacher_card[teacher_card.index("\n## ") + 1:]
    return save_bundle(wm.eval(), out_dir, game=s.bundle.config["game"],
                       action_meanings=list(s.bundle.config["action_meanings"]), start_z=s.bundle.start_z.cpu(),
                       start_a=s.bundle.start_a.cpu(), card=card, overwrite=True)
