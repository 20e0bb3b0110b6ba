"""The DiT world model behind the :class:`~dit_envs.models.world_model.WorldModel` protocol.

One env step: the ``K`` clean context latents are standardised with the measured latent mean/std, their
per-layer keys/values are computed once (:meth:`DiT.context_cache`), and the next latent is sampled with the
rectified-flow Euler sampler (:func:`dit_envs.models.flow.sample`, ``sampling_steps`` steps from noise drawn
from the caller's ``torch.Generator``) by re-running only the single noisy token against that cache. The sample
is mapped back to autoencoder units and clamped to the encoder's ``tanh`` range ``[-1, 1]``; the reward /
termination head then reads ``(z_t, a_t, z_{t+1})``. A streaming DiT (``DiTConfig.streaming``) keeps its context
keys/values in the state instead (``"kv"``) and, after sampling, encodes only the new latent into them
(:meth:`DiT.new_token_cache`); its next latent then depends on up to ``depth·K`` latents since the last reset, more
than ``latent_history`` shows, so a state rebuilt with :meth:`initial_state` from the last ``K`` latents (a fresh
cache) continues differently from the rolled one.
"""
from __future__ import annotations

import math

from dataclasses import asdict
from typing import Callable

import torch
from torch import nn

from dit_envs.models.autoencoder import AutoencoderConfig, FrameAutoencoder
from dit_envs.models.dit import DiT, DiTConfig
from dit_envs.models.heads import HeadsConfig, RewardTermHead
from dit_envs.models.world_model import SamplingStepsMixin, State, check_draws
from dit_envs.io import load_weight_files

WEIGHT_FILES = ("autoencoder.safetensors", "dynamics.safetensors", "heads.safetensors")


def _file_of(key: str) -> str:
    """Bundle file holding a state-dict key: the autoencoder, the heads, or the dynamics (DiT + latent stats)."""
    if key.startswith("autoencoder."):
        return "autoencoder.safetensors"
    if key.startswith("heads."):
        return "heads.safetensors"
    return "dynamics.safetensors"


MAX_SAMPLING_SHIFT = 100.0  # beyond it the shifted Euler times of a few steps crowd at t = 1 in float64


class DiTWorldModel(SamplingStepsMixin, nn.Module):
    """Frozen frame autoencoder + causal DiT (rectified flow) + reward/termination head.

    Args:
        autoencoder: frozen :class:`FrameAutoencoder` (its parameters get ``requires_grad=False``).
        dit: :class:`DiT` over the autoencoder's latents, standardised.
        heads: :class:`RewardTermHead` over raw autoencoder latents.
        sampling_steps: Euler steps per env step (runtime-settable, see :attr:`sampling_steps`).
        temperature: standard deviation of the sampler's initial noise (runtime-settable, see
            :attr:`temperature`).
        sampling_shift: time shift of the sampler's steps (runtime-settable, see :attr:`sampling_shift`).
    Attributes:
        num_actions, latent_dim, context_len: as in the WorldModel protocol.
        latent_mean, latent_std: float32 ``(d_z,)`` buffers; the DiT sees ``(z − mean) / std``.
    Raises:
        ValueError: the three networks disagree on ``latent_dim`` or ``num_actions``, or a DiT with spatial tokens
            or conv branches on another ``latent_shape`` than the autoencoder's grid.
    """

    model_type = "dit"

    def __init__(
        self, autoencoder: FrameAutoencoder, dit: DiT, heads: RewardTermHead, *, sampling_steps: int = 4,
        temperature: float = 1.0, sampling_shift: float = 1.0,
    ) -> None:
        super().__init__()
        dc, hc = dit.config, heads.config
        if not autoencoder.latent_dim == dc.latent_dim == hc.latent_dim:
            raise ValueError(
                f"latent_dim: autoencoder has {autoencoder.latent_dim}, dit has {dc.latent_dim}, "
                f"heads have {hc.latent_dim}; expected all equal"
            )
        grid = (autoencoder.config.latent_channels, autoencoder.config.latent_size, autoencoder.config.latent_size)
        if (dc.patch_size or dc.conv_width) and dc.latent_shape != grid:
            raise ValueError(f"latent_shape: expected the autoencoder's latent grid {grid}, got {dc.latent_shape}")
        if dc.num_actions != hc.num_actions:
            raise ValueError(f"num_actions: dit has {dc.num_actions}, heads have {hc.num_actions}; expected equal")
        self.autoencoder = autoencoder.requires_grad_(False).eval()
        self.dit = dit
        self.heads = heads
        self.num_actions = dc.num_actions
        self.latent_dim = dc.latent_dim
        self.context_len = dc.context_len
        self.register_buffer("latent_mean", torch.zeros(dc.latent_dim))
        self.register_buffer("latent_std", torch.ones(dc.latent_dim))
        self.sampling_steps = sampling_steps
        self.temperature = temperature
        self.sampling_shift = sampling_shift

    @property
    def temperature(self) -> float:
        """Sampling temperature ``τ``: the initial noise of every sample is ``τ·ε``, ``ε ~ N(0, I)`` (with a
        previous-latent source, ``DiTConfig.prev_source = σ``, the sample starts at ``x_prev + σ·τ·ε``).

        ``τ = 1`` samples the learned distribution; ``τ < 1`` trades diversity for fidelity, as the temperature
        of Glow (Kingma & Dhariwal 2018, §6) or the truncation trick of BigGAN (Brock et al. 2019) do; ``τ = 0``
        is deterministic (the same future for every seed). Stored in bundles as ``config.json["temperature"]``.

        Raises:
            ValueError: a value that is not a finite real number >= 0 (names ``temperature`` and the value).
        """
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"temperature: expected a finite real number >= 0, got {value!r}")
        self._temperature = float(value)

    @property
    def sampling_shift(self) -> float:
        """Time shift ``s`` of the sampler's Euler steps: uniform times ``u`` map to ``s·u / (1 + (s − 1)·u)``
        (the timestep shift of SD3, Esser et al. 2024; :func:`~dit_envs.models.flow.uniform_times`). ``s = 1`` is
        uniform; ``s > 1`` spends more steps at high noise, where a sample decides what is in the frame (whether a
        few-pixel ball is there at all), fewer at low noise, where it refines; with 1 step it changes nothing.
        Measured on Pong (4 steps, T 1, random play in the bf16 teacher, ``examples/reward_rates.py --fates``): the
        ball is in 30 % of the imagined frames at ``s = 1`` and 39 % at ``s = 3`` (real game 64 %), and 12.9 / 19.4
        points are lost per 1 000 steps (real 21.5). A distilled (step-conditioned) student accepts only 1. Stored
        in bundles as ``config.json["sampling_shift"]`` (absent: 1).

        Raises:
            ValueError: a value that is not a real number in ``(0, 100]``, or not 1 for a distilled student
                (names ``sampling_shift`` and the value).
        """
        return self._sampling_shift

    @sampling_shift.setter
    def sampling_shift(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_SAMPLING_SHIFT:
            raise ValueError(f"sampling_shift: expected a real number in (0, {MAX_SAMPLING_SHIFT:g}], got {value!r}")
        if self.dit.config.shortcut_steps and value != 1.0:
            raise ValueError(f"sampling_shift: expected 1 for a distilled (step-conditioned) student, got {value!r}")
        self._sampling_shift = float(value)

    @classmethod
    def build(
        cls, autoencoder: AutoencoderConfig, dit: DiTConfig, heads: HeadsConfig, *, sampling_steps: int = 4,
        temperature: float = 1.0, sampling_shift: float = 1.0,
    ) -> "DiTWorldModel":
        """A freshly initialised model from the three configs."""
        return cls(FrameAutoencoder(autoencoder), DiT(dit), RewardTermHead(heads), sampling_steps=sampling_steps,
                   temperature=temperature, sampling_shift=sampling_shift)

    # ----- configuration ---------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.latent_mean.device

    def train(self, mode: bool = True) -> "DiTWorldModel":
        """As ``nn.Module.train`` but the frozen autoencoder always stays in eval mode."""
        super().train(mode)
        self.autoencoder.eval()
        return self

    def set_latent_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Set the standardisation buffers from float ``(d_z,)`` mean and std (std must be > 0).

        Raises:
            ValueError: wrong shape or a non-positive std.
        """
        d = self.latent_dim
        if mean.shape != (d,) or std.shape != (d,):
            raise ValueError(f"mean/std: expected shape ({d},), got {tuple(mean.shape)} and {tuple(std.shape)}")
        if not bool((std > 0).all()):
            raise ValueError(f"std: expected all > 0, got min {std.min().item()}")
        self.latent_mean.copy_(mean)
        self.latent_std.copy_(std)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Autoencoder latents ``(..., d_z)`` → standardised float32 latents the DiT diffuses."""
        return (z.float() - self.latent_mean.float()) / self.latent_std.float()

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize`, float32 ``(..., d_z)``."""
        return x.float() * self.latent_std.float() + self.latent_mean.float()

    def configs(self) -> dict[str, dict]:
        """The three network configs as plain dicts (stored in the bundle's ``config.json``)."""
        return {
            "autoencoder": asdict(self.autoencoder.config),
            "dit": asdict(self.dit.config),
            "heads": asdict(self.heads.config),
        }

    def weight_files(self) -> dict[str, dict[str, torch.Tensor]]:
        """The state dict split into bundle files: ``{filename: {key: tensor}}`` (see :data:`WEIGHT_FILES`)."""
        out: dict[str, dict[str, torch.Tensor]] = {f: {} for f in WEIGHT_FILES}
        for k, v in self.state_dict().items():
            out[_file_of(k)][k] = v
        return out

    @classmethod
    def from_bundle(cls, config: dict, read: Callable[[str], dict[str, torch.Tensor]]) -> "DiTWorldModel":
        """Rebuild a model from a bundle's ``config.json`` dict and a verified-file reader (used by
        :data:`dit_envs.bundle.MODEL_LOADERS`).

        Raises:
            ValueError: a config section that does not build, or a weight file with missing, unexpected or
                wrongly shaped tensors (message names the file and the tensor).
        """
        cfg = config.get("configs", {})
        try:
            ae, dc, hc = (
                AutoencoderConfig(**cfg["autoencoder"]), DiTConfig(**cfg["dit"]), HeadsConfig(**cfg["heads"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"configs: cannot build the networks from config.json ({e!r})") from e
        try:
            model = cls.build(ae, dc, hc, sampling_steps=config.get("sampling_steps", 4),
                              temperature=config.get("temperature", 1.0),
                              sampling_shift=config.get("sampling_shift", 1.0))
        except ValueError as e:
            raise ValueError(f"config.json: {e}") from e
        load_weight_files(model, model.weight_files(), read)
        return model

    # ----- WorldModel protocol ---------------------------------------------------------------------------------
    def initial_state(self, context_z: torch.Tensor, context_a: torch.Tensor) -> State:
        """State ``{"z": float32 (N, K, d_z), "a": int64 (N, K)}`` from a context (copied onto the model device);
        a streaming DiT adds ``"kv"``: its rolling cache, model dtype ``(N, depth, 2, heads, K, width/heads)``.

        Raises:
            ValueError: shapes other than ``(N, K, d_z)`` / ``(N, K)``, non-integer actions, or actions outside
                ``[0, num_actions]`` (``num_actions`` = null).
        """
        K, d = self.context_len, self.latent_dim
        if context_z.ndim != 3 or tuple(context_z.shape[1:]) != (K, d):
            raise ValueError(f"context_z: expected (N, {K}, {d}), got {tuple(context_z.shape)}")
        if context_a.shape != context_z.shape[:2] or context_a.dtype != torch.int64:
            raise ValueError(
                f"context_a: expected int64 ({context_z.shape[0]}, {K}), got {context_a.dtype} {tuple(context_a.shape)}"
            )
        if context_a.numel() and (int(context_a.min()) < 0 or int(context_a.max()) > self.num_actions):
            raise ValueError(
                f"context_a: expected values in [0, {self.num_actions}], "
                f"got min {int(context_a.min())}, max {int(context_a.max())}"
            )
        state = {
            "z": context_z.to(device=self.device, dtype=torch.float32).clone(),
            "a": context_a.to(self.device).clone(),
        }
        if self.dit.config.streaming:
            with torch.no_grad():
                state["kv"] = pack_cache(self.dit.context_cache(self.normalize(state["z"]), state["a"]))
        return state

    def _check_action(self, action: torch.Tensor, n: int) -> torch.Tensor:
        if not isinstance(action, torch.Tensor) or action.dtype != torch.int64 or tuple(action.shape) != (n,):
            got = f"{action.dtype} {tuple(action.shape)}" if isinstance(action, torch.Tensor) else type(action).__name__
            raise ValueError(f"action: expected int64 tensor of shape ({n},), got {got}")
        if n and (int(action.min()) < 0 or int(action.max()) >= self.num_actions):
            raise ValueError(
                f"action: expected values in [0, {self.num_actions}), got min {int(action.min())}, "
                f"max {int(action.max())}"
            )
        return action.to(self.device)

    @torch.no_grad()
    def step(
        self, state: State, action: torch.Tensor, generator: torch.Generator | None = None, draws: int = 1
    ) -> tuple[State, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Imagine one step for every env (see :class:`~dit_envs.models.world_model.WorldModel`).

        Args:
            state: ``{"z": (N, K, d_z), "a": (N, K)}`` (streaming: and ``"kv"``) from :meth:`initial_state` or
                :meth:`step`.
            action: int64 ``(N,)`` in ``[0, num_actions)``.
            generator: ``torch.Generator`` on the model's device for the initial noise (same seed → bit-identical
                results on CPU); None uses torch's global RNG.
            draws: ``M`` draws per env from one context pass: the per-layer context keys/values are computed for
                the ``N`` envs once and shared by their ``M`` rows ``i·M + j``, so the ``M − 1`` extra draws cost
                only the sampler's single-token passes (the uncertainty spread, keep-ball redraws).
        Returns:
            ``(next_state, z_next float32 (N·M, d_z), reward float32 (N·M,), terminated bool (N·M,))``;
            ``next_state`` holds new tensors (the input state is not modified).
        Raises:
            ValueError: bad ``action`` (dtype, shape or range), a malformed ``state``, a ``generator`` on another
                device, or ``draws`` not an integer >= 1.
        """
        draws = check_draws(draws)
        z, a = state["z"], state["a"]
        N = z.shape[0]
        if tuple(z.shape[1:]) != (self.context_len, self.latent_dim) or tuple(a.shape) != (N, self.context_len):
            raise ValueError(
                f"state: expected z (N, {self.context_len}, {self.latent_dim}) and a (N, {self.context_len}), "
                f"got {tuple(z.shape)} and {tuple(a.shape)}"
            )
        action = self._check_action(action, N)
        if generator is not None and generator.device.type != self.device.type:
            raise ValueError(f"generator: expected a generator on {self.device}, got one on {generator.device}")
        streaming = self.dit.config.streaming
        if streaming:
            kv = state.get("kv")
            c = self.dit.config
            shape = (N, c.depth, 2, c.heads, self.context_len, c.width // c.heads)
            if kv is None or tuple(kv.shape) != shape:
                raise ValueError(f"state['kv']: expected shape {shape} (a streaming DiT's cache), got "
                                 f"{None if kv is None else tuple(kv.shape)}")
            cache = unpack_cache(kv)
            last = self.normalize(z[:, -1]) if self.dit.config.prev_source else None  # only a prev source reads it
        else:
            x = self.normalize(z)  # (N, K, d_z)
            cache, last = self.dit.context_cache(x, a), x[:, -1]
        if draws > 1:  # one context pass for every draw: env i's keys/values serve its rows i·M .. i·M + M − 1
            rep = torch.arange(N, device=self.device).repeat_interleave(draws)
            if streaming:
                kv = kv[rep]
                cache = unpack_cache(kv)
            else:
                cache = [(k[rep], v[rep]) for k, v in cache]
            z, a, action, last = z[rep], a[rep], action[rep], None if last is None else last[rep]
            N *= draws
        noise = torch.randn(N, self.latent_dim, generator=generator, device=self.device, dtype=torch.float32)
        if self.temperature != 1.0:
            noise = noise * self.temperature
        x0 = self.dit.sample_next(noise, action, cache, self.sampling_steps, self.sampling_shift,
                                  x_prev=last)  # (N, d_z)
        z_next = self.denormalize(x0).clamp(-1.0, 1.0)  # the encoder's tanh range
        reward, terminated = self.heads.predict(z[:, -1], action, z_next)
        next_state = {
            "z": torch.cat([z[:, 1:], z_next[:, None]], dim=1),
            "a": torch.cat([a[:, 1:], action[:, None]], dim=1),
        }
        if streaming:
            new = pack_cache(self.dit.new_token_cache(cache, self.normalize(z_next), action))  # (N, depth, 2, H, 1, ·)
            next_state["kv"] = torch.cat([kv[:, :, :, :, 1:], new], dim=4)  # one copy: the window slides by one
        return next_state, z_next, reward, terminated

    def latent_history(self, state: State) -> torch.Tensor:
        """The last ``K`` latents, float32 ``(N, K, d_z)``, oldest first."""
        return state["z"]

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents float ``(N, d_z)`` → uint8 frames ``(N, 3, 64, 64)``."""
        return self.autoencoder.decode_uint8(z.to(self.device))

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 frames ``(N, 3, 64, 64)`` → float32 latents ``(N, d_z)``."""
        return self.autoencoder.encode(frames.to(self.device))


def pack_cache(cache: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """A DiT cache (per block ``(k, v)``, each ``(N, heads, L, width/heads)``) as one tensor
    ``(N, depth, 2, heads, L, width/heads)``: a state entry with leading ``N`` (valid under masked assignment)."""
    return torch.stack([torch.stack(kv, dim=1) for kv in cache], dim=1)


def unpack_cache(kv: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Inverse of :func:`pack_cache`."""
    return [(kv[:, i, 0], kv[:, i, 1]) for i in range(kv.shape[1])]
