"""Files of stage 3: policy directories (``agent.safetensors`` + ``agent.json``), world models and encoders.

A *policy directory* holds a :class:`~trainers.agent.ActorCritic` exactly as stage 1 exports it
(:mod:`trainers.stage1_cli`): ``agent.safetensors`` (its ``state_dict``: actor, critic, slow critic, return
normaliser) and ``agent.json`` = ``{"agent": AgentConfig dict, "context_len": K, "game": ..., "action_meanings":
[...], ...}`` (stage 3 adds ``world_model``, ``init`` and ``updates``). The policy's input is the flattened stack
of the last ``K`` latents of the frozen encoder it was trained with (``obs_dim = K·d_z``).

A *world-model spec* (``--world-model``) is one of: a registered env id ``DiTWM/<Game>-v<k>``; a bundle directory,
``hf://org/repo@<commit>`` or ``bundled:<name>`` source; or ``rssm:DIR`` with ``DIR`` a stage-1 output (``DIR/rssm``
or ``DIR/stage1/rssm`` is the RSSM bundle). Every model type a bundle may hold runs through the same vector env.
Stage 3 also takes ``real:DIR``: the real game seen through the stage-1 encoder of ``DIR`` (:mod:`trainers.agent_envs`).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import gymnasium as gym
import torch

import registry
from registry.catalog import ENV_ID_RE
from dit_envs.io import atomic_save_tensors, atomic_write_json, load_tensors
from trainers.agent import ActorCritic, AgentConfig

AGENT_WEIGHTS, AGENT_JSON = "agent.safetensors", "agent.json"
RSSM_PREFIX = "rssm:"
REAL_PREFIX = "real:"  # the real game seen through a stage-1 encoder (trainers.agent_envs)


def stage1_dir(path: str | os.PathLike) -> Path:
    """The stage-1 artifact directory of ``path``: ``path`` itself or ``path/stage1`` (``ditwm collect`` OUT).

    Raises:
        FileNotFoundError: neither holds ``autoencoder.json`` nor ``agent.json`` (names the path).
    """
    p = Path(path).expanduser()
    for cand in (p, p / "stage1"):
        if (cand / "autoencoder.json").is_file() or (cand / AGENT_JSON).is_file():
            return cand
    raise FileNotFoundError(f"{p}: expected stage-1 artifacts (agent.json, autoencoder.json) in it or in "
                            f"{p / 'stage1'}, found none")


def save_agent(ac: ActorCritic, out_dir: str | os.PathLike, *, context_len: int, game: str,
               action_meanings: list[str], **extra: Any) -> Path:
    """Write ``out_dir/agent.safetensors`` then ``out_dir/agent.json`` (both atomic; JSON last).

    Args:
        ac: the actor-critic. context_len: ``K`` of its input stack. game, action_meanings: the real game.
        extra: more JSON-able fields for ``agent.json`` (e.g. ``world_model``, ``updates``).
    Returns:
        ``Path(out_dir)``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(out / AGENT_WEIGHTS, ac.state_dict())
    atomic_write_json(out / AGENT_JSON, {"agent": dataclasses.asdict(ac.config), "context_len": int(context_len),
                                         "game": game, "action_meanings": list(action_meanings), **extra})
    return out


def load_agent(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[ActorCritic, dict]:
    """Load a policy directory (stage 1's ``OUT/stage1``, or a ``train-agent`` ``--out``).

    Returns:
        ``(actor_critic in eval mode on device, agent.json dict)``.
    Raises:
        FileNotFoundError: ``agent.json`` or ``agent.safetensors`` missing (names the file).
        ValueError: malformed ``agent.json`` (names the field) or weights that do not fit its config.
    """
    p = Path(path).expanduser()
    meta_path = p / AGENT_JSON
    if not meta_path.is_file() or not (p / AGENT_WEIGHTS).is_file():
        raise FileNotFoundError(f"{p}: expected a policy directory with {AGENT_JSON} and {AGENT_WEIGHTS}")
    try:
        meta = json.loads(meta_path.read_text())
        config = AgentConfig(**meta["agent"])
        k = int(meta["context_len"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{meta_path}: expected JSON with 'agent' (AgentConfig fields) and 'context_len', "
                         f"got {e!r}") from e
    if k < 1 or config.obs_dim % k:
        raise ValueError(f"context_len: expected a divisor of agent.obs_dim={config.obs_dim}, got {k}")
    ac = ActorCritic(config)
    try:
        ac.load_state_dict(load_tensors(p / AGENT_WEIGHTS))
    except RuntimeError as e:
        raise ValueError(f"{p / AGENT_WEIGHTS}: tensors do not fit the config in {AGENT_JSON} ({e})") from e
    return ac.to(device).eval(), meta


def resolve_world_model(spec: str) -> tuple[str | None, Path]:
    """Resolve a world-model spec to ``(registered env id or None, local bundle directory)``.

    A bundle given by path gets the env id of the catalog entry of its game (so ``gym.make_vec`` checks game and
    action count), or None when no entry plays that game.

    Raises:
        ValueError: an empty spec or an ``rssm:`` directory without an RSSM bundle.
        FileNotFoundError / KeyError / registry.IntegrityError: from resolving the source.
    """
    if not spec:
        raise ValueError("expected an env id, a bundle directory or rssm:STAGE1_DIR, got ''")
    if spec.startswith(RSSM_PREFIX):
        base = Path(spec[len(RSSM_PREFIX):]).expanduser()
        for cand in (base / "rssm", base / "stage1" / "rssm", base):
            if (cand / "config.json").is_file():
                path = cand
                break
        else:
            raise FileNotFoundError(f"{base}: expected a stage-1 output with an RSSM bundle (rssm/config.json or "
                                    f"stage1/rssm/config.json), found none")
    elif ENV_ID_RE.fullmatch(spec) and not Path(spec).exists():
        entry = registry.get(spec)
        return entry.env_id, registry.resolve(entry)
    else:
        path = registry.resolve(spec)
    try:
        game = json.loads((path / "config.json").read_text()).get("game")
    except (OSError, ValueError):
        game = None  # load_bundle reports a broken config.json with the field named
    env_id = next((e.env_id for e in registry.entries() if e.game == game), None)
    return env_id, path


def make_imagination_env(spec: str, num_envs: int, *, device: str | torch.device = "cpu",
                         max_episode_steps: int | None = None, sampling_steps: int | None = None,
                         temperature: float | None = None, dtype: str | None = None,
                         sampling_shift: float | None = None) -> gym.vector.VectorEnv:
    """The natively batched imagination env of a world-model spec with latent observations.

    ``gym.make_vec(env_id, obs_type="latent", checkpoint=bundle_dir, ...)`` when the bundle's game has a catalog
    id, else :class:`~dit_envs.envs.imagination.DiTWMVectorEnv` directly. Observations: float32
    ``(num_envs, K, d_z)``; autoreset SAME_STEP. ``dtype``: the env's float dtype option (None: float32);
    ``sampling_steps`` / ``temperature`` / ``sampling_shift``: the sampler's (None or 0 steps: the bundle's).

    Raises:
        ValueError, FileNotFoundError, KeyError: from :func:`resolve_world_model` and bundle loading.
    """
    import dit_envs  # noqa: F401  (registers the DiTWM ids)
    from dit_envs.envs.imagination import DiTWMVectorEnv

    env_id, path = resolve_world_model(spec)
    kw: dict[str, Any] = dict(obs_type="latent", checkpoint=str(path), device=device,
                              sampling_steps=sampling_steps or None, temperature=temperature, dtype=dtype,
                              sampling_shift=sampling_shift)
    if max_episode_steps:
        kw["max_episode_steps"] = max_episode_steps
    if env_id is not None:
        return gym.make_vec(env_id, num_envs=num_envs, **kw)
    return DiTWMVectorEnv(num_envs, **kw)


def load_encoder(spec: str, device: str | torch.device = "cpu") -> tuple[Any, int, str | None]:
    """The frozen frame encoder of a world-model spec, of a stage-1 directory or of ``real:STAGE1_DIR``.

    Returns:
        ``(module with encode(uint8 (N,3,64,64)) -> float32 (N, d_z), d_z, game or None)``.
    Raises:
        FileNotFoundError / ValueError / KeyError: nothing loadable at ``spec`` (the message names it).
    """
    from dit_envs.bundle import load_bundle
    from dit_envs.models.autoencoder import AutoencoderConfig, FrameAutoencoder

    real = spec.startswith(REAL_PREFIX)  # a policy trained on the real game read a stage-1 encoder
    p = Path(spec.removeprefix(REAL_PREFIX)).expanduser()
    if real or (not spec.startswith(RSSM_PREFIX) and p.is_dir() and not (p / "config.json").is_file()):
        d = stage1_dir(p)
        cfg_path = d / "autoencoder.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{d}: expected autoencoder.json + autoencoder.safetensors, found none")
        try:
            ae = FrameAutoencoder(AutoencoderConfig(**json.loads(cfg_path.read_text())))
            ae.load_state_dict(load_tensors(d / "autoencoder.safetensors"))
        except (json.JSONDecodeError, TypeError, RuntimeError) as e:
            raise ValueError(f"{cfg_path}: cannot rebuild the autoencoder ({e})") from e
        game = None
        if (d / AGENT_JSON).is_file():
            game = json.loads((d / AGENT_JSON).read_text()).get("game")
        return ae.to(device).eval().requires_grad_(False), ae.latent_dim, game
    _, path = resolve_world_model(spec)
    bundle = load_bundle(path, device=device)
    return bundle.model, int(bundle.model.latent_dim), bundle.config.get("game")


def evaluation_encoder(spec: str, encoder: Any, device: str | torch.device = "cpu") -> Any:
    """The encoder real-game evaluations read frames with: the world model's own (``encoder``, loaded from the
    world-model spec ``spec``) when it runs in float32, else a float32 copy loaded again by :func:`load_encoder`.

    A frame encoded in bfloat16 differs enough to change a greedy Pong policy's play: ``A/agents/ppo1_best`` scored
    −17.0 ± 4.1 on 10 games through the bfloat16 encoder and −10.8 ± 10.0 on the same games through the float32 one
    (``A/eval/iterate_rounds.txt``).
    """
    params = list(encoder.parameters()) if isinstance(encoder, torch.nn.Module) else []
    if all(p.dtype == torch.float32 for p in params):
        return encoder
    return load_encoder(spec, device)[0]
