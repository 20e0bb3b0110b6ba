"""Do two world models err alike? Open-loop predictions of several models from the same real contexts, compared.

``ditwm evaluate fidelity`` scores each model against the real game alone. This script rolls every given model
open-loop from the same held-out contexts of a store with the real actions (as the evaluator: same start draw for a
seed, :func:`trainers.fidelity.select_starts`) and prints, at each horizon ``h``:

* each model's latent MSE against the real latent (the evaluator's figure);
* for each pair of models, the MSE between their two predictions, and the **error correlation**: the cosine
  ``sum(e_A · e_B) / sqrt(sum |e_A|² · sum |e_B|²)`` of the two error vectors over all contexts, with
  ``e = prediction − real`` (uncentred): 1 when both models make the same error, 0 when their errors are orthogonal;
* the latent MSE of the pair's mean prediction (not a rollout of any model: it shows how much of the error two
  independent errors would cancel).

Two models trained apart (e.g. another depth, from scratch) whose errors at ``h`` correlate near 1 and whose
predictions lie much closer to each other than to the real latent share what they get wrong: more of the same
training does not fix it, the data or the context does not show it. Errors that correlate weakly are each model's
own. All models must share one frozen encoder, byte for byte (the sha256 their bundles record): the DiT bundles of one
stage-1 run and its RSSM. Frames are encoded once, by the first model.

Run::

    python examples/model_agreement.py --data runs/pong --world-models runs/dit/bundle runs/dit_d6/bundle \\
        runs/pong/stage1/rssm --temperature 0 --sampling-steps 4 --seeds 0 1
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout without install

from dit_envs.envs.loading import load_for_env  # noqa: E402
from trainers.fidelity import encode_frames, load_store, select_starts  # noqa: E402


@torch.no_grad()
def predictions(model, z: torch.Tensor, actions: torch.Tensor, horizons: list[int], seed: int) -> np.ndarray:
    """Open-loop latents at ``horizons``: float32 ``(len(horizons), N, d_z)``.

    Args:
        model: a :class:`~dit_envs.models.world_model.WorldModel` with context length ``K``.
        z: float32 ``(N, K + H, d_z)`` real latents (context then targets); actions: int64 ``(N, K + H)``.
        horizons: 1-based steps ``<= H`` to keep; seed: seed of the model's sampling generator.
    """
    K, gen = model.context_len, torch.Generator().manual_seed(seed)
    state = model.initial_state(z[:, :K], actions[:, :K])
    out = []
    for i in range(max(horizons)):
        state, z_pred, _, _ = model.step(state, actions[:, K + i], gen)
        if i + 1 in horizons:
            out.append(z_pred.float().cpu().numpy())
    return np.stack(out)


def agreement(pred: dict[str, np.ndarray], real: np.ndarray, horizons: list[int]) -> dict:
    """Per-horizon errors and pairwise agreement.

    Args:
        pred: name → float ``(len(horizons), N, d_z)`` predictions; real: float ``(len(horizons), N, d_z)``.
    Returns:
        ``{"mse": {name: [per h]}, "pairs": {"A | B": {"between": [...], "error_corr": [...],
        "mean_mse": [...]}}}``, every list in the order of ``horizons``.
    Raises:
        ValueError: a prediction whose shape differs from ``real``'s.
    """
    for k, v in pred.items():
        if v.shape != real.shape:
            raise ValueError(f"pred[{k!r}]: expected shape {real.shape}, got {v.shape}")
    err = {k: v - real for k, v in pred.items()}
    out: dict = {"horizons": horizons, "mse": {k: (e ** 2).mean((1, 2)).tolist() for k, e in err.items()}, "pairs": {}}
    for a, b in itertools.combinations(pred, 2):
        ea, eb = err[a], err[b]
        dot, na, nb = (ea * eb).sum((1, 2)), (ea ** 2).sum((1, 2)), (eb ** 2).sum((1, 2))
        out["pairs"][f"{a} | {b}"] = {
            "between": ((pred[a] - pred[b]) ** 2).mean((1, 2)).tolist(),
            "error_corr": (dot / np.sqrt(np.maximum(na * nb, 1e-30))).tolist(),
            "mean_mse": (((ea + eb) / 2) ** 2).mean((1, 2)).tolist()}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="episode store (its held-out episodes are used)")
    p.add_argument("--world-models", nargs="+", required=True, help="bundle directories (DiT or RSSM), >= 2")
    p.add_argument("--contexts", type=int, default=256, help="start contexts per seed")
    p.add_argument("--horizons", type=int, nargs="+", default=[1, 4, 16, 64], help="steps compared")
    p.add_argument("--history", type=int, default=16, help="real rows required before a start (as the evaluator)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of the context draw and the sampling")
    p.add_argument("--sampling-steps", type=int, default=0, help="DiT denoising steps (0: each bundle's default)")
    p.add_argument("--temperature", type=float, default=None, help="DiT sampling temperature (default: each's)")
    a = p.parse_args(argv)
    if len(a.world_models) < 2:
        p.error(f"--world-models: expected >= 2 bundles, got {len(a.world_models)}")
    for name in ("contexts", "history"):
        if getattr(a, name) < 1:
            p.error(f"--{name}: expected >= 1, got {getattr(a, name)}")
    if min(a.horizons) < 1:
        p.error(f"--horizons: expected every horizon >= 1, got {a.horizons}")
    if min(a.seeds) < 0:
        p.error(f"--seeds: expected every seed >= 0, got {a.seeds}")
    resolved = [str(Path(m).resolve()) for m in a.world_models]
    if len(set(resolved)) < len(resolved):
        p.error(f"--world-models: expected distinct bundles, got {a.world_models}")
    horizons, models, first, first_config = sorted(set(a.horizons)), {}, a.world_models[0], None
    for path in a.world_models:
        try:
            dit = json.loads((Path(path) / "config.json").read_text()).get("model_type") == "dit"
            bundle = load_for_env(None, path, sampling_steps=(a.sampling_steps or None) if dit else None,
                                  temperature=a.temperature if dit else None)[0]  # the RSSM: its own sampler
        except (ValueError, OSError) as e:
            p.error(f"--world-models {path}: {e}")
        first_config = first_config or bundle.config
        want, got = (c["files"]["autoencoder.safetensors"] for c in (first_config, bundle.config))  # sha256
        if got != want:  # the same encoder implies the same stage-1 run, game and actions
            p.error(f"--world-models {path}: expected the frozen encoder of {first} (sha256 {want}), got {got} "
                    f"(another stage-1 run, or one stored in another dtype); their latents are not comparable")
        if a.history < bundle.model.context_len:
            p.error(f"--history: expected >= the context_len {bundle.model.context_len} of {path}, got {a.history}")
        models[path] = bundle.model.eval()
    try:
        data = load_store(a.data, first_config)
    except ValueError as e:  # an ArgError naming --data
        p.error(str(e))
    H, K_max, preds, reals = max(horizons), max(m.context_len for m in models.values()), {k: [] for k in models}, []
    for seed in a.seeds:
        try:
            starts, _ = select_starts(data, history=a.history, horizon=H, count=a.contexts, seed=seed)
        except ValueError as e:
            p.error(f"--data: {e}")
        rows = starts[:, None] + np.arange(-K_max, H)[None]
        z_all = encode_frames(models[first], data["obs"][rows], torch.device("cpu"))  # one encoder for all
        reals.append(z_all[:, K_max - 1 + np.array(horizons)].float().numpy().transpose(1, 0, 2))
        for path, m in models.items():
            K = m.context_len
            z, a_rows = z_all[:, K_max - K:], data["action"][rows[:, K_max - K:]]
            actions = torch.from_numpy(np.where(a_rows < 0, m.num_actions, a_rows))
            preds[path].append(predictions(m, z, actions, horizons, seed))
    out = agreement({k: np.concatenate(v, 1) for k, v in preds.items()}, np.concatenate(reals, 1), horizons)
    n = sum(len(r[0]) for r in reals)
    print(f"open-loop agreement over {n} held-out contexts (seeds {a.seeds}; DiT sampling steps "
          f"{a.sampling_steps or 'bundle'}, temperature {a.temperature if a.temperature is not None else 'bundle'})")
    print("  latent MSE against the real latent, h " + " / ".join(map(str, horizons)))
    for k, v in out["mse"].items():
        print(f"    {k}: " + " / ".join(f"{x:.3e}" for x in v))
    for k, r in out["pairs"].items():
        print(f"  {k}")
        print("    MSE between the two: " + " / ".join(f"{x:.3e}" for x in r["between"]))
        print("    error correlation:   " + " / ".join(f"{x:.2f}" for x in r["error_corr"]))
        print("    MSE of their mean:   " + " / ".join(f"{x:.3e}" for x in r["mean_mse"]))
    return out


if __name__ == "__main__":
    main()
