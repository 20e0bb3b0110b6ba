"""Convolutional branches of a one-token-per-frame DiT (``DiTConfig.conv_width``): local features of the latent grid.

A single token per time step sees the ``(C, H, W)`` latent grid only through linear maps, so a local interaction
(Pong: the ball meeting the paddle in neighbouring cells of the 8×8 grid) has to be learned cell by cell in the
MLPs. These branches add a small convolutional path beside the token's linear input and output maps, the
"convolutional stem" of hybrid vision transformers (Xiao et al. 2021, *Early Convolutions Help Transformers See
Better*; ViT's hybrid model, Dosovitskiy et al. 2021), while keeping one token per time step (the sequence stays
``K + 1`` tokens long, unlike spatial tokens):

- :class:`ConvEmbed`: latent ``(…, C·H·W)`` → conv3×3 → SiLU → conv3×3 → SiLU → flatten → linear → ``(…, D)``,
  added to the token's linear embedding;
- :class:`ConvHead`: modulated hidden state ``(…, D)`` → linear → ``(…, c, H, W)`` → SiLU → conv3×3 → SiLU →
  conv3×3 → ``(…, C·H·W)``, added to the final linear layer's velocity.

Both end in a zero-initialised layer, so a DiT that gains them (a ``--conv-width`` fine-tune of a plain DiT)
starts as exactly the plain DiT.
"""
from __future__ import annotations

import torch
from torch import nn


class ConvEmbed(nn.Module):
    """Convolutional token embedding of flat latents.

    Args:
        shape: ``(C, H, W)`` of the latent grid (flattened channel-major, the autoencoder's layout).
        channels: ``c``, the conv width. width: ``D``, the token width.
    Input ``(…, C·H·W)`` float (any number of leading dims, also empty batches); output ``(…, D)`` in the input's
    dtype, zero at initialisation (:meth:`zero_output`).
    Raises (call): RuntimeError from torch when the last dim is not ``C·H·W``.
    """

    def __init__(self, shape: tuple[int, int, int], channels: int, width: int) -> None:
        super().__init__()
        C, H, W = shape
        self.shape = (C, H, W)
        self.convs = nn.Sequential(nn.Conv2d(C, channels, 3, padding=1), nn.SiLU(),
                                   nn.Conv2d(channels, channels, 3, padding=1), nn.SiLU())
        self.out = nn.Linear(channels * H * W, width)
        self.width = width

    def zero_output(self) -> None:
        """Zero the last layer (the branch then adds nothing)."""
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Flat latents ``(…, C·H·W)`` → token embeddings ``(…, D)``."""
        lead = z.shape[:-1]
        y = self.convs(z.reshape(-1, *self.shape))  # (N, c, H, W)
        return self.out(y.flatten(1)).reshape(*lead, self.width)  # (…, D)


class ConvHead(nn.Module):
    """Convolutional output of a token: hidden ``(…, D)`` → flat latent velocity ``(…, C·H·W)``.

    Args:
        shape: ``(C, H, W)`` of the latent grid. channels: ``c``. width: ``D``.
    Input float ``(…, D)`` (any number of leading dims, also empty batches); output ``(…, C·H·W)`` channel-major in
    the input's dtype, zero at initialisation (:meth:`zero_output`).
    Raises (call): RuntimeError from torch when the last dim is not ``D``.
    """

    def __init__(self, shape: tuple[int, int, int], channels: int, width: int) -> None:
        super().__init__()
        C, H, W = shape
        self.grid, self.out_dim = (channels, H, W), C * H * W
        self.inp = nn.Linear(width, channels * H * W)
        self.convs = nn.Sequential(nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1), nn.SiLU(),
                                   nn.Conv2d(channels, C, 3, padding=1))

    def zero_output(self) -> None:
        """Zero the last conv (the branch then adds nothing)."""
        nn.init.zeros_(self.convs[-1].weight)
        nn.init.zeros_(self.convs[-1].bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states ``(…, D)`` → flat velocity contributions ``(…, C·H·W)``."""
        lead = h.shape[:-1]
        y = self.convs(self.inp(h).reshape(-1, *self.grid))  # (N, C, H, W)
        return y.flatten(1).reshape(*lead, self.out_dim)  # (…, C·H·W)
