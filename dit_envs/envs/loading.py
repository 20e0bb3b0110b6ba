"""Resolve an env id / checkpoint argument to a loaded, validated bundle (registry → bundle → model)."""
from __future__ import annotations

from typing import Any

import torch

import registry
from dit_envs.envs.real import action_meanings

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = ("auto", *DTYPES)
"""Accepted names of the envs' ``dtype`` option (and of the CLIs' ``--dtype``)."""


def fast_dtype(device: str | torch.device) -> torch.dtype:
    """The float dtype ``dtype="auto"`` picks on ``device``: bfloat16 where matmuls run natively in it, else float32.

    bfloat16 on CUDA devices of compute capability >= 8 (Ampere and later) and on CPUs with AMX tiles (Intel
    Xeon 4th generation and later, where oneDNN runs bf16 matmuls on AMX: on 2 such cores the shipped Pong model
    imagines 1.5-1.6 x (256 envs) and 1.7 x (1 024 envs) more env steps/s than in float32); float32 elsewhere,
    where bfloat16 only saves memory. (float16, the bundles' storage dtype, computes at about float32 speed on CPU.)
    """
    dev = torch.device(device)
    if dev.type == "cuda":  # native bf16 tensor cores from compute capability 8 (Ampere); older GPUs emulate it
        return torch.bfloat16 if torch.cuda.get_device_capability(dev)[0] >= 8 else torch.float32
    if dev.type == "cpu":
        amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private probe, absent in some builds
        try:
            return torch.bfloat16 if amx is not None and amx() else torch.float32
        except RuntimeError:
            return torch.float32
    return torch.float32


def run_dtype(dtype: torch.dtype | str | None, device: str | torch.device = "cpu") -> torch.dtype | None:
    """Resolve an env's ``dtype`` option: None stays None (float32), a name of :data:`DTYPES` or a torch dtype
    is taken as is, ``"auto"`` becomes :func:`fast_dtype` of ``device``.

    Raises:
        ValueError: any other value (the message names ``dtype`` and the accepted names).
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return fast_dtype(device)
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(DTYPE_NAMES)} or a torch.dtype, got {dtype!r}")
    return DTYPES[dtype]


def _set_sampler_setting(model: Any, name: str, what: str, value: float) -> None:
    """``setattr(model, name, value)``, validated by the model; ValueError naming ``name`` and the model type where
    the model has no such setting (the RSSM has neither a temperature nor a time shift)."""
    if not hasattr(model, name):
        raise ValueError(f"{name}: the {getattr(model, 'model_type', type(model).__name__)} model has no {what}, "
                         f"got {value!r}")
    setattr(model, name, value)


def set_temperature(model: Any, value: float) -> None:
    """Set ``model.temperature`` (validated by the model).

    Raises:
        ValueError: the model has no sampling temperature (names its ``model_type``), or a bad value.
    """
    _set_sampler_setting(model, "temperature", "sampling temperature", value)


def set_sampling_shift(model: Any, value: float) -> None:
    """Set ``model.sampling_shift``, the time shift of a DiT's sampler steps (validated by the model).

    Raises:
        ValueError: the model has no sampler time shift (names its ``model_type``), or a bad value.
    """
    _set_sampler_setting(model, "sampling_shift", "sampler time shift", value)


def load_for_env(env_id: str | None, checkpoint: Any = None, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype | str | None = None, sampling_steps: int | None = None,
                 temperature: float | None = None, sampling_shift: float | None = None, allow_unpinned: bool = False,
                 **expect: Any) -> tuple[Any, int]:
    """Load the bundle an env should run and check it against what the env id promises.

    Args:
        env_id: a registered id (``"DiTWM/Pong-v0"``) or None (then ``checkpoint`` is required).
        checkpoint: overrides the id's catalog source: a bundle directory, ``hf://org/repo@<commit>`` or
            ``bundled:<name>``.
        device, dtype: where and in which float dtype the model runs: None runs float32 whatever the storage;
            ``"auto"`` picks :func:`fast_dtype` of ``device`` (bfloat16 on AMX CPUs and bf16 GPUs).
        sampling_steps: denoising steps per env step (>= 1); None keeps the bundle's default.
        temperature: sampling temperature (finite, >= 0; a model without one, like the RSSM, accepts only None);
            None keeps the bundle's default.
        sampling_shift: time shift of the sampler's steps (finite, > 0; 1 for a distilled student; a model
            without one accepts only None); None keeps the bundle's default.
        allow_unpinned: accept an ``hf://`` source that names a branch instead of a 40-hex commit.
        expect: extra fields the bundle must match (``latent_dim``, ``obs_shape``, ...).
    Returns:
        ``(bundle, max_episode_steps)`` — the :class:`dit_envs.bundle.Bundle` and the id's truncation horizon.
    Raises:
        ValueError: no ``env_id`` and no ``checkpoint``; a bundle field that disagrees with the id (names it);
            bad ``dtype``/``sampling_steps``/``temperature``/``sampling_shift``. FileNotFoundError /
            registry.IntegrityError from resolving.
    """
    from dit_envs.bundle import load_bundle

    entry = registry.get(env_id) if env_id is not None else None
    if entry is None and checkpoint is None:
        raise ValueError("checkpoint: expected a bundle directory or hf:// source when no env id is given, got None")
    if checkpoint is None:
        path = registry.resolve(entry, allow_unpinned=allow_unpinned)
    else:
        path = registry.resolve(checkpoint, allow_unpinned=allow_unpinned)
    want: dict[str, Any] = {"obs_shape": [3, 64, 64]}
    if entry is not None:
        want.update(game=entry.game, num_actions=len(action_meanings(entry.game)))
    want.update(expect)
    bundle = load_bundle(path, device=device, dtype=run_dtype(dtype, device), expect=want)
    if sampling_steps is not None:
        bundle.model.sampling_steps = sampling_steps
    if temperature is not None:
        set_temperature(bundle.model, temperature)
    if sampling_shift is not None:
        set_sampling_shift(bundle.model, sampling_shift)
    horizon = entry.max_episode_steps if entry is not None else 1000
    return bundle, horizon
