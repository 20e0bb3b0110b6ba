"""The RSSM as a :class:`~dit_envs.models.world_model.WorldModel` (stage 1 imagination, fidelity baseline).

:class:`RSSMWorldModel` wraps a trained :class:`~dit_envs.models.rssm.RSSM` and the frozen frame autoencoder so
the imagination env, the actor-critic trainer and the evaluator drive it exactly like the DiT.

State dict of this adapter (every tensor has leading dimension ``N``, valid under ``state[k][mask] = fresh[k]``):
``deter`` float32 ``(N, deter)``, ``stoch`` float32 ``(N, stoch, classes)``, ``history`` float32 ``(N, K, d_z)``
(the last ``K`` latents: the real context, then the predicted ones, oldest first).

Bundles (:mod:`dit_envs.bundle`, ``model_type "rssm"``): ``autoencoder.safetensors`` (``autoencoder.*``) and
``dynamics.safetensors`` (``rssm.*``: RSSM and its heads); ``config.json`` ``configs`` holds the
:class:`~dit_envs.models.autoencoder.AutoencoderConfig` and :class:`~dit_envs.models.rssm.RSSMConfig` dicts.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Callable

import torch
from torch import nn

from .autoencoder import AutoencoderConfig, FrameAutoencoder
from .rssm import RSSM, RSSMConfig, State
from .world_model import SamplingStepsMixin, repeat_draws
from dit_envs.io import load_weight_files

WEIGHT_FILES = ("autoencoder.safetensors", "dynamics.safetensors")


def stack_latents(z: torch.Tensor, is_first: torch.Tensor, k: int) -> torch.Tensor:
    """For every step, the window of the last ``k`` latents of the same episode, oldest first.

    Positions before the episode's first frame (or before the start of the sequence) repeat the earliest
    available frame of the episode, like Gymnasium's ``FrameStackObservation`` with ``padding_type="reset"``.
    The real-env agent wrapper must pad the same way so the policy sees identical inputs in both worlds.

    Args:
        z: float ``(B, T, d_z)``; is_first: bool ``(B, T)``; k: window length ``K`` ≥ 1.
    Returns:
        ``(B, T, K, d_z)``; ``out[:, t, -1] == z[:, t]``.
    Raises:
        ValueError: ``k`` < 1 or mismatched shapes.
    """
    if k < 1:
        raise ValueError(f"k: expected >= 1, got {k}")
    if z.dim() != 3 or is_first.shape != z.shape[:2]:
        raise ValueError(f"is_first: expected shape {tuple(z.shape[:2])} matching z (B, T, d_z) "
                         f"{tuple(z.shape)}, got {tuple(is_first.shape)}")
    b, t = z.shape[:2]
    steps = torch.arange(t, device=z.device)
    starts = torch.where(is_first, steps, torch.zeros_like(steps)).cummax(1).values  # (B, T) episode start
    idx = steps[:, None] - (k - 1) + torch.arange(k, device=z.device)  # (T, K), may be negative
    idx = torch.maximum(idx.unsqueeze(0), starts.unsqueeze(-1))  # (B, T, K), clamped to the episode start
    return z[torch.arange(b, device=z.device)[:, None, None], idx]  # (B, T, K, d_z)


class RSSMWorldModel(SamplingStepsMixin, nn.Module):
    """:class:`~dit_envs.models.world_model.WorldModel` backed by a DreamerV3 RSSM over AE latents.

    Args:
        rssm: a (trained) :class:`RSSM`; its ``latent_dim`` must equal the autoencoder's.
        autoencoder: the frozen frame autoencoder (``dit_envs.models.autoencoder.FrameAutoencoder`` or any module
            with ``encode(uint8 (N,3,64,64)) -> (N, d_z)`` and ``decode_uint8``; ``latent_dim`` checked if
            present). It becomes a submodule (moves with ``.to``); optimise ``rssm.parameters()`` only.
        context_len: ``K``, latents kept in the state (the policy's observation stack).
    Attributes:
        sampling_steps: stored in bundles like the DiT's; the RSSM draws its prior once per step whatever the
            value (an int >= 1), so env code can set it on any world model.
    Raises:
        ValueError: ``context_len`` < 1, or the autoencoder's ``latent_dim`` differs from the RSSM's.
    """

    model_type = "rssm"

    def __init__(self, rssm: RSSM, autoencoder: nn.Module, context_len: int) -> None:
        super().__init__()
        if context_len < 1:
            raise ValueError(f"context_len: expected >= 1, got {context_len}")
        ae_dim = getattr(autoencoder, "latent_dim", rssm.latent_dim)
        if ae_dim != rssm.latent_dim:
            raise ValueError(f"autoencoder.latent_dim: expected {rssm.latent_dim} (rssm.latent_dim), got {ae_dim}")
        self.rssm = rssm
        self.autoencoder = autoencoder
        self.num_actions = rssm.num_actions
        self.latent_dim = rssm.latent_dim
        self.context_len = context_len
        self.sampling_steps = 1

    # ----- bundle API (same as DiTWorldModel's) -----------------------------------------------------------------
    def configs(self) -> dict[str, dict]:
        """``{"autoencoder": AutoencoderConfig dict, "rssm": RSSMConfig dict}`` for ``config.json``.

        Raises:
            TypeError: the autoencoder is not a :class:`FrameAutoencoder` (no config to save).
        """
        if not isinstance(self.autoencoder, FrameAutoencoder):
            raise TypeError(f"autoencoder: expected a FrameAutoencoder to save in a bundle, "
                            f"got {type(self.autoencoder).__name__}")
        return {"autoencoder": asdict(self.autoencoder.config), "rssm": asdict(self.rssm.config)}

    def weight_files(self) -> dict[str, dict[str, torch.Tensor]]:
        """The state dict split into bundle files (:data:`WEIGHT_FILES`): ``{filename: {key: tensor}}``."""
        out: dict[str, dict[str, torch.Tensor]] = {f: {} for f in WEIGHT_FILES}
        for k, v in self.state_dict().items():
            out["autoencoder.safetensors" if k.startswith("autoencoder.") else "dynamics.safetensors"][k] = v
        return out

    @classmethod
    def from_bundle(cls, config: dict, read: Callable[[str], dict[str, torch.Tensor]]) -> "RSSMWorldModel":
        """Rebuild from a bundle's ``config.json`` dict and a verified-file reader (``MODEL_LOADERS["rssm"]``).

        Raises:
            ValueError: a config section or ``context_len`` that does not build, or a weight file with missing,
                unexpected or wrongly shaped tensors (message names the file and the tensor).
        """
        cfg = config.get("configs", {})
        try:
            ae, rc = AutoencoderConfig(**cfg["autoencoder"]), RSSMConfig(**cfg["rssm"])
            model = cls(RSSM.from_config(rc), FrameAutoencoder(ae), int(config["context_len"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"configs: cannot build the rssm networks from config.json ({e!r})") from e
        model.sampling_steps = config.get("sampling_steps", 1)
        load_weight_files(model, model.weight_files(), read)
        model.autoencoder.requires_grad_(False)
        return model

    # ----- WorldModel protocol ---------------------------------------------------------------------------------
    @torch.no_grad()
    def initial_state(self, context_z: torch.Tensor, context_a: torch.Tensor,
                      generator: torch.Generator | None = None) -> State:
        """Filter the real context with the RSSM posterior and keep it as the latent history.

        ``context_a[:, j]`` preceded ``context_z[:, j]``; the first step and every null action
        (``num_actions``) are treated as episode starts. With ``generator=None`` the filter takes posterior modes
        (deterministic, so a protocol-only caller gets reproducible states); with a generator it samples them.

        Args:
            context_z: float ``(N, K, d_z)``, oldest first. context_a: int64 ``(N, K)`` in ``[0, num_actions]``.
        Returns:
            state dict ``deter (N, deter)``, ``stoch (N, stoch, classes)``, ``history (N, K, d_z)``.
        Raises:
            ValueError: a shape other than ``(N, K, d_z)`` / ``(N, K)``, a non-int64 action, an action out of range.
        """
        k, d = self.context_len, self.latent_dim
        if context_z.dim() != 3 or context_z.shape[1:] != (k, d):
            raise ValueError(f"context_z: expected shape (N, {k}, {d}), got {tuple(context_z.shape)}")
        n = context_z.shape[0]
        if context_a.shape != (n, k):
            raise ValueError(f"context_a: expected shape ({n}, {k}), got {tuple(context_a.shape)}")
        if context_a.dtype != torch.int64:
            raise ValueError(f"context_a: expected dtype torch.int64, got {context_a.dtype}")
        z = context_z.float()
        is_first = context_a == self.num_actions
        is_first[:, 0] = True
        posts, _ = self.rssm.observe(self.rssm.encoder(z), context_a, is_first, generator=generator,
                                     sample=generator is not None)
        return {"deter": posts["deter"][:, -1].float().contiguous(),
                "stoch": posts["stoch"][:, -1].float().contiguous(),
                "history": z.clone()}

    @torch.no_grad()
    def step(self, state: State, action: torch.Tensor, generator: torch.Generator | None = None, draws: int = 1
             ) -> tuple[State, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Imagine one step: sample the prior with ``generator``, read the heads (no gradients).

        Args:
            state: from :meth:`initial_state` / :meth:`step` / :meth:`start_states`.
            action: int64 ``(N,)`` in ``[0, num_actions)`` taken at the newest latent of ``state``.
            generator: ``torch.Generator`` on the model's device (seeded → reproducible).
            draws: ``M`` draws per env, rows ``i·M + j`` (the state repeated: :func:`repeat_draws`).
        Returns:
            ``(next_state, z_next (N·M, d_z) float32 (decoder mean), reward (N·M,) float32 (two-hot mean),
            terminated (N·M,) bool (continue probability < 0.5))``.
        Raises:
            ValueError: ``action`` of the wrong shape/dtype or out of range; a malformed state; bad ``draws``.
        """
        n = state["history"].shape[0]
        if action.shape != (n,):
            raise ValueError(f"action: expected shape ({n},), got {tuple(action.shape)}")
        self.rssm._check_actions("action", action, allow_null=False)
        for key, shape in (("deter", (n, self.rssm.deter)), ("stoch", (n, self.rssm.stoch, self.rssm.classes))):
            if key not in state or tuple(state[key].shape) != shape:
                got = tuple(state[key].shape) if key in state else "missing"
                raise ValueError(f"state[{key!r}]: expected shape {shape}, got {got}")
        state, action = repeat_draws(state, action, draws)  # after the checks: rows i·M + j
        prior = self.rssm._img_step({"deter": state["deter"], "stoch": state["stoch"]}, action, generator)
        z_next, reward_logits, cont_logit = self.rssm.heads(prior)
        z_next = z_next.float()
        history = torch.cat([state["history"][:, 1:], z_next.unsqueeze(1)], 1)  # (N, K, d_z)
        next_state = {"deter": prior["deter"].float(), "stoch": prior["stoch"].float(), "history": history}
        reward = self.rssm.twohot.mean(reward_logits.float())
        return next_state, z_next, reward, cont_logit < 0  # logit < 0 ⇔ continue probability < 0.5

    def latent_history(self, state: State) -> torch.Tensor:
        """The last ``K`` latents ``(N, K, d_z)`` float32, oldest first."""
        return state["history"]

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents ``(N, d_z)`` → uint8 frames ``(N, 3, 64, 64)`` with the frozen decoder."""
        return self.autoencoder.decode_uint8(z)

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 frames ``(N, 3, 64, 64)`` → float32 latents ``(N, d_z)`` with the frozen encoder."""
        return self.autoencoder.encode(frames)

    @torch.no_grad()
    def start_states(self, posts: State, z: torch.Tensor, is_first: torch.Tensor) -> State:
        """Adapter states at every step of a training batch (DreamerV3 starts imagination from all posteriors).

        Args:
            posts: posteriors ``(B, T, ...)`` from ``RSSM.loss_with_posts`` / ``observe`` on the same batch.
            z: float ``(B, T, d_z)`` real latents; is_first: bool ``(B, T)``.
        Returns:
            state dict with ``N = B·T`` (row ``b·T + t`` is step ``t`` of sequence ``b``); histories from
            :func:`stack_latents`. Detached.
        Raises:
            ValueError: shapes that disagree.
        """
        if posts["deter"].shape[:2] != z.shape[:2]:
            raise ValueError(f"posts['deter']: expected leading shape {tuple(z.shape[:2])} of z, "
                             f"got {tuple(posts['deter'].shape[:2])}")
        hist = stack_latents(z.float(), is_first, self.context_len)  # (B, T, K, d_z)
        return {"deter": posts["deter"].flatten(0, 1).float().contiguous(),
                "stoch": posts["stoch"].flatten(0, 1).float().contiguous(),
                "history": hist.flatten(0, 1).contiguous()}
