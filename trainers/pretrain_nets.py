"""The network configs of a ``ditwm pretrain`` run: the DiT preset with the run's size flags, and the check that an
``--init`` run was trained with the same ones."""
from __future__ import annotations

from dataclasses import asdict, replace

import torch

from dit_envs.models.dit import DiTConfig
from dit_envs.models.heads import HeadsConfig
from trainers.common import ArgError


def net_configs(args, ae: torch.nn.Module, num_actions: int, context_len: int) -> tuple[DiTConfig, HeadsConfig]:
    """The DiT and reward/termination-head configs of a run (what ``--init`` and ``--resume`` must match): the
    preset's, with ``--depth``, ``--width``, ``--patch-size`` and ``--prev-source`` where given (the latent grid from
    the autoencoder); ``--conv-width`` too.

    Args:
        args: the run's :class:`trainers.pretrain.Args` (``preset``, ``depth``, ``width``, ``patch_size``,
            ``prev_source``, ``conv_width``).
        ae: the frozen :class:`~dit_envs.models.autoencoder.FrameAutoencoder` (``latent_dim``, its latent grid).
        num_actions: size of the action set. context_len: ``K``.

    Raises:
        ArgError: sizes the DiT refuses (e.g. a width the heads do not divide, a patch that does not tile the grid).
    """
    sizes = {k: getattr(args, k) for k in FLAGS if getattr(args, k)}
    if args.patch_size or args.conv_width:
        sizes["latent_shape"] = (ae.config.latent_channels, ae.config.latent_size, ae.config.latent_size)
    try:
        dcfg = DiTConfig.from_preset(args.preset, latent_dim=ae.latent_dim, num_actions=num_actions,
                                     context_len=context_len, **sizes)
    except ValueError as e:  # DiTConfig's messages start with the field; name the flag that set it
        field = str(e).split(":", 1)[0]
        raise ArgError({"heads": "width", "latent_shape": "patch_size" if args.patch_size else "conv_width"}.get(
            field, field), str(e)) from None
    return dcfg, HeadsConfig(latent_dim=ae.latent_dim, num_actions=num_actions, hidden=dcfg.width)


FLAGS = ("depth", "width", "patch_size", "prev_source", "conv_width")
"""DiTConfig fields a ``ditwm pretrain`` flag of the same name sets."""


def saved_field(saved_dit: dict | None, name: str):
    """Field ``name`` of a checkpoint's saved DiTConfig dict; one the checkpoint predates takes DiTConfig's default
    (as :func:`configs_match` reads it)."""
    return (saved_dit or {}).get(name, DiTConfig.__dataclass_fields__[name].default)


def check_init(saved: dict | None, dit: DiTConfig, heads: HeadsConfig) -> None:
    """Refuse an ``--init`` run whose saved ``{"dit": …, "heads": …}`` configs differ from this run's, except that
    conv branches (``conv_width``) may be added to a run without them (they start with a zero output).

    Raises:
        ArgError: naming the first flag of :data:`FLAGS` whose value differs (expected the init run's value), else
            ``init`` with both configs.
    """
    saved_dit = (saved or {}).get("dit")
    grows = bool(dit.conv_width) and not saved_field(saved_dit, "conv_width")
    if configs_match(saved, dit, heads) or (grows and configs_match(
            saved, replace(dit, conv_width=0, latent_shape=saved_field(saved_dit, "latent_shape")), heads)):
        return
    for name in FLAGS:
        want = saved_field(saved_dit, name)
        if want != getattr(dit, name) and not (name == "conv_width" and grows):
            raise ArgError(name, f"expected {want!r} (the --init run's), got {getattr(dit, name)!r}")
    raise ArgError("init", f"expected a run with this network config (DiT {asdict(dit)}), got {saved}")


def configs_match(saved: dict | None, dit: DiTConfig, heads: HeadsConfig) -> bool:
    """Whether a checkpoint's saved ``{"dit": …, "heads": …}`` dicts describe these configs (fields added since it
    was written take their defaults, so older runs still match)."""
    try:
        return (DiTConfig(**saved["dit"]), HeadsConfig(**saved["heads"])) == (dit, heads)
    except (KeyError, TypeError, ValueError):
        return False
