"""Shared plumbing of the stage CLIs: dataclass arguments → argparse, argument errors, JSONL metrics, seeding.

Every stage module defines ``@dataclass(kw_only=True) class Args`` (fields made with :func:`arg`, one-line help each), a
``main(args) -> int`` that tests call in-process, and ``cli(argv=None)`` built with :func:`run_cli`.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
import types
import typing
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import torch

from dit_envs.envs.loading import DTYPE_NAMES

A = TypeVar("A")
_REQUIRED = object()


class ArgError(ValueError):
    """A bad command-line argument. ``field`` is the dataclass field; the CLI prints ``--field: message``.

    Raised before anything is written, so a rejected command leaves no file behind.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"--{field.replace('_', '-')}: {message}")
        self.field = field


def check_temperature(value: float | None) -> None:
    """Validate a ``--temperature`` flag (None keeps the bundle's), the rule of ``DiTWorldModel.temperature``.

    Raises:
        ArgError: ``value`` is not None and not a finite number >= 0 (names ``temperature``).
    """
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise ArgError("temperature", f"expected a finite real number >= 0, got {value}")


def check_sampling_shift(value: float | None) -> None:
    """Validate a ``--sampling-shift`` flag (None keeps the bundle's), the rule of
    ``DiTWorldModel.sampling_shift``.

    Raises:
        ArgError: ``value`` is not None and not a number in ``(0, 100]`` (names ``sampling_shift``).
    """
    from dit_envs.models.dit_world_model import MAX_SAMPLING_SHIFT

    if value is not None and not 0 < value <= MAX_SAMPLING_SHIFT:
        raise ArgError("sampling_shift", f"expected a real number in (0, {MAX_SAMPLING_SHIFT:g}], got {value}")


PRECISIONS = ("auto", "bf16", "fp32")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raise :class:`ArgError` (``name``, the choices, the value) unless ``value`` is one of ``choices``; for
    arguments given from Python, which argparse's ``choices`` never saw."""
    if value not in choices:
        raise ArgError(name, f"expected one of {', '.join(choices)}, got {value!r}")


def setting_arg_error(e: ValueError, field: str, message: str) -> ArgError:
    """The :class:`ArgError` for a ``ValueError`` raised while loading or configuring a world model: named after
    the sampler setting its message starts with (``"temperature: ..."``, ``"sampling_steps: ..."``, as the models
    and :func:`dit_envs.envs.loading.load_for_env` word them), else ``field`` with ``message``."""
    text = str(e)
    for name in ("temperature", "sampling_steps", "sampling_shift"):
        if text.startswith(f"{name}: "):
            return ArgError(name, text.removeprefix(f"{name}: "))
    return ArgError(field, message)


def arg(default: Any = _REQUIRED, help: str = "", **kw: Any) -> Any:
    """A dataclass field with a one-line ``help``; without ``default`` the flag is required."""
    md = {"help": help, **kw}
    if default is _REQUIRED:
        return dataclasses.field(metadata={**md, "required": True})
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=md)
    return dataclasses.field(default=default, metadata=md)


def dtype_arg(note: str = "") -> Any:
    """The ``--dtype`` field of commands that run a world model: the env's ``dtype`` option (float32 by default;
    ``auto`` → :func:`dit_envs.envs.loading.fast_dtype`)."""
    return arg("float32", "float dtype the world model runs in (auto: bfloat16 on AMX CPUs and bf16 GPUs)" + note,
               choices=DTYPE_NAMES)


def _base_type(tp: Any) -> Any:
    """``int | None`` → ``int``; plain types unchanged."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def build_parser(cls: type, prog: str, description: str = "") -> argparse.ArgumentParser:
    """An ``argparse`` parser with one ``--flag`` per field of the dataclass ``cls`` (required flags first, then
    the subclass's own fields, then inherited ones such as :class:`LoopArgs`)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    hints = typing.get_type_hints(cls)
    own = set(getattr(cls, "__annotations__", {}))
    fields = sorted(dataclasses.fields(cls), key=lambda f: (not f.metadata.get("required", False), f.name not in own))
    for f in fields:
        flag = "--" + f.name.replace("_", "-")
        tp = _base_type(hints[f.name])
        help_ = f.metadata.get("help", "").replace("%", "%%")  # argparse %-formats help strings
        required = f.metadata.get("required", False)
        default = None if required else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        if tp is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_)
        elif typing.get_origin(tp) is list:
            (inner,) = typing.get_args(tp)
            p.add_argument(flag, type=inner, nargs="+", default=default, required=required, help=help_)
        else:
            choices = f.metadata.get("choices")
            p.add_argument(flag, type=tp, default=default, required=required, choices=choices,
                           help=f"{help_} (default: {str(default).replace('%', '%%')})" if not required else help_)
    return p


def run_cli(cls: type[A], main: Callable[[A], int], prog: str, argv: list[str] | None = None,
            description: str = "") -> int:
    """Parse ``argv`` into ``cls`` and call ``main``. An :class:`ArgError` becomes a one-line error and exit 2."""
    ns = build_parser(cls, prog, description).parse_args(argv)
    try:
        args = cls(**vars(ns))
        return main(args)
    except ArgError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2


def check_out_dir(path: str | os.PathLike, resume: bool, field: str = "out") -> Path:
    """Validate an output directory without creating it.

    Accepts: a missing path whose nearest existing parent is a writable directory; an empty directory; a
    non-empty directory when ``resume``. Raises :class:`ArgError` otherwise (nothing is created).
    """
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            raise ArgError(field, f"expected a directory, got a file: {p}")
        if not os.access(p, os.W_OK):
            raise ArgError(field, f"expected a writable directory, got a read-only one: {p}")
        if any(p.iterdir()) and not resume:
            raise ArgError(field, f"expected an empty or new directory (or pass --resume), got a non-empty one: {p}")
        return p
    parent = p.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ArgError(field, f"expected a writable location, cannot create {p} under {parent}")
    return p


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    """``"auto"`` → CUDA when available else CPU; otherwise ``torch.device(name)``.

    Raises:
        ArgError: ``device`` names CUDA but none is available, or is not a device string.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ArgError("device", f"expected auto, cpu or cuda[:i], got {name!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ArgError("device", f"expected an available device, got {name!r} but CUDA is not available")
    return dev


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of a training stage's forward passes (``LoopArgs.precision``).

    ``"bf16"``: :func:`torch.autocast` to bfloat16 on ``device`` (CUDA, or CPU, where oneDNN runs bf16 matmuls
    on AMX / AVX512-BF16 units; parameters, gradients and optimiser state stay float32); ``"fp32"``: no autocast;
    ``"auto"``: bf16 on CUDA, fp32 elsewhere.

    Raises:
        ValueError: ``precision`` is not one of :data:`PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class JsonlLogger:
    """Append metrics as one JSON object per line (``{"step": ..., "time": ..., **metrics}``), flushed each call.

    Opened in append mode so a resumed run continues the same file; TensorBoard is mirrored when installed.
    """

    def __init__(self, path: str | os.PathLike, tensorboard: bool = True) -> None:
        self.path = Path(path)
        self._f = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional dependency

                self._tb = SummaryWriter(str(self.path.parent / "tb"))
            except Exception:
                self._tb = None

    def log(self, step: int, **metrics: float | list[float]) -> None:
        """One JSON line: ``step``, wall ``time`` and the metrics as floats (a list stays a list of floats, e.g.
        per-game returns; TensorBoard gets the scalars only)."""
        rec = {"step": int(step), "time": time.time(),
               **{k: [float(x) for x in v] if isinstance(v, (list, tuple)) else float(v) for k, v in metrics.items()}}
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                if not isinstance(v, (list, tuple)):
                    self._tb.add_scalar(k, float(v), step)

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()


def catch_stop_signals(on_signal: Callable[[int], None]) -> Callable[[], None]:
    """Route SIGTERM and SIGINT to ``on_signal(signum)`` (a training loop then checkpoints and stops).

    Returns:
        ``restore()``, which puts the previous handlers back (call it in a ``finally``).
    """
    import signal

    old = {s: signal.signal(s, lambda signum, _frame: on_signal(signum)) for s in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for s, h in old.items():
            signal.signal(s, h)

    return restore


def signal_exit_code(signum: int) -> int:
    """Shell convention for a run stopped by a signal: 143 after SIGTERM, 130 after SIGINT (128 + signum)."""
    return 128 + int(signum)


@dataclasses.dataclass(kw_only=True)
class LoopArgs:
    """Arguments every gradient-training stage shares (``ditwm pretrain``, ``ditwm distill``): subclass it with
    ``@dataclass(kw_only=True)`` and add the stage's own fields (a redefined field overrides its default)."""

    grad_clip: float = arg(1.0, "max global gradient norm")
    ema: float = arg(0.999, "EMA decay of the exported weights")
    log_every: int = arg(50, "steps between metric log lines")
    eval_every: int = arg(500, "steps between held-out evaluations (0: only at the end)")
    eval_windows: int = arg(64, "held-out windows per evaluation")
    eval_horizon: int = arg(16, "open-loop steps of the evaluation rollout")
    seed: int = arg(0, "seed of the initialisation, window draw and noise")
    device: str = arg("cpu", "torch device: cpu, cuda[:i] or auto (torchrun: cuda → cuda:LOCAL_RANK)")
    compile: bool = arg(False, "torch.compile the training model")
    threads: int = arg(0, "torch CPU threads per process (0: torch's default)")
    precision: str = arg("auto", "matmul precision of the forward passes: bf16 autocast, fp32, or auto (bf16 on "
                                 "CUDA, fp32 on CPU); bf16 also pays on CPUs with AMX (Xeon 4th gen+)",
                         choices=PRECISIONS)
    resume: bool = arg(False, "continue the run in --out from its checkpoint")


def adamw(module: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW (betas 0.9, 0.99) with decoupled weight decay on matrices only (biases, norms, gains: none); the
    fused kernel where available (~3x faster on CPU with torch >= 2.4, and on CUDA)."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99), fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99))
