"""Checkpoint bundles (DESIGN.md §2): one directory in Hugging Face model-repo layout.

```
<bundle>/
  config.json                  plain JSON: format_version, model_type, game, action space, shapes, configs,
                               and ``files: {filename: sha256}`` of every weight file
  autoencoder.safetensors      frozen encoder/decoder
  dynamics.safetensors         DiT + latent mean/std buffers
  heads.safetensors            reward/termination head (DiT; an RSSM keeps its heads in dynamics.safetensors)
  start_contexts.safetensors   z float32 (M, K, d_z), a int64 (M, K): real start contexts
  README.md                    model card (YAML front matter + text)
```

No pickle anywhere: weights are safetensors, the rest JSON/Markdown. Every weight file is checked against its
sha256 in ``config.json`` before it is parsed (safetensors itself does not detect bit flips). Models are built by
``MODEL_LOADERS[config["model_type"]]`` so other model families (e.g. an RSSM) plug in with one dict entry; a
model to be saved provides ``model_type``, ``num_actions``, ``latent_dim``, ``context_len``, ``sampling_steps``,
``configs()`` and ``weight_files()``, and may provide a sampling ``temperature`` (see
:class:`~dit_envs.models.dit_world_model.DiTWorldModel`).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from dit_envs.io import atomic_save_tensors, atomic_write_bytes, atomic_write_json, load_tensors, sha256_file
from dit_envs.models.dit_world_model import DiTWorldModel
from dit_envs.models.rssm_world_model import RSSMWorldModel

FORMAT_VERSION = 1
OBS_SHAPE = [3, 64, 64]
START_CONTEXTS = "start_contexts.safetensors"

Reader = Callable[[str], dict[str, torch.Tensor]]
MODEL_LOADERS: dict[str, Callable[[dict, Reader], nn.Module]] = {
    "dit": DiTWorldModel.from_bundle,
    "rssm": RSSMWorldModel.from_bundle,
}
"""``model_type`` → ``loader(config_dict, read) -> model``; ``read(filename)`` returns the verified tensors."""

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Bundle:
    """A loaded bundle.

    Attributes:
        model: the world model (eval mode) on the requested device and dtype.
        start_z: float32 ``(M, K, d_z)`` real start-context latents (on the device).
        start_a: int64 ``(M, K)`` actions preceding them (``num_actions`` = null).
        config: the parsed ``config.json``.
        path: the bundle directory.
    """

    model: nn.Module
    start_z: torch.Tensor
    start_a: torch.Tensor
    config: dict[str, Any]
    path: Path


def _model_card(config: dict, card: str) -> str:
    game = config["game"]
    front = "\n".join(
        [
            "---",
            "library_name: dit-wm",
            "license: mit",
            "pipeline_tag: reinforcement-learning",
            "tags:",
            *[f"- {t}" for t in ("world-model", "diffusion-transformer", "gymnasium", "atari", game.lower())],
            "---",
        ]
    )
    d = config["configs"].get("dit", {})
    body = (
        f"# DiT-WM world model of {game}\n\n"
        f"A `{config['model_type']}` world model served as a Gymnasium env by `dit_envs`.\n\n"
        f"| field | value |\n| --- | --- |\n"
        f"| actions | {config['num_actions']}: {', '.join(config['action_meanings'])} |\n"
        f"| observation | uint8 {tuple(config['obs_shape'])} |\n"
        f"| latent_dim | {config['latent_dim']} |\n"
        f"| context_len | {config['context_len']} |\n"
        f"| sampling_steps | {config['sampling_steps']} |\n"
        + (f"| temperature | {config['temperature']:g} |\n" if "temperature" in config else "")
        + (f"| sampling_shift | {config['sampling_shift']:g} |\n" if "sampling_shift" in config else "")
        + f"| DiT width x depth | {d.get('width', '-')} x {d.get('depth', '-')} |\n"
        f"| weights dtype | {config['dtype']} |\n"
        f"| start contexts | {config['num_start_contexts']} |\n"
    )
    return f"{front}\n{body}\n{card.strip()}\n" if card.strip() else f"{front}\n{body}"


def save_bundle(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    game: str,
    action_meanings: list[str],
    start_z: torch.Tensor,
    start_a: torch.Tensor,
    card: str = "",
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> Path:
    """Write a bundle directory atomically.

    Every file is written atomically into a temp directory beside ``out_dir`` (``config.json`` last), which is
    then renamed into place; an existing bundle is moved aside first and removed after the rename.

    Args:
        model: e.g. a :class:`DiTWorldModel`.
        out_dir: destination directory.
        game: game name, e.g. ``"Pong"``.
        action_meanings: one name per action (``len == model.num_actions``).
        start_z: float ``(M, K, d_z)`` real start-context latents, M ≥ 1 (stored float32).
        start_a: int64 ``(M, K)`` in ``[0, num_actions]``.
        card: extra Markdown appended to the model card (measured figures, data, training).
        dtype: storage dtype of floating parameters (float32, float16 or bfloat16); buffers keep theirs.
        overwrite: replace an existing non-empty ``out_dir``.
    Returns:
        ``Path(out_dir)``.
    Raises:
        FileExistsError: ``out_dir`` is non-empty and ``overwrite`` is False.
        ValueError: inconsistent ``action_meanings``, start contexts or ``dtype`` (message names the argument).
    """
    out = Path(out_dir)
    A, K, d = model.num_actions, model.context_len, model.latent_dim
    if len(action_meanings) != A:
        raise ValueError(f"action_meanings: expected {A} names, got {len(action_meanings)}")
    if start_z.ndim != 3 or start_z.shape[0] < 1 or tuple(start_z.shape[1:]) != (K, d):
        raise ValueError(f"start_z: expected (M, {K}, {d}) with M >= 1, got {tuple(start_z.shape)}")
    if start_a.dtype != torch.int64 or tuple(start_a.shape) != tuple(start_z.shape[:2]):
        raise ValueError(
            f"start_a: expected int64 {tuple(start_z.shape[:2])}, got {start_a.dtype} {tuple(start_a.shape)}"
        )
    if int(start_a.min()) < 0 or int(start_a.max()) > A:
        lo, hi = int(start_a.min()), int(start_a.max())
        raise ValueError(f"start_a: expected values in [0, {A}], got min {lo}, max {hi}")
    names = {v: k for k, v in _DTYPES.items()}
    if dtype not in names:
        raise ValueError(f"dtype: expected one of {sorted(_DTYPES)}, got {dtype}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"out_dir: {out} exists and is not empty (pass overwrite=True to replace it)")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        files: dict[str, str] = {}
        params = {name for name, _ in model.named_parameters()}  # buffers (e.g. latent stats) stay as they are
        for fname, tensors in model.weight_files().items():
            tensors = {k: (v.to(dtype) if k in params and v.is_floating_point() else v) for k, v in tensors.items()}
            atomic_save_tensors(tmp / fname, tensors, metadata={"format": "pt"})
            files[fname] = sha256_file(tmp / fname)
        starts = {"z": start_z.detach().float(), "a": start_a.detach()}
        atomic_save_tensors(tmp / START_CONTEXTS, starts, metadata={"format": "pt"})
        files[START_CONTEXTS] = sha256_file(tmp / START_CONTEXTS)
        config = {
            "format_version": FORMAT_VERSION,
            "model_type": model.model_type,
            "game": game,
            "num_actions": A,
            "action_meanings": list(action_meanings),
            "obs_shape": list(OBS_SHAPE),
            "latent_dim": d,
            "context_len": K,
            "sampling_steps": model.sampling_steps,
            **({"temperature": model.temperature} if hasattr(model, "temperature") else {}),
            **({"sampling_shift": model.sampling_shift} if getattr(model, "sampling_shift", 1.0) != 1.0 else {}),
            "dtype": names[dtype],
            "num_start_contexts": int(start_z.shape[0]),
            "configs": model.configs(),
            "files": files,
        }
        atomic_write_bytes(tmp / "README.md", _model_card(config, card).encode())
        atomic_write_json(tmp / "config.json", config)
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / "bundle")
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_expect(config: dict, expect: dict[str, Any]) -> None:
    for key, want in expect.items():
        if key not in config:
            raise ValueError(f"{key}: the env expects {want!r}, the bundle's config.json has no such field")
        have = config[key]
        same = list(have) == list(want) if isinstance(want, (list, tuple)) and isinstance(have, list) else have == want
        if not same:
            raise ValueError(f"{key}: bundle has {have!r}, env expects {want!r}")


def load_bundle(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    expect: dict[str, Any] | None = None,
) -> Bundle:
    """Load and validate a bundle.

    Args:
        path: the bundle directory.
        device: where to put the model and start contexts.
        dtype: floating dtype of the model; None → float32 whatever the storage dtype.
        expect: fields the caller requires, e.g. ``dict(game="Pong", num_actions=6, obs_shape=(3, 64, 64),
            latent_dim=256)``; compared with ``config.json`` before any weight is read.
    Returns:
        :class:`Bundle` with the model in eval mode.
    Raises:
        FileNotFoundError: no directory, no ``config.json`` or a listed weight file is missing.
        ValueError: with a message naming the field or file, the expected and the actual value, for bad JSON,
            unknown ``format_version`` / ``model_type``, an ``expect`` mismatch, a sha256 mismatch (bit flips,
            truncation), an unreadable safetensors file, tensors of the wrong names/shapes, or start contexts
            inconsistent with the model.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: expected a bundle directory, found none")
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"config.json: expected in {root}, not found")
    try:
        config = json.loads(cfg_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"config.json: expected valid JSON in {root}, got {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"config.json: expected a JSON object, got {type(config).__name__}")
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"format_version: bundle has {config.get('format_version')!r}, expected {FORMAT_VERSION}")
    model_type = config.get("model_type")
    if model_type not in MODEL_LOADERS:
        raise ValueError(f"model_type: bundle has {model_type!r}, expected one of {sorted(MODEL_LOADERS)}")
    _check_expect(config, expect or {})
    files = config.get("files")
    if not isinstance(files, dict):
        raise ValueError("files: expected a {filename: sha256} object in config.json, got none")
    for fname, digest in files.items():
        if Path(fname).name != fname or fname in (".", ".."):
            raise ValueError(f"files: expected plain file names in config.json, got {fname!r}")
        if not (root / fname).is_file():
            raise FileNotFoundError(f"{fname}: listed in config.json, not found in {root}")
        actual = sha256_file(root / fname)
        if actual != digest:
            raise ValueError(f"{fname}: sha256 expected {digest} (config.json), actual {actual}")

    def read(fname: str) -> dict[str, torch.Tensor]:
        if fname not in files:
            raise ValueError(f"{fname}: expected in config.json 'files', not listed")
        return load_tensors(root / fname)

    model = MODEL_LOADERS[model_type](config, read)
    for key in ("num_actions", "latent_dim", "context_len"):
        if getattr(model, key) != config.get(key):
            raise ValueError(
                f"{key}: config.json has {config.get(key)!r}, the weights' configs give {getattr(model, key)}"
            )
    model = model.to(device=device, dtype=dtype or torch.float32).eval()

    starts = read(START_CONTEXTS)
    z, a = starts.get("z"), starts.get("a")
    K, d, A = model.context_len, model.latent_dim, model.num_actions
    if z is None or z.ndim != 3 or tuple(z.shape[1:]) != (K, d) or z.shape[0] < 1:
        raise ValueError(f"{START_CONTEXTS}: z expected (M, {K}, {d}), actual {None if z is None else tuple(z.shape)}")
    if a is None or a.dtype != torch.int64 or tuple(a.shape) != tuple(z.shape[:2]):
        got = None if a is None else f"{a.dtype} {tuple(a.shape)}"
        raise ValueError(f"{START_CONTEXTS}: a expected int64 {tuple(z.shape[:2])}, actual {got}")
    if int(a.min()) < 0 or int(a.max()) > A:
        lo, hi = int(a.min()), int(a.max())
        raise ValueError(f"{START_CONTEXTS}: a expected values in [0, {A}], actual min {lo}, max {hi}")
    return Bundle(model=model, start_z=z.float().to(device), start_a=a.to(device), config=config, path=root)
