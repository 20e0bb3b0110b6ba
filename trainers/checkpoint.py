"""Training-state checkpoints for resume (DESIGN.md §2): safetensors + JSON, atomic, manifest written last.

A checkpoint directory ``DIR/ckpt/`` holds ``state.safetensors`` (every tensor: model and optimizer states, RNG
states as uint8 tensors) and ``state.json`` (counters, numpy RNG states, optimizer hyper-parameters, configs).
Both are written with :func:`dit_envs.io.atomic_write_bytes`; ``state.json`` goes last and names the sha256 of
the tensor file it belongs to, so a crash between the two writes is detected and the previous pair is kept
readable as ``DIR/ckpt.prev/``. No pickle: optimizer states are flattened into named tensors.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from dit_envs.io import atomic_save_tensors, atomic_write_json, load_tensors, sha256_file


def optimizer_state(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten ``opt.state_dict()`` into ``{prefix.state.<param>.<key>: tensor}`` and a JSON-able remainder."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{prefix}.state.{pid}.{k}"] = v
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(opt: torch.optim.Optimizer, prefix: str, tensors: dict[str, torch.Tensor],
                         meta: dict) -> None:
    """Inverse of :func:`optimizer_state`."""
    state: dict[int, dict[str, Any]] = {}
    head = f"{prefix}.state."
    for name, v in tensors.items():
        if name.startswith(head):
            pid, k = name[len(head):].split(".", 1)
            state.setdefault(int(pid), {})[k] = v
    for pid, st in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(st)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(root: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write ``root/ckpt`` atomically (tensors, then ``state.json`` naming their sha256); keep one previous copy.

    Returns:
        The checkpoint directory.
    """
    root = Path(root)
    ckpt, prev, tmp = root / "ckpt", root / "ckpt.prev", root / "ckpt.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    atomic_save_tensors(tmp / "state.safetensors", tensors)
    atomic_write_json(tmp / "state.json", {**meta, "tensors_sha256": sha256_file(tmp / "state.safetensors")})
    if ckpt.exists():
        shutil.rmtree(prev, ignore_errors=True)
        os.replace(ckpt, prev)
    os.replace(tmp, ckpt)
    shutil.rmtree(prev, ignore_errors=True)
    return ckpt


def load_checkpoint(root: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Read the newest complete checkpoint under ``root`` (``ckpt``, else ``ckpt.prev``).

    Raises:
        FileNotFoundError: no complete checkpoint (names ``root``).
    """
    root = Path(root)
    for cand in (root / "ckpt", root / "ckpt.prev"):
        meta_path, tens_path = cand / "state.json", cand / "state.safetensors"
        if not (meta_path.is_file() and tens_path.is_file()):
            continue
        meta = json.loads(meta_path.read_text())
        if meta.get("tensors_sha256") != sha256_file(tens_path):
            continue
        return load_tensors(tens_path, device=device), meta
    raise FileNotFoundError(f"{root}: expected a training checkpoint (ckpt/state.json + state.safetensors), found none")


def rng_tensor(gen: torch.Generator) -> torch.Tensor:
    """A torch generator's state as a uint8 tensor (for safetensors)."""
    return gen.get_state().clone()
