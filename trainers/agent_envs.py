"""The env stage 3 trains in: a world model's imagination, or (``real:``) the real game through the same encoder.

``ditwm train-agent --world-model real:STAGE1_DIR`` runs the imagination learner unchanged on the real game, seen
through the stage-1 frozen encoder as ``K``-latent stacks (:class:`~dit_envs.envs.real_latent.RealLatentVectorEnv`):
a perfect world model. Its curve is the ceiling any world model can give that learner in the same number of
updates (measured in env steps of the real game, so such a policy is not an Atari-100k agent), which tells a
model's shortfall from the learner's. As in imagination, ``train-agent`` resets every env at the start of each
``--eval-every`` segment, so no training episode lasts more than ``eval_every · horizon`` steps (7 500 at 500 × 15).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import torch

from dit_envs.io import load_tensors
from dit_envs.models.autoencoder import FrameAutoencoder
from trainers.agent_io import AGENT_JSON, REAL_PREFIX, load_encoder, make_imagination_env, stage1_dir
from trainers.common import ArgError
from trainers.train_agent_args import Args


@dataclass
class TrainingEnv:
    """A vector env with latent observations ``(N, K, d_z)`` and SAME_STEP autoreset, and what stage 3 reads of it.

    Attributes:
        envs: the vector env. game: Atari game name. action_meanings: the game's minimal action set.
        encoder: module with ``encode(uint8 (N, 3, 64, 64)) -> float32 (N, d_z)``, the frozen encoder the
            observations come from (the world model itself, or the stage-1 autoencoder on the real game).
        bundle: the loaded world-model bundle, or None on the real game.
    """

    envs: gym.vector.VectorEnv
    game: str
    action_meanings: list[str]
    encoder: Any
    bundle: Any | None


def check_real_args(args: Any) -> None:
    """Refuse ``ditwm train-agent``'s world-model options (``args``: its ``Args``) on ``real:``: the real game has
    no sampler, start contexts or imagined episode length. Raises :class:`~trainers.common.ArgError` naming one."""
    for name in ("sampling_steps", "temperature", "sampling_shift", "episode_steps", "start_data", "dtype",
                 "keep_ball", "lost_ball_reward", "keep_ball_returns", "lost_ball_truncate", "rejection_penalty",
                 "uncertainty_penalty", "uncertainty_truncate", "uncertainty_draws", "uncertainty_quantile"):
        default = getattr(Args, name)
        if getattr(args, name) != default:
            raise ArgError(name, f"expected the default {default!r} with --world-model {REAL_PREFIX}DIR (the real "
                                 f"game has no world-model setting), got {getattr(args, name)!r}")


def make_training_env(spec: str, num_envs: int, *, device: str | torch.device = "cpu", **imagination: Any
                      ) -> TrainingEnv:
    """The env of a world-model spec (:mod:`trainers.agent_io`) or of ``real:STAGE1_DIR``.

    Args:
        spec: world-model spec, or ``real:DIR`` with ``DIR`` a stage-1 output (its autoencoder and the ``K`` and game
            of its ``agent.json``).
        num_envs: parallel envs. device: where the world model (or the encoder) runs.
        imagination: keyword options of :func:`~trainers.agent_io.make_imagination_env` (``max_episode_steps``,
            ``sampling_steps``, ``temperature``, ``dtype``, ``sampling_shift``); must all be None for ``real:``.
    Raises:
        ValueError: an imagination option given for ``real:`` (names it), or a stage-1 dir without a game or ``K``.
        FileNotFoundError / KeyError / OSError: nothing loadable at ``spec``.
    """
    if not spec.startswith(REAL_PREFIX):
        envs = make_imagination_env(spec, num_envs, device=device, **imagination)
        bundle = envs.unwrapped.bundle
        return TrainingEnv(envs, bundle.config["game"], list(bundle.config["action_meanings"]), bundle.model, bundle)
    from dit_envs.envs.real import action_meanings, make_real_env
    from dit_envs.envs.real_latent import RealLatentVectorEnv

    for name, value in imagination.items():
        if value is not None:
            raise ValueError(f"{name}: expected none for the real game (a world-model sampler setting), got {value!r}")
    d = stage1_dir(spec[len(REAL_PREFIX):])
    encoder, d_z, game = load_encoder(str(d), device=device)
    meta = json.loads((d / AGENT_JSON).read_text()) if (d / AGENT_JSON).is_file() else {}
    k = meta.get("context_len")
    if not game or not isinstance(k, int):
        raise ValueError(f"world_model: expected a stage-1 dir whose {AGENT_JSON} names the game and context_len, "
                         f"got {d} (game {game!r}, context_len {k!r})")
    envs = RealLatentVectorEnv(make_real_env(game, num_envs=num_envs), encoder, k, d_z, device)
    return TrainingEnv(envs, game, list(action_meanings(game)), encoder, None)


def _same_weights(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal after rounding both to the narrower float dtype of the two (bfloat16 before float16), so the same
    weights stored in float16 or run in bfloat16 (``--dtype``) still compare equal."""
    if a.is_floating_point() and b.is_floating_point():
        low = next((t for t in (torch.bfloat16, torch.float16) if t in (a.dtype, b.dtype)), a.dtype)
        a, b = a.to(low), b.to(low)
    return torch.equal(a.cpu(), b.cpu().to(a.dtype))


def warn_if_other_encoder(init_dir: Path, meta: dict, model: torch.nn.Module) -> None:
    """Warn (stderr) when the policy's encoder differs from the world model's: the policy would then read latents
    of another encoder than the one it was trained on. The policy's encoder is the stage-1 autoencoder in
    ``init_dir``, else the encoder of the world model recorded in its ``agent.json``; a warning also says when
    neither can be loaded."""
    ae = model if isinstance(model, FrameAutoencoder) else getattr(model, "autoencoder", None)
    if ae is None:
        return
    path = init_dir / "autoencoder.safetensors"
    try:
        if path.is_file():
            ref, where = load_tensors(path), f"the stage-1 autoencoder in {init_dir}"
        elif meta.get("world_model"):
            enc = load_encoder(str(meta["world_model"]))[0]
            other = enc if isinstance(enc, FrameAutoencoder) else getattr(enc, "autoencoder", None)
            if other is None:
                return
            ref, where = other.state_dict(), f"the encoder of {meta['world_model']} (the policy's world model)"
        else:
            return
    except (OSError, ValueError, KeyError) as e:
        print(f"ditwm train-agent: warning: init: cannot check that the policy's encoder is the world model's "
              f"({e})", file=sys.stderr)
        return
    mine = ae.state_dict()
    if ref.keys() != mine.keys() or any(not _same_weights(ref[k], mine[k]) for k in ref):
        print(f"ditwm train-agent: warning: init: {where} differs from the world model's; the policy's input "
              f"latents change meaning", file=sys.stderr)


def attach_keep_ball(envs: gym.vector.VectorEnv, max_resamples: int, lost_ball_reward: float | None,
                     phantom_returns: bool = False, truncate_lost: bool = False,
                     rejection_penalty: float = 0.0) -> None:
    """``--keep-ball R [--lost-ball-reward X] [--keep-ball-returns] [--lost-ball-truncate] [--rejection-penalty P]``:
    Pong's lost-ball rejection (:func:`trainers.pong_fates.keep_ball`) on a training env. Raises
    :class:`~trainers.common.ArgError` (naming the option) for another game, a non-imagination env, a non-finite
    reward, a penalty that is not a finite number >= 0, or a reward, returns or truncate flag or penalty without
    ``R``."""
    from trainers.pong_fates import keep_ball

    try:
        keep_ball(envs, max_resamples, lost_ball_reward, phantom_returns, truncate_lost, rejection_penalty)
    except ValueError as e:
        raise ArgError(*_keep_ball_flag(e)) from None


KEEP_BALL_FLAGS = {"envs": "keep_ball", "max_resamples": "keep_ball", "lost_ball_reward": "lost_ball_reward",
                   "phantom_returns": "keep_ball_returns", "truncate_lost": "lost_ball_truncate",
                   "rejection_penalty": "rejection_penalty"}


def _keep_ball_flag(e: ValueError) -> tuple[str, str]:
    """A :func:`trainers.pong_fates.keep_ball` error as ``(CLI field, message)``: its parameter prefix becomes the
    flag (``max_resamples`` → ``keep_ball``, ``phantom_returns`` → ``keep_ball_returns``), and parameter names in
    the message become flags."""
    param, _, msg = str(e).partition(": ")
    field = KEEP_BALL_FLAGS.get(param, "keep_ball")
    return field, msg.replace("max_resamples", "--keep-ball") if param in KEEP_BALL_FLAGS else str(e)


UNCERTAINTY_FLAGS = {"penalty": "uncertainty_penalty", "truncate": "uncertainty_truncate",
                     "draws": "uncertainty_draws", "quantile": "uncertainty_quantile"}


def check_uncertainty_args(penalty: float, draws: int, quantile: float, truncate: bool = False) -> None:
    """Check ``--uncertainty-penalty P [--uncertainty-truncate] [--uncertainty-draws M] [--uncertainty-quantile q]``
    before any model is loaded. Raises :class:`~trainers.common.ArgError` naming the option: ``P`` not a finite
    number >= 0, ``M`` < 2, ``q`` outside (0, 1), or ``M`` or ``q`` changed while the penalty is off (``P`` 0 without
    truncation)."""
    from dit_envs.envs.uncertainty import UncertaintyPenalty, check_quantile

    if not (penalty or truncate):
        for name, v in (("uncertainty_draws", draws), ("uncertainty_quantile", quantile)):
            if v != getattr(Args, name):
                raise ArgError(name, f"expected --uncertainty-penalty or --uncertainty-truncate with it, got "
                                     f"--{name.replace('_', '-')} {v} alone")
        if penalty == 0:
            return
    try:
        UncertaintyPenalty(penalty, draws, 0.0, bool(truncate))
        check_quantile(quantile)
    except ValueError as e:
        param, _, msg = str(e).partition(": ")
        raise ArgError(UNCERTAINTY_FLAGS.get(param, "uncertainty_penalty"), msg) from None


def attach_uncertainty(envs: gym.vector.VectorEnv, penalty: float, draws: int, quantile: float,
                       truncate: bool = False) -> float | None:
    """``--uncertainty-penalty P [--uncertainty-truncate] [--uncertainty-draws M] [--uncertainty-quantile q]``: the
    draw-spread penalty and/or truncation (:meth:`~dit_envs.envs.imagination.ImaginationCore.set_uncertainty_penalty`)
    on a training env; returns the calibrated threshold (None when off: ``P`` 0 without truncation). Raises
    :class:`~trainers.common.ArgError` naming the option for a bad value (:func:`check_uncertainty_args`) or for an
    env that is not imagination (``real:``)."""
    check_uncertainty_args(penalty, draws, quantile, truncate)
    on = bool(penalty) or truncate
    core = getattr(envs.unwrapped, "core", None)
    if core is None or not hasattr(core, "set_uncertainty_penalty"):
        if on:
            raise ArgError("uncertainty_truncate" if truncate and not penalty else "uncertainty_penalty",
                           f"expected an imagination env, got {type(envs.unwrapped).__name__}")
        return None
    return core.set_uncertainty_penalty(penalty, draws, quantile, truncate=truncate)


def resample_rates(envs: gym.vector.VectorEnv) -> dict[str, float]:
    """Since the last call, of the imagined env steps with a resample rule: the fraction rejected at the first
    draw (``rejected_rate``) and after the last allowed one (``still_rejected_rate``); with an uncertainty penalty
    the fraction of uncertain steps (``uncertain_rate``) and the mean draw spread (``spread_mean``); ``{}`` without
    either or without steps. Resets the env's counters."""
    core = getattr(envs.unwrapped, "core", None)
    unc = getattr(core, "uncertainty", None)
    out = unc.rates() if unc is not None else {}
    c = getattr(core, "resample_counts", None)
    if not c or not c["steps"]:
        return out
    out.update(rejected_rate=c["rejected"] / c["steps"], still_rejected_rate=c["still_rejected"] / c["steps"])
    for k in c:
        c[k] = 0
    return out
