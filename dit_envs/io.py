"""Atomic file writes and safe reads (DESIGN.md §2: no pickle, nothing half-written).

Every file the package writes goes through :func:`atomic_write_bytes`: a temp file in the destination's own
directory, ``flush`` + ``fsync``, then ``os.replace`` (atomic on POSIX), then an fsync of the directory. A
reader therefore sees either the old file or the complete new one, even after SIGKILL or power loss.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from registry.hub import sha256_file  # noqa: F401  (re-exported: one implementation for the package)


_UMASK = os.umask(0)
os.umask(_UMASK)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same directory, fsync, ``os.replace``).

    Raises:
        OSError: the directory does not exist or is not writable (no partial file is left behind).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the permissions open() would
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented UTF-8 JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_tensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Save a ``{name: tensor}`` dict as safetensors, atomically. Tensors are made contiguous and moved to CPU."""
    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, save(data, metadata=metadata))


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file (never pickle).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not valid safetensors (truncated header, bad JSON, wrong sizes); the message
            names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: expected a safetensors file, found none")
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own SafetensorError for corrupt files
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e


def load_weight_files(model: torch.nn.Module, expected: dict[str, dict[str, torch.Tensor]], read) -> None:
    """Load a model's weights from several files, checking every file's tensor names and shapes first.

    Args:
        model: the freshly built module.
        expected: ``{filename: {tensor name: tensor}}`` as the model would save them (its ``weight_files()``).
        read: ``read(filename) -> {name: tensor}`` (already integrity-checked by the bundle loader).
    Raises:
        ValueError: a file with missing or unexpected tensors, or a tensor of the wrong shape (names both).
    """
    merged: dict[str, torch.Tensor] = {}
    for fname, want in expected.items():
        got = read(fname)
        missing, unexpected = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
        if missing or unexpected:
            raise ValueError(f"{fname}: expected tensors missing {missing[:5]}, unexpected {unexpected[:5]}")
        for k, v in want.items():
            if got[k].shape != v.shape:
                raise ValueError(f"{fname}: {k} expected shape {tuple(v.shape)}, actual {tuple(got[k].shape)}")
        merged.update(got)
    model.load_state_dict(merged)
