"""``ditwm evaluate fidelity``: open-loop fidelity of a world model against held-out real episodes (DESIGN.md §4).

Procedure (the world model is driven only through the :class:`~dit_envs.models.world_model.WorldModel`
protocol, so the RSSM and the DiT are measured by the same code):

1. Rollout starts ``t0`` are drawn with ``--seed``, without replacement, among the rows of held-out episodes
   (:func:`trainers.data.heldout_mask`) that have ``--history`` real frames before them and ``max(--horizons)``
   after them inside one episode segment. They depend only on the store, the seed, ``--history`` and the
   horizons, so every model with ``context_len <= --history`` is measured on the same windows.
2. The ``K`` real frames before ``t0`` (with the actions that preceded them, −1 → null) are encoded with the
   model's own frozen encoder into the context; the real frames from ``t0`` on are encoded as latent targets.
3. The model is rolled open-loop with the real actions (``action[t0 + i]`` at step ``i``), all contexts in one
   batch, sampling driven by one ``torch.Generator`` seeded with ``--seed``.
4. At each horizon ``h`` (the ``h``-th imagined frame) over the contexts: latent MSE vs the encoded real frame,
   PSNR of the decoded frame vs the **real** frame (and, as a ceiling, of the decoded real latent), Pong ball
   and paddle position errors (:mod:`trainers.pong_objects`, statistics in :func:`trainers.fidelity_metrics.
   position_stats`), and reward-event precision/recall over all steps ``1..h``.
5. With ``--samples S`` > 1, ``S`` more rollouts from the same contexts (generators seeded ``seed + 1 … seed + S``)
   give the latent MSE of their per-step mean and their spread (across-sample variance). A sampler's expected
   per-sample MSE is the mean's MSE plus the spread, so this separates a model whose forecast is off from one
   whose samples are sharp but uncertain — the "double penalty" that per-sample MSE charges a sharp sampler
   against a model that predicts a blurred average (a ball drawn 5 px off costs twice a ball left out).
6. Action sensitivity: from the same contexts, constant UP (``"RIGHT"``) vs constant DOWN (``"LEFT"``) for 8
   steps with the same generator seed; the fraction of contexts whose decoded agent paddles end ≥ 2 px apart.

Outputs in ``--out``: ``fidelity.json`` (schema in :func:`trainers.fidelity_report.build_report`),
``fidelity.png`` (error vs horizon) and ``rollout.gif`` (real | imagined, a few contexts, ×3).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from trainers.common import (DTYPE_NAMES, ArgError, arg, check_choice, check_out_dir, check_sampling_shift,
                             check_temperature, dtype_arg, pick_device, run_cli, setting_arg_error)
from trainers.data import EpisodeStore, heldout_mask, segments
from trainers.fidelity_metrics import psnr, sensitivity_stats
from trainers.pong_objects import locate_pong_objects

SENSITIVITY_STEPS = 8
UP_ACTION, DOWN_ACTION = "RIGHT", "LEFT"  # Pong's minimal set: RIGHT moves the agent's paddle up, LEFT down
ENCODE_CHUNK = 256  # frames per encoder call (bounds memory for many contexts)


@dataclass(kw_only=True)
class Args:
    world_model: str = arg(help="bundle directory of the world model to evaluate (any model_type)")
    data: str = arg(help="episode store of real episodes; its held-out episodes give the start contexts")
    out: str = arg(help="output directory for fidelity.json, fidelity.png, rollout.gif (new or empty)")
    contexts: int = arg(64, "number of start contexts (fewer if the held-out episodes hold fewer windows)")
    horizons: list[int] = arg([1, 4, 16, 64], "imagined steps at which the figures are reported")
    history: int = arg(16, "real frames required before each start (>= the model's context_len)")
    seed: int = arg(0, "seed of the context draw and of the model's sampling")
    sampling_steps: int = arg(0, "denoising steps per imagined step (0: the bundle's default)")
    temperature: float | None = arg(None, "sampling temperature: std of the initial noise (default: the "
                                          "bundle's; DiT models only)")
    sampling_shift: float | None = arg(None, "time shift of the sampler's steps (default: the bundle's; DiT "
                                             "teachers only; > 1: more steps at high noise)")
    device: str = arg("cpu", "torch device of the world model (cpu, cuda, cuda:1, auto)")
    dtype: str = dtype_arg()
    gif_contexts: int = arg(4, "contexts shown in rollout.gif")
    samples: int = arg(1, "independent rollouts per context for the sample-mean MSE and spread (1: off)")
    overwrite: bool = arg(False, "write into a non-empty --out, replacing the three output files")


def select_starts(data: dict[str, np.ndarray], *, history: int, horizon: int, count: int,
                  seed: int) -> tuple[np.ndarray, int]:
    """Draw rollout start rows in held-out episodes, never crossing an episode (segment) boundary.

    Args:
        data: rows from :meth:`trainers.data.EpisodeStore.load` (sorted by episode, step).
        history: real rows required before a start (the context is taken from them).
        horizon: real rows required from the start on (the targets).
        count: number of starts wanted.
        seed: seed of the draw (numpy ``default_rng``).
    Returns:
        ``(starts, num_candidates)``: int64 ``(min(count, num_candidates),)`` row indices in draw order, and
        the number of valid start rows.
    Raises:
        ValueError: no held-out segment holds ``history + horizon`` rows (message gives the longest).
    """
    seg_start, seg_len = segments(data["episode"], data["step"])
    held = heldout_mask(data["episode"][seg_start]) if len(seg_start) else np.zeros(0, bool)
    seg_start, seg_len = seg_start[held], seg_len[held]
    n_valid = np.maximum(seg_len - history - horizon + 1, 0)
    total = int(n_valid.sum())
    if total == 0:
        longest = int(seg_len.max()) if len(seg_len) else 0
        raise ValueError(f"expected a held-out episode with >= {history + horizon} frames (history {history} + "
                         f"horizon {horizon}); the longest of {len(seg_len)} held-out episode segments has {longest}")
    rng = np.random.default_rng(seed)
    pick = rng.choice(total, size=min(count, total), replace=False)
    cum = np.cumsum(n_valid)
    seg = np.searchsorted(cum, pick, side="right")
    offset = pick - np.concatenate([[0], cum])[seg]
    return (seg_start[seg] + history + offset).astype(np.int64), total


@torch.no_grad()
def encode_frames(model, frames: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 frames ``(..., 3, 64, 64)`` → float32 latents ``(..., d_z)`` on ``device``, in chunks."""
    flat = frames.reshape(-1, *frames.shape[-3:])
    out = [model.encode(torch.from_numpy(flat[i:i + ENCODE_CHUNK]).to(device)).float()
           for i in range(0, len(flat), ENCODE_CHUNK)]
    return torch.cat(out).reshape(*frames.shape[:-3], -1)


def _positions(frames: np.ndarray) -> dict[str, np.ndarray]:
    """Locate Pong objects in uint8 ``(N, 3, 64, 64)``: ball ``(N, 2)``, agent/opponent rows ``(N,)``."""
    o = locate_pong_objects(frames)
    return {"ball": o.ball, "agent_paddle": o.agent_y, "opponent_paddle": o.opponent_y}


@torch.no_grad()
def rollout(model, z: torch.Tensor, actions: torch.Tensor, real_frames: np.ndarray, *, horizons: list[int],
            generator: torch.Generator, pong: bool, gif_contexts: int = 4,
            progress: bool = False) -> dict[str, np.ndarray]:
    """Roll ``model`` open-loop from real contexts with the real actions and record per-step errors.

    Args:
        model: a :class:`~dit_envs.models.world_model.WorldModel` (``K = model.context_len``).
        z: float32 ``(N, K + H, d_z)`` encoded real frames on the model's device: the context, then the targets.
        actions: int64 ``(N, K + H)`` action that preceded each frame (``num_actions`` = null, context only).
        real_frames: uint8 ``(N, H, 3, 64, 64)`` the real frames of the targets.
        horizons: steps (1-based, ``<= H``) at which the autoencoder ceiling PSNR is computed.
        generator: drives the model's sampling.
        pong: also locate ball and paddles (prediction and real) at every step.
        gif_contexts: how many contexts' decoded frames to keep.
    Returns:
        numpy arrays: ``latent_se (N, H)`` (mean squared latent error per context and step), ``psnr (N, H)``,
        ``reward_pred (N, H)``, ``ae_psnr`` ``(len(horizons),)`` (mean over contexts), ``gif_pred``
        uint8 ``(G, H, 3, 64, 64)``; with ``pong`` also ``pred_<obj>`` / ``real_<obj>`` ``(N, H[, 2])`` for
        ``ball``, ``agent_paddle``, ``opponent_paddle`` (NaN = not visible).
    Raises:
        ValueError: inconsistent shapes, or an invalid (null) action after the context.
    """
    K = model.context_len
    n, H = real_frames.shape[:2]
    if tuple(z.shape[:2]) != (n, K + H) or tuple(actions.shape) != (n, K + H):
        raise ValueError(f"z/actions: expected leading shape ({n}, {K + H}), got {tuple(z.shape[:2])} and "
                         f"{tuple(actions.shape)}")
    if bool((actions[:, K:] >= model.num_actions).any()):
        raise ValueError("actions: expected real actions after the context, got a null action (episode start)")
    g = min(gif_contexts, n)
    out: dict[str, np.ndarray] = {"latent_se": np.zeros((n, H)), "psnr": np.zeros((n, H)),
                                  "reward_pred": np.zeros((n, H)), "ae_psnr": np.zeros(len(horizons)),
                                  "gif_pred": np.zeros((g, H, 3, 64, 64), np.uint8)}
    if pong:
        real_pos = _positions(real_frames.reshape(n * H, 3, 64, 64))
        for k, v in real_pos.items():
            out[f"real_{k}"] = v.reshape(n, H, *v.shape[1:])
            out[f"pred_{k}"] = np.full_like(out[f"real_{k}"], np.nan)
    state = model.initial_state(z[:, :K], actions[:, :K])
    for i in tqdm(range(H), desc="fidelity rollout", disable=not (progress and sys.stderr.isatty())):
        state, z_pred, reward, _ = model.step(state, actions[:, K + i], generator)
        frames = model.decode(z_pred).cpu().numpy()
        out["latent_se"][:, i] = ((z_pred.float() - z[:, K + i]) ** 2).mean(1).cpu().numpy()
        out["psnr"][:, i] = psnr(frames, real_frames[:, i])
        out["reward_pred"][:, i] = reward.float().cpu().numpy()
        out["gif_pred"][:, i] = frames[:g]
        if pong:
            for k, v in _positions(frames).items():
                out[f"pred_{k}"][:, i] = v
        if i + 1 in horizons:
            ae_frames = model.decode(z[:, K + i]).cpu().numpy()
            out["ae_psnr"][horizons.index(i + 1)] = psnr(ae_frames, real_frames[:, i]).mean()
    return out


@torch.no_grad()
def ensemble_latent_errors(model, z: torch.Tensor, actions: torch.Tensor, *, seeds: list[int],
                           device: torch.device) -> dict[str, np.ndarray]:
    """Open-loop rollouts with the real actions, one per seed, reduced to the sample mean and spread.

    Args:
        model: a :class:`~dit_envs.models.world_model.WorldModel`; z, actions: as for :func:`rollout`
            (``(N, K + H, d_z)`` float32 and ``(N, K + H)`` int64 on ``device``).
        seeds: ``S >= 2`` generator seeds, one rollout each.
    Returns:
        float64 numpy ``(N, H)``: ``mean_se`` (squared latent error of the per-step mean of the ``S`` samples,
        averaged over latent dims) and ``spread`` (across-sample variance with ``ddof=1``, averaged over dims).
    Raises:
        ValueError: fewer than 2 seeds.
    """
    if len(seeds) < 2:
        raise ValueError(f"seeds: expected at least 2, got {len(seeds)}")
    K, H = model.context_len, z.shape[1] - model.context_len
    total = torch.zeros(z.shape[0], H, z.shape[2], dtype=torch.float64, device=device)
    total_sq = torch.zeros_like(total)
    for seed in seeds:
        gen = torch.Generator(device=device).manual_seed(int(seed))
        state = model.initial_state(z[:, :K], actions[:, :K])
        for i in range(H):
            state, z_pred, _, _ = model.step(state, actions[:, K + i], gen)
            total[:, i] += z_pred.double()
            total_sq[:, i] += z_pred.double() ** 2
    s = len(seeds)
    mean = total / s
    spread = ((total_sq - s * mean ** 2) / (s - 1)).clamp_min(0.0).mean(-1)
    mean_se = ((mean - z[:, K:].double()) ** 2).mean(-1)
    return {"mean_se": mean_se.cpu().numpy(), "spread": spread.cpu().numpy()}


@torch.no_grad()
def action_sensitivity(model, context_z: torch.Tensor, context_a: torch.Tensor, up: int, down: int, *,
                       seed: int, device: torch.device, steps: int = SENSITIVITY_STEPS) -> dict:
    """Constant ``up`` vs constant ``down`` for ``steps`` imagined steps from the same contexts.

    Both rollouts use a generator seeded with ``seed`` (common random numbers), so the difference comes from
    the action. Args: ``context_z`` float32 ``(N, K, d_z)``, ``context_a`` int64 ``(N, K)`` on ``device``.
    Returns:
        :func:`trainers.fidelity_metrics.sensitivity_stats` of the agent paddle rows, plus ``steps``.
    """
    rows = []
    for action in (up, down):
        gen = torch.Generator(device=device).manual_seed(seed)
        state = model.initial_state(context_z, context_a)
        act = torch.full((context_z.shape[0],), action, dtype=torch.int64, device=device)
        for _ in range(steps):
            state, z_next, _, _ = model.step(state, act, gen)
        rows.append(locate_pong_objects(model.decode(z_next).cpu().numpy()).agent_y)
    return {"steps": steps, **sensitivity_stats(rows[0], rows[1])}


def _validate(args: Args) -> list[int]:
    for name in ("contexts", "history", "gif_contexts", "samples"):
        if getattr(args, name) < 1:
            raise ArgError(name, f"expected an integer >= 1, got {getattr(args, name)}")
    if args.sampling_steps < 0:
        raise ArgError("sampling_steps", f"expected 0 (bundle default) or an integer >= 1, got {args.sampling_steps}")
    if not args.horizons or min(args.horizons) < 1:
        raise ArgError("horizons", f"expected one or more integers >= 1, got {args.horizons}")
    check_temperature(args.temperature)
    check_sampling_shift(args.sampling_shift)
    check_choice("dtype", args.dtype, DTYPE_NAMES)
    check_out_dir(args.out, resume=args.overwrite)
    return sorted(set(int(h) for h in args.horizons))


def _load_model(args: Args, device: torch.device):
    from dit_envs.bundle import load_bundle
    from dit_envs.envs.loading import run_dtype, set_sampling_shift, set_temperature

    try:
        bundle = load_bundle(args.world_model, device=device, dtype=run_dtype(args.dtype, device))
    except (FileNotFoundError, ValueError) as e:
        raise ArgError("world_model", f"expected a loadable bundle directory, got {args.world_model!r}: {e}") from None
    model = bundle.model
    if args.history < model.context_len:
        raise ArgError("history", f"expected >= the model's context_len {model.context_len}, got {args.history}")
    if args.sampling_steps:
        try:
            model.sampling_steps = args.sampling_steps
        except (AttributeError, ValueError) as e:
            raise ArgError("sampling_steps", f"the {bundle.config['model_type']} model refuses it: {e}") from None
    for name, setter in (("temperature", set_temperature), ("sampling_shift", set_sampling_shift)):
        if getattr(args, name) is not None:
            try:
                setter(model, getattr(args, name))
            except ValueError as e:  # a model without the setting (the RSSM), or a student refusing a shift
                raise setting_arg_error(e, name, str(e)) from None
    return bundle


def load_store(data: str, config: dict) -> dict[str, np.ndarray]:
    """Every row of the episode store ``data`` (:meth:`trainers.data.EpisodeStore.load`), for a bundle's ``config``.

    Raises:
        ArgError: ``data`` is no episode store, or its game or action meanings are not the bundle's.
    """
    store = EpisodeStore(data)
    try:
        meta = store.read_meta()
    except (FileNotFoundError, ValueError) as e:
        raise ArgError("data", f"expected an episode store directory, got {data!r}: {e}") from None
    for key in ("game", "action_meanings"):
        if meta.get(key) != config.get(key):
            raise ArgError("data", f"{key}: expected {config.get(key)!r} (the bundle's), "
                                   f"the store has {meta.get(key)!r}")
    return store.load()


def evaluate(model, config: dict, data: dict[str, np.ndarray], starts: np.ndarray, args: Args,
             horizons: list[int], device: torch.device) -> tuple[dict, dict[str, np.ndarray], np.ndarray]:
    """Measure ``model`` from the given start rows (everything but loading and writing).

    Args:
        model: any :class:`~dit_envs.models.world_model.WorldModel` on ``device``.
        config: needs ``model_type``, ``game`` and ``action_meanings`` (a bundle's ``config.json``).
        data: rows of the episode store; starts: int64 ``(N,)`` from :func:`select_starts` with
            ``history >= model.context_len``.
        horizons: sorted, unique, ``>= 1``.
    Returns:
        ``(report, res, real_gif)``: the ``fidelity.json`` document (:func:`trainers.fidelity_report.
        build_report`, with ``num_candidate_starts`` left at 0 for the caller), the :func:`rollout` arrays and
        the real frames ``(G, H, 3, 64, 64)`` matching ``res["gif_pred"]``.
    """
    from trainers.fidelity_report import build_report

    K, A, H = model.context_len, model.num_actions, horizons[-1]
    rows = starts[:, None] + np.arange(-K, H)[None]  # (N, K + H)
    frames = data["obs"][rows]  # (N, K + H, 3, 64, 64)
    actions = torch.from_numpy(np.where(data["action"][rows] < 0, A, data["action"][rows])).to(device)
    z = encode_frames(model, frames, device)  # (N, K + H, d_z)
    meanings = list(config["action_meanings"])
    pong = config["game"] == "Pong"
    gen = torch.Generator(device=device).manual_seed(args.seed)
    res = rollout(model, z, actions, frames[:, K:], horizons=horizons, generator=gen, pong=pong,
                  gif_contexts=args.gif_contexts, progress=True)
    if args.samples > 1:
        res.update(ensemble_latent_errors(model, z, actions, seeds=[args.seed + 1 + s for s in range(args.samples)],
                                          device=device))
    sens = None
    if pong and UP_ACTION in meanings and DOWN_ACTION in meanings:
        sens = action_sensitivity(model, z[:, :K], actions[:, :K], meanings.index(UP_ACTION),
                                  meanings.index(DOWN_ACTION), seed=args.seed, device=device)
        sens.update(up_action=UP_ACTION, down_action=DOWN_ACTION)
    report = build_report(
        args=args, horizons=horizons, model=model, config=config, res=res, real_reward=data["reward"][rows[:, K:]],
        starts=[{"episode": int(data["episode"][t]), "step": int(data["step"][t])} for t in starts],
        candidates=0, sensitivity=sens, device=device)
    return report, res, frames[: res["gif_pred"].shape[0], K:]


def main(args: Args) -> int:
    """Run the evaluation; every argument error is raised (as :class:`ArgError`) before anything is written."""
    from trainers.fidelity_report import format_table, write_outputs

    horizons = _validate(args)
    device = pick_device(args.device)
    bundle = _load_model(args, device)
    data = load_store(args.data, bundle.config)
    try:
        starts, candidates = select_starts(data, history=args.history, horizon=horizons[-1], count=args.contexts,
                                           seed=args.seed)
    except ValueError as e:
        raise ArgError("data", f"{e} in {args.data}") from None
    report, res, real_gif = evaluate(bundle.model, bundle.config, data, starts, args, horizons, device)
    report["num_candidate_starts"] = candidates
    if len(starts) < args.contexts:
        print(f"note: the held-out episodes of {args.data} hold {candidates} valid starts; using all of them "
              f"instead of --contexts {args.contexts}")
    out = Path(args.out)
    write_outputs(out, report, res, real_gif)
    print(format_table(report))
    print(f"wrote {out / 'fidelity.json'}, {out / 'fidelity.png'}, {out / 'rollout.gif'}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    return run_cli(Args, main, "ditwm evaluate fidelity", argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    raise SystemExit(cli())
