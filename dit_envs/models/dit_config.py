"""Sizes of :class:`~dit_envs.models.dit.DiT` (:class:`DiTConfig`, saved in every bundle as plain JSON) and its
presets; see :mod:`dit_envs.models.dit` for what each option does."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DiTConfig:
    """Sizes of :class:`DiT` (saved inside every bundle as plain JSON).

    Attributes:
        latent_dim: ``d_z``, size of one latent.
        num_actions: size of the action set; the embedding tables have ``num_actions + 1`` rows (null action).
        context_len: ``K`` clean context time steps; the model handles sequences of up to ``K + 1`` time steps.
        width: ``D``, token width.
        depth: number of transformer blocks.
        heads: attention heads (``width`` must be divisible by it).
        mlp_ratio: MLP hidden width / ``D``.
        freq_dim: size of the sinusoidal noise-level features.
        action_cond: also add an action embedding to the adaLN conditioning (besides the token input).
        shortcut_steps: ``N`` of a distilled student's step-size conditioning (0: none, a plain flow model).
        streaming: each token attends to itself and the ``context_len`` tokens before it, with relative positions
            (see the module docstring): a rolling cache, one new context token per env step.
        patch_size: ``p`` of spatial tokens (see the module docstring); 0: one token per time step.
        latent_shape: ``(C, H, W)`` of the latent grid, flattened channel-major to ``d_z`` (the autoencoder's
            layout); required with ``patch_size > 0`` or ``conv_width > 0``, else ignored.
        conv_width: ``c`` of the convolutional branches beside a one-token step's linear input and output maps
            (:mod:`dit_envs.models.dit_conv`); 0: none.
        prev_source: ``σ`` of the flow's source: 0 is rectified flow's ``N(0, I)``; ``σ > 0`` starts the flow
            of latent ``i`` at the one before it plus noise, ``x_{i−1} + σ·ε`` (standardised units; see the
            module docstring of :mod:`dit_envs.models.dit`).
    Raises:
        ValueError: a non-positive size, a negative or non-finite ``prev_source``, ``width`` not divisible by
            ``heads``, or with ``patch_size > 0`` a ``latent_shape`` that is missing, not ``d_z`` elements or not
            divisible into ``p × p`` patches, or ``streaming`` (windows of single tokens); ``conv_width > 0``
            with spatial tokens or without a ``latent_shape`` of ``d_z`` elements.
    """

    latent_dim: int
    num_actions: int
    context_len: int = 4
    width: int = 256
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    freq_dim: int = 256
    action_cond: bool = True
    shortcut_steps: int = 0
    streaming: bool = False
    patch_size: int = 0
    latent_shape: tuple[int, int, int] | None = None
    prev_source: float = 0.0
    conv_width: int = 0

    def __post_init__(self) -> None:
        for name in ("latent_dim", "num_actions", "context_len", "width", "depth", "heads", "freq_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.shortcut_steps < 0:
            raise ValueError(f"shortcut_steps: expected >= 0, got {self.shortcut_steps}")
        ps = self.prev_source
        if isinstance(ps, bool) or not isinstance(ps, (int, float)) or not 0.0 <= ps < float("inf"):  # NaN too
            raise ValueError(f"prev_source: expected a finite number >= 0, got {self.prev_source}")
        if self.width % self.heads:
            raise ValueError(f"heads: expected a divisor of width={self.width}, got {self.heads}")
        if self.latent_shape is not None:
            self.latent_shape = tuple(int(s) for s in self.latent_shape)  # a JSON list reloads as a tuple
        if self.conv_width < 0:
            raise ValueError(f"conv_width: expected >= 0, got {self.conv_width}")
        if self.patch_size < 0:
            raise ValueError(f"patch_size: expected >= 0, got {self.patch_size}")
        if self.conv_width and self.patch_size:
            raise ValueError(f"conv_width: expected 0 with spatial tokens (patch_size {self.patch_size}), got "
                             f"{self.conv_width}")
        shape = self.latent_shape
        if (self.patch_size or self.conv_width) and (
                shape is None or len(shape) != 3 or shape[0] * shape[1] * shape[2] != self.latent_dim):
            raise ValueError(f"latent_shape: expected (C, H, W) with C*H*W = latent_dim = {self.latent_dim}, "
                             f"got {shape}")
        if self.patch_size:
            p = self.patch_size
            if shape[1] % p or shape[2] % p:
                raise ValueError(f"patch_size: expected a divisor of the latent grid {shape[1]}x{shape[2]}, got {p}")
            if self.streaming:
                raise ValueError(f"streaming: expected False with patch_size {p} (windows hold single tokens), "
                                 f"got True")

    @property
    def frame_tokens(self) -> int:
        """``G``, tokens per time step: ``(H/p)·(W/p)`` with spatial tokens, else 1."""
        if not self.patch_size:
            return 1
        return (self.latent_shape[1] // self.patch_size) * (self.latent_shape[2] // self.patch_size)

    @property
    def token_dim(self) -> int:
        """Latent elements per token: ``C·p²`` with spatial tokens, else ``d_z``."""
        return self.latent_dim // self.frame_tokens

    @property
    def seq_len(self) -> int:
        """Longest sequence the model takes: ``context_len + 1``."""
        return self.context_len + 1

    @classmethod
    def from_preset(
        cls, name: str, *, latent_dim: int, num_actions: int, context_len: int = 4, **overrides
    ) -> "DiTConfig":
        """Config of preset ``name`` (a key of :data:`DIT_PRESETS`) for a given latent/action space.

        Raises:
            KeyError: unknown preset (message lists the known ones).
        """
        if name not in DIT_PRESETS:
            raise KeyError(f"preset: expected one of {sorted(DIT_PRESETS)}, got {name!r}")
        kw = {**DIT_PRESETS[name], **overrides}
        return cls(latent_dim=latent_dim, num_actions=num_actions, context_len=context_len, **kw)


DIT_PRESETS: dict[str, dict] = {
    "tiny": dict(width=32, depth=2, heads=2, freq_dim=32),  # tests
    "S": dict(width=256, depth=4, heads=4),  # default: Pong on CPU
    "B": dict(width=384, depth=8, heads=6),
    "L": dict(width=512, depth=12, heads=8),
}
