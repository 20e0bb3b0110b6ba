"""Deterministic convolutional frame autoencoder: uint8 frames ``(N, 3, 64, 64)`` ↔ flat latents ``(N, d_z)``.

The latent is a small spatial grid ``(latent_channels, latent_size, latent_size)`` flattened channel-major to
``d_z = latent_channels · latent_size²``, the space the DiT world model diffuses in (latent diffusion, Rombach
et al. 2022, here without the KL term: stage 2 only needs a frozen, deterministic code).

Latent scale. The encoder ends in ``tanh``, so every latent lies in ``(-1, 1)``: bounded, roughly unit scale
and immune to the slow drift of an unregularised AE. A small penalty on the pre-``tanh`` activations
(``pre_tanh_penalty``) keeps units out of saturation, where ``tanh`` would stop passing gradient. The world
model standardises latents further with measured mean/std buffers before diffusion.

Small objects. Pong's ball is about one pixel at 64×64; a plain MSE lets the decoder erase it at almost no
cost. :meth:`FrameAutoencoder.loss` therefore up-weights every pixel whose colour differs from the frame's most
common colour (the background) by ``foreground_weight``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AutoencoderConfig:
    """Sizes of :class:`FrameAutoencoder` (saved inside every bundle as plain JSON).

    Attributes:
        image_size: side of the square input frame in pixels (64).
        in_channels: image channels (3, RGB).
        base_channels: conv width at full resolution; doubles at each downsampling up to ``max_channels``.
        max_channels: cap on the conv width.
        latent_channels: channels of the latent grid.
        latent_size: spatial side of the latent grid; ``image_size / latent_size`` must be a power of two ≥ 2.
        res_blocks: residual blocks per resolution level below full resolution (none at full resolution, to
            keep decoding 256 frames per env step cheap on CPU).
        foreground_weight: loss weight of non-background pixels (background pixels weigh 1).
        pre_tanh_penalty: weight of the mean squared pre-``tanh`` activation in the loss.
    Raises:
        ValueError: a size that does not give an integer number of 2× downsamplings.
    """

    image_size: int = 64
    in_channels: int = 3
    base_channels: int = 16
    max_channels: int = 128
    latent_channels: int = 4
    latent_size: int = 8
    res_blocks: int = 1
    foreground_weight: float = 20.0
    pre_tanh_penalty: float = 1e-3

    def __post_init__(self) -> None:
        ratio = self.image_size / self.latent_size if self.latent_size > 0 else 0
        if ratio < 2 or ratio != int(ratio) or (int(ratio) & (int(ratio) - 1)):
            raise ValueError(
                f"latent_size: expected image_size/latent_size to be a power of two >= 2, "
                f"got image_size={self.image_size}, latent_size={self.latent_size}"
            )

    @property
    def num_down(self) -> int:
        """Number of 2× downsamplings from ``image_size`` to ``latent_size``."""
        return int(round(math.log2(self.image_size // self.latent_size)))

    @property
    def latent_dim(self) -> int:
        """``d_z = latent_channels · latent_size²``."""
        return self.latent_channels * self.latent_size**2

    def channels(self) -> list[int]:
        """Conv width at each resolution level, full resolution first (``num_down + 1`` entries)."""
        return [min(self.base_channels * 2**i, self.max_channels) for i in range(self.num_down + 1)]


AUTOENCODER_PRESETS: dict[str, AutoencoderConfig] = {
    # tests: d_z = 2·4·4 = 32
    "tiny": AutoencoderConfig(base_channels=8, max_channels=16, latent_channels=2, latent_size=4, res_blocks=0),
    # 64×64 Pong on CPU: d_z = 4·8·8 = 256
    "base": AutoencoderConfig(base_channels=16, max_channels=128, latent_channels=4, latent_size=8),
    # more latent capacity: d_z = 8·8·8 = 512
    "large": AutoencoderConfig(base_channels=32, max_channels=256, latent_channels=8, latent_size=8, res_blocks=2),
}


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, ch), ch)


class _ResBlock(nn.Module):
    """Pre-norm residual block: ``x + conv(silu(norm(conv(silu(norm(x))))))``, shape-preserving."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(ch), nn.Conv2d(ch, ch, 3, padding=1)
        self.norm2, self.conv2 = _norm(ch), nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C, H, W)
        return x + self.conv2(F.silu(self.norm2(h)))  # (B, C, H, W)


def background_mask(frames: torch.Tensor) -> torch.Tensor:
    """Pixels that have the frame's most common colour.

    Args:
        frames: uint8 ``(N, 3, H, W)``.
    Returns:
        bool ``(N, H, W)``, True on background pixels (ties for the mode are broken by ``torch.mode``).
    """
    f = frames.long()
    code = (f[:, 0] << 16) | (f[:, 1] << 8) | f[:, 2]  # (N, H, W) one integer per RGB colour
    mode = code.flatten(1).mode(dim=1).values  # (N,)
    return code == mode[:, None, None]


class FrameAutoencoder(nn.Module):
    """Deterministic conv autoencoder with a ``tanh``-bounded latent grid (see module docstring).

    Args:
        config: :class:`AutoencoderConfig`.
    Attributes:
        latent_dim: ``d_z``.
    """

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        self.config = config
        self.latent_dim = config.latent_dim
        ch = config.channels()
        r = config.res_blocks
        # Residual blocks only below full resolution: a block at 64×64 costs as much as all others together.
        enc: list[nn.Module] = [nn.Conv2d(config.in_channels, ch[0], 3, padding=1)]
        for i in range(config.num_down):
            enc += [_ResBlock(ch[i]) for _ in range(r if i > 0 else 0)]
            enc.append(nn.Conv2d(ch[i], ch[i + 1], 4, stride=2, padding=1))
        enc += [_ResBlock(ch[-1]) for _ in range(r)]
        enc += [_norm(ch[-1]), nn.SiLU(), nn.Conv2d(ch[-1], config.latent_channels, 1)]
        self.encoder = nn.Sequential(*enc)

        dec: list[nn.Module] = [nn.Conv2d(config.latent_channels, ch[-1], 3, padding=1)]
        dec += [_ResBlock(ch[-1]) for _ in range(r)]
        for i in reversed(range(config.num_down)):  # transposed conv: 2.5× faster than upsample + conv on CPU
            dec.append(nn.ConvTranspose2d(ch[i + 1], ch[i], 4, stride=2, padding=1))
            dec += [_ResBlock(ch[i]) for _ in range(r if i > 0 else 0)]
        dec += [_norm(ch[0]), nn.SiLU(), nn.Conv2d(ch[0], config.in_channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    def _check_frames(self, frames: torch.Tensor) -> None:
        c = self.config
        expected = (c.in_channels, c.image_size, c.image_size)
        if frames.dtype != torch.uint8 or frames.ndim != 4 or tuple(frames.shape[1:]) != expected:
            raise ValueError(
                f"frames: expected uint8 (N, {', '.join(map(str, expected))}), "
                f"got {frames.dtype} {tuple(frames.shape)}"
            )

    def _pre_tanh(self, frames: torch.Tensor) -> torch.Tensor:
        dtype = next(self.parameters()).dtype
        x = frames.to(dtype) / 127.5 - 1.0  # (N, C, H, W) in [-1, 1]
        return self.encoder(x)  # (N, c_z, h, w)

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames → latents.

        Args:
            frames: uint8 ``(N, 3, 64, 64)`` on the model's device.
        Returns:
            float32 ``(N, d_z)`` in ``(-1, 1)``, the latent grid flattened channel-major.
        Raises:
            ValueError: wrong dtype or shape (message names ``frames``).
        """
        self._check_frames(frames)
        return torch.tanh(self._pre_tanh(frames)).flatten(1).float()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents → float images.

        Args:
            z: float ``(N, d_z)``.
        Returns:
            float ``(N, 3, 64, 64)`` in ``[0, 1]`` (model dtype).
        Raises:
            ValueError: ``z`` is not ``(N, d_z)``.
        """
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"z: expected (N, {self.latent_dim}), got {tuple(z.shape)}")
        c = self.config
        dtype = next(self.parameters()).dtype
        grid = z.to(dtype).reshape(-1, c.latent_channels, c.latent_size, c.latent_size)
        return torch.sigmoid(self.decoder(grid))

    def decode_uint8(self, z: torch.Tensor) -> torch.Tensor:
        """Latents ``(N, d_z)`` → uint8 frames ``(N, 3, 64, 64)`` (rounded, values 0..255)."""
        return (self.decode(z).float() * 255.0).round().clamp(0, 255).to(torch.uint8)

    def loss(self, frames: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Foreground-weighted reconstruction loss of a batch.

        ``loss = Σ w·‖x̂ − x‖² / Σ w + pre_tanh_penalty · mean(h²)`` with ``x`` in ``[0, 1]``, the squared error
        summed over RGB, ``w = 1`` on background pixels (:func:`background_mask`) and ``foreground_weight``
        elsewhere, ``h`` the pre-``tanh`` latent.

        Args:
            frames: uint8 ``(N, 3, 64, 64)``.
        Returns:
            ``(loss scalar tensor, metrics)`` with metrics ``loss``, ``recon`` (weighted), ``mse`` (plain,
            per channel), ``fg_mse`` (per channel on foreground pixels), ``psnr`` (dB) and ``latent_abs``.
        Raises:
            ValueError: wrong dtype or shape of ``frames``.
        """
        self._check_frames(frames)
        h = self._pre_tanh(frames)  # (N, c_z, h, w)
        z = torch.tanh(h)
        recon = torch.sigmoid(self.decoder(z)).float()  # (N, C, H, W)
        target = frames.float() / 255.0
        err = (recon - target).square().sum(1)  # (N, H, W)
        fg = ~background_mask(frames)
        w = torch.where(fg, self.config.foreground_weight, 1.0)
        rec = (w * err).sum() / w.sum()
        loss = rec + self.config.pre_tanh_penalty * h.float().square().mean()
        with torch.no_grad():
            mse = err.mean() / frames.shape[1]
            fg_mse = (err * fg).sum() / fg.sum().clamp(min=1) / frames.shape[1]
            metrics = {
                "loss": loss.item(),
                "recon": rec.item(),
                "mse": mse.item(),
                "fg_mse": fg_mse.item(),
                "psnr": (-10.0 * torch.log10(mse.clamp(min=1e-10))).item(),
                "latent_abs": z.abs().mean().item(),
            }
        return loss, metrics
