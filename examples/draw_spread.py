"""Does the spread of a world model's draws predict its error? One step from held-out real contexts, M draws each.

``ditwm train-agent --uncertainty-penalty`` charges the imagined steps whose draws spread most
(:mod:`dit_envs.envs.uncertainty`). That is worth doing only if the spread marks the steps where the model is
wrong. This script starts the model from ``--contexts`` held-out real contexts of a store, draws the next latent
``--draws`` times with the real action, and prints how the spread (per-element variance across the draws, averaged
over the latent) ranks two errors against the real next latent:

* the error of one draw (what an env step gives; at temperature > 0 it contains the spread itself);
* the error of the mean of the draws (the model's bias, which the spread does not contain).

It prints the Spearman rank correlations, the mean errors of the top decile of spread against the rest, and, for
Pong, where the ball is (none, the agent's side, mid-field, the opponent's side) in the contexts of the top decile
against all of them: a penalty there steers a policy away from those situations.

Run::

    python examples/draw_spread.py --data runs/pong --world-model registry/bundled/pong-v0 --temperature 1
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout without install

from dit_envs.envs.loading import load_for_env  # noqa: E402
from dit_envs.envs.uncertainty import draw_spread  # noqa: E402
from trainers.fidelity import encode_frames, load_store, select_starts  # noqa: E402
from trainers.pong_objects import locate_pong_objects  # noqa: E402


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation of two float ``(N,)`` arrays (ties broken by order; NaN for N < 2)."""
    if len(x) < 2:
        return float("nan")
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def ball_zones(frames: np.ndarray) -> np.ndarray:
    """Pong: where the ball is in uint8 frames ``(N, 3, 64, 64)`` → str ``(N,)`` (none / agent side: column >= 48 /
    opponent side: column <= 16 / mid-field)."""
    col = locate_pong_objects(frames).ball[:, 1]
    return np.select([np.isnan(col), col >= 48, col <= 16], ["none", "agent side", "opponent side"], "mid-field")


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="episode store (its held-out episodes are used)")
    p.add_argument("--world-model", required=True, help="bundle directory (a sampled model: DiT at temperature > 0)")
    p.add_argument("--contexts", type=int, default=1024, help="held-out contexts")
    p.add_argument("--draws", type=int, default=8, help="draws per context (>= 2)")
    p.add_argument("--sampling-steps", type=int, default=0, help="DiT denoising steps (0: the bundle's default)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the bundle's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the context draw and of the sampling")
    a = p.parse_args(argv)
    if a.contexts < 10:
        p.error(f"--contexts: expected >= 10 (deciles are compared), got {a.contexts}")
    if a.draws < 2:
        p.error(f"--draws: expected >= 2, got {a.draws}")
    try:
        bundle = load_for_env(None, a.world_model, sampling_steps=a.sampling_steps or None,
                              temperature=a.temperature)[0]
        data = load_store(a.data, bundle.config)
        starts, _ = select_starts(data, history=bundle.model.context_len, horizon=1, count=a.contexts, seed=a.seed)
    except (ValueError, OSError) as e:
        p.error(f"--world-model / --data: {e}")
    model, K = bundle.model.eval(), bundle.model.context_len
    rows = starts[:, None] + np.arange(-K, 1)[None]
    z = encode_frames(model, data["obs"][rows], torch.device("cpu"))
    actions = torch.from_numpy(np.where(data["action"][rows] < 0, model.num_actions, data["action"][rows]))
    gen = torch.Generator().manual_seed(a.seed)
    with torch.no_grad():
        state = model.initial_state(z[:, :K], actions[:, :K])
        rep = torch.arange(len(starts)).repeat_interleave(a.draws)
        draws = model.step({k: v[rep] for k, v in state.items()}, actions[rep, K], gen)[1]
    draws = draws.float().view(len(starts), a.draws, -1)
    spread = draw_spread(model, state, actions[:, K], a.draws, gen).numpy()  # a fresh set, to check the helper
    u = draws.var(1).mean(1).numpy()
    real = z[:, K].float()
    err_one = ((draws[:, 0] - real) ** 2).mean(1).numpy()
    err_mean = ((draws.mean(1) - real) ** 2).mean(1).numpy()
    top = u > np.quantile(u, 0.9)
    res = {"spread_mean": float(u.mean()), "spread_fresh_mean": float(spread.mean()),
           "spearman_one": spearman(u, err_one), "spearman_mean": spearman(u, err_mean),
           "top_err_mean": float(err_mean[top].mean()), "rest_err_mean": float(err_mean[~top].mean()),
           "top_err_one": float(err_one[top].mean()), "rest_err_one": float(err_one[~top].mean())}
    print(f"{a.world_model}: {len(starts)} held-out contexts, {a.draws} draws each, sampling steps "
          f"{model.sampling_steps}, temperature {getattr(model, 'temperature', None)}")
    print(f"  spread: mean {res['spread_mean']:.3e} (a fresh set of draws: {res['spread_fresh_mean']:.3e}), "
          f"median {np.median(u):.3e}")
    for name, key in (("one draw", "one"), ("mean of the draws", "mean")):
        print(f"  error of {name:17s}: Spearman with the spread {res[f'spearman_{key}']:.3f}; "
              f"top decile of spread {res[f'top_err_{key}']:.3e} vs the rest {res[f'rest_err_{key}']:.3e}")
    if bundle.config.get("game") == "Pong":
        zone = ball_zones(data["obs"][starts - 1])  # the context's last real frame
        for name in ("none", "agent side", "mid-field", "opponent side"):
            res[f"top_share_{name}"], res[f"all_share_{name}"] = float(np.mean(zone[top] == name)), \
                float(np.mean(zone == name))
            print(f"  ball {name:13s}: {res[f'top_share_{name}']:.2f} of the top decile, "
                  f"{res[f'all_share_{name}']:.2f} of all contexts")
    return res


if __name__ == "__main__":
    main()
