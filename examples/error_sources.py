"""Where a world model's open-loop latent error at a long horizon comes from, split by what each rollout got wrong.

``ditwm evaluate fidelity`` reports the mean latent MSE at horizon ``h`` over held-out contexts. This script runs
the same rollouts (same start contexts for a seed, real actions, :func:`trainers.fidelity.rollout`) and splits the
contexts by what the imagined frame at ``h`` gets right on Pong:

* ``score`` — the rollout imagined as many points won and lost as the real game in steps ``1..h`` (reward events
  as in DESIGN.md §4: ``|r| >= 0.5``), so the score digits agree;
* ``ball`` — both frames show the ball within 2 px, or neither shows it (a wrong ball is split into misplaced,
  missing from the imagined frame, or extra in it, each with its mean error);
* ``agent`` / ``opponent`` — the paddle's row within 2 px (or, for the opponent, hidden in both).

For each it prints the fraction of contexts that are right, the mean error of the right and the wrong ones, and
the share of the total error that the wrong ones carry; then the same error by the step of the first real point
in the rollout (a late first point means a rally: the agent's paddle returned the ball). On the bf16 teacher at
T 0 the 39 % of rollouts that get all four right have a latent MSE at h 64 of 1.3e-4 (a tenth of the mean): the
long-horizon error is the few discrete events a rollout misses, most of them returns of the ball.

Run::

    python examples/error_sources.py --data artifacts/pong-stage1-100k            # the bundled DiTWM/Pong-v0
    python examples/error_sources.py --data runs/pong --world-model runs/dit/bundle --temperature 0 --seeds 0 1
    python examples/error_sources.py --data runs/pong --world-model runs/pong/stage1/rssm           # the RSSM
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout without install

from dit_envs.envs.loading import load_for_env  # noqa: E402
from trainers.data import EpisodeStore  # noqa: E402
from trainers.fidelity import encode_frames, rollout, select_starts  # noqa: E402
from trainers.fidelity_metrics import EVENT_THRESHOLD  # noqa: E402
from trainers.pong_objects import locate_pong_objects  # noqa: E402

FIRST_POINT_BINS = (0, 16, 32, 48)  # bins of the first real point's step; the last bin is "no point"


def _within(real: np.ndarray, pred: np.ndarray, px: float = 2.0, both_hidden_ok: bool = True) -> np.ndarray:
    """bool ``(N,)``: positions ``(N[, 2])`` within ``px`` (max over coordinates), or hidden in both frames."""
    real, pred = real.reshape(len(real), -1), pred.reshape(len(pred), -1)
    rv, pv = ~np.isnan(real[:, 0]), ~np.isnan(pred[:, 0])
    near = np.nan_to_num(np.abs(real - pred).max(1), nan=np.inf) <= px
    return (rv & pv & near) | (both_hidden_ok & ~rv & ~pv)


def classify(res: dict[str, np.ndarray], real_reward: np.ndarray, h: int,
             context_ball: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-context flags at horizon ``h`` from :func:`trainers.fidelity.rollout` arrays (``pong=True``).

    Args:
        res: the rollout's arrays; real_reward: float ``(N, H)`` real rewards of the target steps.
        context_ball: bool ``(N,)`` the ball is visible in the last context frame (default: unknown, all False).
    Returns:
        ``se`` float ``(N,)`` latent MSE at ``h``; bool ``(N,)`` ``score``, ``ball``, ``agent``, ``opponent``;
        ``first_point`` int ``(N,)``: 0-based step of the first real reward in ``1..h`` (``h`` when none);
        bool ``(N,)`` ``no_point`` (a real point, none imagined), ``ball_kept`` (the ball in the last context frame
        and the next real frame) and ``ball_dropped`` (then missing from the imagined next frame); bool ``(N,)``
        ``ball_real`` / ``ball_pred``: the ball is visible at ``h`` in the real / imagined frame.
    """
    pred = np.where(np.abs(res["reward_pred"][:, :h]) >= EVENT_THRESHOLD, np.sign(res["reward_pred"][:, :h]), 0)
    real = np.sign(real_reward[:, :h])
    score = ((pred > 0).sum(1) == (real > 0).sum(1)) & ((pred < 0).sum(1) == (real < 0).sum(1))
    i = h - 1
    ctx = np.zeros(len(real), bool) if context_ball is None else np.asarray(context_ball, bool)
    kept = ctx & ~np.isnan(res["real_ball"][:, 0, 0])
    return {
        "se": res["latent_se"][:, i], "score": score,
        "ball": _within(res["real_ball"][:, i], res["pred_ball"][:, i]),
        "agent": _within(res["real_agent_paddle"][:, i], res["pred_agent_paddle"][:, i], both_hidden_ok=False),
        "opponent": _within(res["real_opponent_paddle"][:, i], res["pred_opponent_paddle"][:, i]),
        "first_point": np.where((real != 0).any(1), (real != 0).argmax(1), h),
        "no_point": (real != 0).any(1) & ~(pred != 0).any(1),
        "ball_kept": kept, "ball_dropped": kept & np.isnan(res["pred_ball"][:, 0, 0]),
        "ball_real": ~np.isnan(res["real_ball"][:, i, 0]), "ball_pred": ~np.isnan(res["pred_ball"][:, i, 0]),
    }


def summarise(flags: dict[str, np.ndarray], h: int) -> dict:
    """Fractions, conditional mean errors and shares of the total error (see the module docstring)."""
    se, nan = flags["se"], float("nan")
    total = float(se.sum()) or 1.0
    out: dict = {"contexts": len(se), "latent_mse": float(se.mean()), "by_object": {}, "by_first_point": {}}
    for k in ("score", "ball", "agent", "opponent"):
        ok = flags[k]
        out["by_object"][k] = {"right": float(ok.mean()),
                               "mse_right": float(se[ok].mean()) if ok.any() else nan,
                               "mse_wrong": float(se[~ok].mean()) if (~ok).any() else nan,
                               "share_of_error_wrong": float(se[~ok].sum() / total)}
    all_ok = flags["score"] & flags["ball"] & flags["agent"] & flags["opponent"]
    out["all_right"] = {"fraction": float(all_ok.mean()),
                        "latent_mse": float(se[all_ok].mean()) if all_ok.any() else nan}
    wrong, real, pred = ~flags["ball"], flags["ball_real"], flags["ball_pred"]
    out["ball_wrong"] = {name: {"fraction": float(m.mean()), "latent_mse": float(se[m].mean()) if m.any() else nan}
                         for name, m in (("misplaced", wrong & real & pred), ("missing", wrong & real & ~pred),
                                         ("extra", wrong & ~real & pred))}
    kept = flags["ball_kept"]
    out["ball_dropped_at_step_1"] = {"contexts": int(kept.sum()),
                                     "fraction": float(flags["ball_dropped"][kept].mean()) if kept.any() else nan}
    out["point_missed_entirely"] = {"contexts": int(flags["no_point"].sum()),
                                    "share_of_error": float(se[flags["no_point"]].sum() / total)}
    edges = [*(b for b in FIRST_POINT_BINS if b < h), h, h + 1]
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (flags["first_point"] >= lo) & (flags["first_point"] < hi)
        name = "none" if lo == h else f"{lo}-{hi - 1}"
        out["by_first_point"][name] = {"contexts": int(m.sum()),
                                       "latent_mse": float(se[m].mean()) if m.any() else nan,
                                       "score_right": float(flags["score"][m].mean()) if m.any() else nan}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="episode store of Pong frames (its held-out episodes are used)")
    p.add_argument("--contexts", type=int, default=256, help="start contexts per seed")
    p.add_argument("--horizon", type=int, default=64, help="imagined steps")
    p.add_argument("--history", type=int, default=16, help="real rows required before a start (as the evaluator)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of the context draw and the sampling")
    p.add_argument("--world-model", default="DiTWM/Pong-v0", help="registered env id or bundle directory (DiT/RSSM)")
    p.add_argument("--sampling-steps", type=int, default=0, help="denoising steps (0: the bundle's default)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the bundle's)")
    a = p.parse_args(argv)
    for name in ("contexts", "horizon"):
        if getattr(a, name) < 1:
            p.error(f"--{name}: expected >= 1, got {getattr(a, name)}")
    env_id = a.world_model if a.world_model.startswith("DiTWM/") else None
    try:
        bundle, _ = load_for_env(env_id, None if env_id else a.world_model, sampling_steps=a.sampling_steps or None,
                                 temperature=a.temperature)
    except ValueError as e:  # e.g. a temperature for the RSSM
        p.error(f"--world-model {a.world_model}: {e}")
    model = bundle.model.eval()
    if bundle.config["game"] != "Pong":
        p.error(f"--world-model: expected a Pong model, got game {bundle.config['game']!r}")
    data = EpisodeStore(a.data).load()
    if a.history < model.context_len:
        p.error(f"--history: expected >= the model's context_len {model.context_len}, got {a.history}")
    K, A, H = model.context_len, model.num_actions, a.horizon
    parts = []
    for seed in a.seeds:
        try:
            starts, _ = select_starts(data, history=a.history, horizon=H, count=a.contexts, seed=seed)
        except ValueError as e:
            p.error(f"--data: {e}")
        rows = starts[:, None] + np.arange(-K, H)[None]
        frames = data["obs"][rows]
        actions = torch.from_numpy(np.where(data["action"][rows] < 0, A, data["action"][rows]))
        z = encode_frames(model, frames, torch.device("cpu"))
        res = rollout(model, z, actions, frames[:, K:], horizons=[H], generator=torch.Generator().manual_seed(seed),
                      pong=True, gif_contexts=0)
        context_ball = ~np.isnan(locate_pong_objects(frames[:, K - 1]).ball[:, 0])
        parts.append(classify(res, data["reward"][rows[:, K:]], H, context_ball))
    out = summarise({k: np.concatenate([f[k] for f in parts]) for k in parts[0]}, H)
    print(f"error sources at h {H} ({a.world_model}, sampling_steps {getattr(model, 'sampling_steps', None)}, "
          f"temperature {getattr(model, 'temperature', None)}, {out['contexts']} contexts): latent MSE "
          f"{out['latent_mse']:.3e}")
    for k, r in out["by_object"].items():
        print(f"  {k:>8} right in {r['right']:.2f}: MSE right {r['mse_right']:.2e}, wrong {r['mse_wrong']:.2e}; "
              f"the wrong carry {r['share_of_error_wrong']:.0%} of the error")
    r = out["all_right"]
    print(f"  all four right in {r['fraction']:.2f}: MSE {r['latent_mse']:.2e}")
    r, m = out["ball_dropped_at_step_1"], out["point_missed_entirely"]
    print(f"  ball in the last context frame and the next real one: {r['contexts']} contexts, missing from the "
          f"imagined next frame in {r['fraction']:.2f}; a real point and none imagined: {m['contexts']} contexts, "
          f"{m['share_of_error']:.0%} of the error")
    print("  ball wrong at h: " + "; ".join(f"{k} in {r['fraction']:.2f} (MSE {r['latent_mse']:.2e})"
                                            for k, r in out["ball_wrong"].items()))
    for name, r in out["by_first_point"].items():
        print(f"  first real point at step {name:>6}: {r['contexts']:4d} contexts, MSE {r['latent_mse']:.2e}, "
              f"score right {r['score_right']:.2f}")
    return out


if __name__ == "__main__":
    main()
