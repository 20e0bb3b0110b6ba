"""Report of ``ditwm evaluate fidelity``: the JSON document, the printed table, the PNG plot and the GIF."""
from __future__ import annotations

import io
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dit_envs.io import atomic_write_bytes, atomic_write_json
from trainers.fidelity_metrics import EVENT_THRESHOLD, MAX_PSNR, num, position_stats, reward_event_stats

FORMAT_VERSION = 1
OBJECTS = ("ball", "agent_paddle", "opponent_paddle")
GIF_SCALE = 3

DEFINITIONS = {
    "horizon": "h-th imagined frame of an open-loop rollout with the real actions, from a real context",
    "latent_mse": "mean over contexts and latent dims of (predicted latent - encoded real frame)^2 at step h",
    "psnr": f"mean over contexts of the PSNR (dB, peak 255, capped at {MAX_PSNR:g}) of the decoded prediction "
            "vs the real frame at step h",
    "autoencoder_psnr": "the same for the decoded encoded real frame: the ceiling set by the frozen autoencoder",
    "objects": "Pong objects located by colour (trainers.pong_objects) at step h; error = distance in px (ball) "
               "or row difference (paddles) over frames where the object is visible in the real frame and "
               "found in the prediction; miss_rate = real-visible frames where the prediction lacks it; "
               "ghost_rate = real-invisible frames where the prediction shows it",
    "reward": f"events: real reward != 0, predicted |reward| >= {EVENT_THRESHOLD:g}; a match = same context, "
              "same step, same sign; counted over all steps 1..h",
    "ensemble": "with --samples S > 1: latent_mse_of_mean = latent MSE at step h of the mean of S more rollouts "
                "(generator seeds seed+1..seed+S), sample_spread = their across-sample latent variance (ddof 1) "
                "averaged over contexts and dims; per-sample MSE ~ latent_mse_of_mean + sample_spread",
    "action_sensitivity": "constant UP (RIGHT) vs DOWN (LEFT) for `steps` steps from the same contexts and "
                          "generator seed; fraction of contexts whose decoded agent paddles end >= 2 px apart",
}


def _per_step_median(pred: np.ndarray, real: np.ndarray) -> list[float | None]:
    """Median over contexts of the position error at each step (None where no context has both)."""
    p = pred.reshape(*pred.shape[:2], -1)
    r = real.reshape(*real.shape[:2], -1)
    err = np.sqrt(((p - r) ** 2).sum(-1))  # (N, H), NaN where either is missing
    out = []
    for col in err.T:
        col = col[~np.isnan(col)]
        out.append(num(np.median(col)) if len(col) else None)
    return out


def build_report(*, args: Any, horizons: list[int], model: Any, config: dict, res: dict[str, np.ndarray],
                 real_reward: np.ndarray, starts: list[dict[str, int]], candidates: int, sensitivity: dict | None,
                 device: torch.device) -> dict[str, Any]:
    """The ``fidelity.json`` document.

    Schema (``None`` = undefined, e.g. no event / not Pong)::

        format_version 1, evaluation "fidelity", world_model (abs path), model_type, game, data (abs path),
        args {CLI args}, device, context_len, latent_dim, sampling_steps, temperature and sampling_shift (None if
        the model has none),
        num_contexts, num_candidate_starts, starts [{episode, step}] (first imagined row of each context),
        horizons [{horizon, latent_mse, psnr, autoencoder_psnr,
                   ensemble {samples, latent_mse_of_mean, sample_spread} | None,
                   reward {real_events, predicted_events, matched, precision, recall},
                   ball / agent_paddle / opponent_paddle {visible, miss_rate, ghost_rate, median_px,
                                                          within_2px, within_3px} | None}],
        per_step {latent_mse [H], psnr [H], ball_median_px [H] | None, agent_paddle_median_px [H] | None},
        action_sensitivity {steps, contexts, fraction_apart, fraction_correct_direction, paddle_missing_rate,
                            mean_down_minus_up_px, up_action, down_action} | None,
        definitions {name: text}

    Args:
        args: the CLI :class:`trainers.fidelity.Args`; horizons: sorted unique steps.
        model: the world model (``context_len``, ``latent_dim``, optional ``sampling_steps`` are read).
        config: the bundle's ``config.json`` (``model_type``, ``game``).
        res: from :func:`trainers.fidelity.rollout` (plus ``mean_se``/``spread`` (N, H) from
            :func:`trainers.fidelity.ensemble_latent_errors` when ``args.samples > 1``); real_reward: float
            ``(N, H)`` real rewards of the targets.
        starts: ``{episode, step}`` of each context's first imagined row; candidates: valid start rows.
        sensitivity: from :func:`trainers.fidelity.action_sensitivity` or None.
    """
    pong = "real_ball" in res
    rows = []
    for j, h in enumerate(horizons):
        row: dict[str, Any] = {
            "horizon": h,
            "latent_mse": num(res["latent_se"][:, h - 1].mean()),
            "psnr": num(res["psnr"][:, h - 1].mean()),
            "autoencoder_psnr": num(res["ae_psnr"][j]),
            "ensemble": ({"samples": int(args.samples), "latent_mse_of_mean": num(res["mean_se"][:, h - 1].mean()),
                          "sample_spread": num(res["spread"][:, h - 1].mean())} if "mean_se" in res else None),
            "reward": reward_event_stats(res["reward_pred"][:, :h], real_reward[:, :h]),
        }
        for obj in OBJECTS:
            row[obj] = position_stats(res[f"pred_{obj}"][:, h - 1], res[f"real_{obj}"][:, h - 1]) if pong else None
        rows.append(row)
    per_step = {
        "latent_mse": [num(x) for x in res["latent_se"].mean(0)],
        "psnr": [num(x) for x in res["psnr"].mean(0)],
        "ball_median_px": _per_step_median(res["pred_ball"], res["real_ball"]) if pong else None,
        "agent_paddle_median_px": (_per_step_median(res["pred_agent_paddle"], res["real_agent_paddle"])
                                   if pong else None),
    }
    return {
        "format_version": FORMAT_VERSION,
        "evaluation": "fidelity",
        "world_model": str(Path(args.world_model).resolve()),
        "model_type": config["model_type"],
        "game": config["game"],
        "data": str(Path(args.data).resolve()),
        "args": asdict(args),
        "device": str(device),
        "context_len": int(model.context_len),
        "latent_dim": int(model.latent_dim),
        "sampling_steps": getattr(model, "sampling_steps", None),
        "temperature": getattr(model, "temperature", None),
        "sampling_shift": getattr(model, "sampling_shift", None),
        "num_contexts": len(starts),
        "num_candidate_starts": int(candidates),
        "starts": starts,
        "horizons": rows,
        "per_step": per_step,
        "action_sensitivity": sensitivity,
        "definitions": DEFINITIONS,
    }


def _f(x: float | None, fmt: str) -> str:
    """``x`` formatted with ``fmt`` (e.g. ``"7.2f"``), or ``-`` right-aligned to the same width for None."""
    return f"{'-':>{int(fmt.split('.')[0] or 1)}}" if x is None else format(x, fmt)


def format_table(report: dict[str, Any]) -> str:
    """A compact plain-text table of the report (one row per horizon, then action sensitivity)."""
    lines = [f"fidelity  {report['model_type']}  {report['world_model']}  contexts={report['num_contexts']}  "
             f"K={report['context_len']}  sampling_steps={report['sampling_steps']}  "
             f"temperature={report.get('temperature')}  sampling_shift={report.get('sampling_shift')}",
             f"{'h':>4} {'latMSE':>9} {'PSNR':>6} {'(AE)':>6} | {'ball px':>7} {'<=2px':>5} {'miss':>5} | "
             f"{'paddle':>6} {'<=2px':>5} {'miss':>5} | {'rew P':>5} {'rew R':>5} {'events':>6}"]
    for r in report["horizons"]:
        b, p, w = r["ball"] or {}, r["agent_paddle"] or {}, r["reward"]
        lines.append(
            f"{r['horizon']:>4} {_f(r['latent_mse'], '9.2e')} {_f(r['psnr'], '6.2f')} "
            f"{_f(r['autoencoder_psnr'], '6.2f')}"
            f" | {_f(b.get('median_px'), '7.2f')} {_f(b.get('within_2px'), '5.2f')} {_f(b.get('miss_rate'), '5.2f')}"
            f" | {_f(p.get('median_px'), '6.2f')} {_f(p.get('within_2px'), '5.2f')} {_f(p.get('miss_rate'), '5.2f')}"
            f" | {_f(w['precision'], '5.2f')} {_f(w['recall'], '5.2f')} {w['real_events']:>6}")
    ens = [r for r in report["horizons"] if r.get("ensemble")]
    if ens:
        lines.append(f"mean of {ens[0]['ensemble']['samples']} samples, latent MSE | spread at h: " + ", ".join(
            f"{r['horizon']}: {_f(r['ensemble']['latent_mse_of_mean'], '.2e')} | "
            f"{_f(r['ensemble']['sample_spread'], '.2e')}" for r in ens))
    s = report["action_sensitivity"]
    if s is not None:
        lines.append(f"action sensitivity ({s['steps']} steps UP vs DOWN): "
                     f"apart >= 2 px {_f(s['fraction_apart'], '.2f')}, "
                     f"right direction {_f(s['fraction_correct_direction'], '.2f')}, "
                     f"paddle missing {_f(s['paddle_missing_rate'], '.2f')}")
    return "\n".join(lines)


def plot_png(report: dict[str, Any]) -> bytes:
    """PNG bytes: latent MSE, PSNR and object error against the imagined step, horizons marked."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend

    ps = report["per_step"]
    steps = np.arange(1, len(ps["latent_mse"]) + 1)
    hs = [r["horizon"] for r in report["horizons"]]

    def arr(xs):
        return np.array([np.nan if x is None else x for x in xs], dtype=float)

    fig = Figure(figsize=(13, 3.8), layout="constrained")
    axes = fig.subplots(1, 3)
    panels = [("latent MSE", arr(ps["latent_mse"]), None), ("PSNR (dB) vs real frames", arr(ps["psnr"]),
              [r["autoencoder_psnr"] for r in report["horizons"]])]
    for ax, (title, y, ceiling) in zip(axes, panels):
        ax.plot(steps, y, color="C0", label="imagined")
        ax.plot(hs, y[np.array(hs) - 1], "o", color="C0")
        if ceiling is not None:
            ax.plot(hs, arr(ceiling), "s--", color="C2", label="autoencoder ceiling")
            ax.legend(fontsize=8)
        ax.set_title(title)
    ax = axes[2]
    if ps["ball_median_px"] is not None:
        if all(x is None for x in ps["ball_median_px"] + ps["agent_paddle_median_px"]):
            ax.text(0.5, 0.5, "no object found in both frames", ha="center", transform=ax.transAxes)
        ax.plot(steps, arr(ps["ball_median_px"]), color="C1", label="ball (median px)")
        ax.plot(steps, arr(ps["agent_paddle_median_px"]), color="C3", label="agent paddle (median px)")
        ax.axhline(2.0, color="gray", lw=0.8, ls=":")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, f"no object locator for {report['game']}", ha="center", transform=ax.transAxes)
    ax.set_title("object position error (px)")
    for ax in axes:
        ax.set_xlabel("imagined step")
        if len(steps) >= 8:
            ax.set_xscale("log", base=2)
        ax.set_xlim(0.9, len(steps) * 1.1)  # explicit: an all-NaN series gives no limits to log-scale
        ax.grid(alpha=0.3)
    fig.suptitle(f"{report['game']} {report['model_type']} world model, {report['num_contexts']} held-out contexts")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def rollout_gif(real: np.ndarray, pred: np.ndarray, scale: int = GIF_SCALE, frame_ms: int = 120) -> bytes:
    """GIF bytes: per imagined step one frame showing, per context, the real frame | the imagined frame.

    Args:
        real, pred: uint8 ``(G, H, 3, 64, 64)``.
        scale: nearest-neighbour upscaling factor.
    Raises:
        ValueError: shapes differ or ``G == 0``.
    """
    from PIL import Image, ImageDraw

    if real.shape != pred.shape or real.shape[0] == 0:
        raise ValueError(f"pred: expected the shape of real {real.shape} with G >= 1, got {pred.shape}")
    G, H = real.shape[:2]
    side, gap, top = 64 * scale, 4, 14
    pair = np.stack([real, pred], axis=2)  # (G, H, 2, 3, 64, 64)
    pair = pair.transpose(1, 0, 4, 2, 5, 3).repeat(scale, 2).repeat(scale, 4)  # (H, G, side, 2, side, 3)
    images = []
    for i in range(H):
        canvas = np.full((top + G * (side + gap), 2 * side + 3 * gap, 3), 40, np.uint8)
        for c in range(G):
            y = top + c * (side + gap)
            canvas[y:y + side, gap:gap + side] = pair[i, c, :, 0]
            canvas[y:y + side, 2 * gap + side:2 * gap + 2 * side] = pair[i, c, :, 1]
        img = Image.fromarray(canvas)
        draw = ImageDraw.Draw(img)
        draw.text((gap, 1), "real", fill=(255, 255, 255))
        draw.text((2 * gap + side, 1), f"imagined  t+{i + 1}", fill=(255, 255, 255))
        images.append(img.quantize(colors=256, method=Image.Quantize.MEDIANCUT))
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=frame_ms, loop=0)
    return buf.getvalue()


def write_outputs(out: Path, report: dict[str, Any], res: dict[str, np.ndarray], real_gif: np.ndarray) -> None:
    """Write ``fidelity.png``, ``rollout.gif`` and (last) ``fidelity.json`` atomically into ``out``.

    Args:
        real_gif: uint8 ``(G, H, 3, 64, 64)`` the real frames matching ``res["gif_pred"]``.
    """
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "fidelity.png", plot_png(report))
    atomic_write_bytes(out / "rollout.gif", rollout_gif(real_gif, res["gif_pred"]))
    atomic_write_json(out / "fidelity.json", report)
