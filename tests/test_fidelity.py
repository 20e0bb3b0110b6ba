"""``ditwm evaluate fidelity``: context selection, JSON/PNG/GIF outputs, a perfect stand-in model, arg errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dit_envs.bundle import save_bundle
from dit_envs.envs.real import action_meanings, make_real_env
from trainers.data import EpisodeStore, heldout_mask
from trainers.evaluate import cli as evaluate_cli
from trainers.fidelity import Args, action_sensitivity, ensemble_latent_errors, evaluate, main, select_starts
from trainers.fidelity_report import build_report
from tests.conftest import make_tiny_bundle

EPISODE_STEPS = 100  # env steps per (truncated) episode → 101 rows


def make_pong_store(root: Path, num_envs: int = 4, rounds: int = 5, seed: int = 0) -> Path:
    """A store of ``num_envs * rounds`` real Pong episodes of random play, truncated at :data:`EPISODE_STEPS`.

    Rows follow :mod:`trainers.data`'s convention (first row: action −1; last row: truncated). All envs end
    together, so episode ``e`` of round ``k`` is env ``e % num_envs``.
    """
    store = EpisodeStore(root, chunk_rows=2048)
    env = make_real_env("Pong", num_envs=num_envs, seed=seed, max_num_frames_per_episode=4 * EPISODE_STEPS)
    store.write_meta(game="Pong", action_meanings=list(env.action_meanings))
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    n, zf, zb = num_envs, np.zeros(num_envs, np.float32), np.zeros(num_envs, bool)
    for k in range(rounds):
        ep = np.arange(k * n, (k + 1) * n)
        store.add(obs=obs, action=np.full(n, -1), reward=zf, terminated=zb, truncated=zb, episode=ep,
                  step=np.zeros(n, np.int64))
        for t in range(1, EPISODE_STEPS + 1):
            action = rng.integers(0, len(env.action_meanings), n)
            obs, reward, term, trunc, info = env.step(action)
            done = term | trunc
            frame = obs.copy()
            for i in np.flatnonzero(done):
                frame[i] = info["final_obs"][i]
            store.add(obs=frame, action=action, reward=reward, terminated=term, truncated=trunc, episode=ep,
                      step=np.full(n, t))
            assert done.all() == (t == EPISODE_STEPS), "episodes are expected to end together"
    store.flush()
    env.close()
    return root


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_pong_store(tmp_path_factory.mktemp("fidelity") / "store")


@pytest.fixture(scope="module")
def data(store) -> dict[str, np.ndarray]:
    return EpisodeStore(store).load()


class ReplayModel:
    """A perfect world model stand-in: it recognises each context by its exact frames and actions and
    replays the real future (frame, reward, termination). Latents are the raw pixels / 255."""

    def __init__(self, data: dict[str, np.ndarray], context_len: int) -> None:
        self.num_actions, self.latent_dim, self.context_len = 6, 3 * 64 * 64, context_len
        self.data, self.index = data, {}
        self.real_action_steps: list[bool] = []  # per step: were the given actions the real ones?
        ep, K = data["episode"], context_len
        for t in range(K, len(ep)):
            if ep[t - K] == ep[t]:
                self.index.setdefault(self._key(data["obs"][t - K:t], data["action"][t - K:t]), t)

    def _key(self, frames: np.ndarray, actions: np.ndarray) -> bytes:
        return frames.tobytes() + np.where(actions < 0, self.num_actions, actions).astype(np.int64).tobytes()

    def encode(self, frames):
        return frames.reshape(len(frames), -1).float() / 255.0

    def decode(self, z):
        return (z * 255.0).round().clamp(0, 255).to(torch.uint8).reshape(-1, 3, 64, 64)

    def initial_state(self, context_z, context_a):
        frames = self.decode(context_z.reshape(-1, self.latent_dim)).reshape(*context_z.shape[:2], 3, 64, 64)
        t = [self.index[self._key(f.numpy(), a.numpy())] for f, a in zip(frames, context_a)]
        return {"t": torch.tensor(t), "z": context_z.clone()}

    def step(self, state, action, generator=None):
        t = state["t"].numpy()
        self.real_action_steps.append(bool(np.array_equal(action.numpy(), self.data["action"][t])))
        z = self.encode(torch.from_numpy(self.data["obs"][t]))
        r, term = torch.from_numpy(self.data["reward"][t]), torch.from_numpy(self.data["terminated"][t])
        return {"t": state["t"] + 1, "z": torch.cat([state["z"][:, 1:], z[:, None]], 1)}, z, r, term

    def latent_history(self, state):
        return state["z"]


def test_select_starts_heldout_and_boundaries(data):
    starts, total = select_starts(data, history=8, horizon=16, count=10, seed=3)
    assert len(starts) == 10 and total == 2 * (101 - 8 - 16 + 1)  # episodes 9 and 19 are held out
    assert heldout_mask(data["episode"][starts]).all()
    for t in starts:  # the whole window lies in one episode
        assert data["episode"][t - 8] == data["episode"][t + 15] and data["step"][t + 15] - data["step"][t - 8] == 23
    again, _ = select_starts(data, history=8, horizon=16, count=10, seed=3)
    assert np.array_equal(starts, again)
    with pytest.raises(ValueError, match="longest of 2 held-out episode segments has 101"):
        select_starts(data, history=8, horizon=94, count=10, seed=0)


def test_perfect_model_scores_perfectly(data):
    K, horizons = 4, [1, 8, 24]
    starts, _ = select_starts(data, history=K, horizon=horizons[-1], count=32, seed=0)
    model = ReplayModel(data, K)
    args = Args(world_model="-", data="-", out="-", history=K, horizons=horizons, samples=3)
    config = {"model_type": "replay", "game": "Pong", "action_meanings": list(action_meanings("Pong"))}
    rep, res, real_gif = evaluate(model, config, data, starts, args, horizons, torch.device("cpu"))
    assert all(model.real_action_steps[:horizons[-1]]), "the rollout must replay the real actions"
    assert np.array_equal(res["gif_pred"], real_gif)
    for r in rep["horizons"]:
        assert r["latent_mse"] == 0.0 and r["psnr"] == 100.0 and r["autoencoder_psnr"] == 100.0
        assert r["ensemble"] == {"samples": 3, "latent_mse_of_mean": 0.0, "sample_spread": 0.0}
        for obj in ("ball", "agent_paddle", "opponent_paddle"):
            s = r[obj]
            assert s["miss_rate"] == 0.0 and s["median_px"] == 0.0 and s["within_2px"] == 1.0
            assert s["ghost_rate"] in (0.0, None)
    w = rep["horizons"][-1]["reward"]
    assert w["real_events"] > 0, "the sampled windows should hold real reward events"
    assert w["precision"] == 1.0 and w["recall"] == 1.0 and w["matched"] == w["real_events"]
    json.dumps(rep, allow_nan=False)


def _run(bundle: Path, store: Path, out: Path, **kw) -> dict:
    args = Args(world_model=str(bundle), data=str(store), out=str(out), contexts=8, horizons=[1, 4, 16],
                history=8, **kw)
    assert main(args) == 0
    return json.loads((out / "fidelity.json").read_text())


def test_fidelity_outputs_tiny_dit(tmp_path, store, capsys):
    bundle = make_tiny_bundle(tmp_path / "dit")
    rep = _run(bundle, store, tmp_path / "out", samples=2, sampling_shift=3.0)
    assert rep["sampling_shift"] == 3.0 and rep["args"]["sampling_shift"] == 3.0
    assert "mean of 2 samples, latent MSE | spread at h: 1:" in capsys.readouterr().out
    assert (tmp_path / "out" / "fidelity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "out" / "rollout.gif").read_bytes()[:6] == b"GIF89a"
    from PIL import Image

    with Image.open(tmp_path / "out" / "rollout.gif") as gif:
        assert gif.n_frames == 16 and gif.size == (2 * 192 + 12, 14 + 4 * (192 + 4))
    assert rep["model_type"] == "dit" and rep["game"] == "Pong" and rep["num_contexts"] == 8
    assert rep["args"]["seed"] == 0 and rep["world_model"] == str(bundle.resolve())
    assert [r["horizon"] for r in rep["horizons"]] == [1, 4, 16] and len(rep["per_step"]["psnr"]) == 16
    for r in rep["horizons"]:
        assert r["latent_mse"] >= 0 and 0 < r["psnr"] <= 100 and 0 < r["autoencoder_psnr"] <= 100
        for obj in ("ball", "agent_paddle", "opponent_paddle"):
            s = r[obj]
            assert set(s) == {"visible", "miss_rate", "ghost_rate", "median_px", "within_2px", "within_3px"}
            for k in ("miss_rate", "ghost_rate", "within_2px", "within_3px"):
                assert s[k] is None or 0.0 <= s[k] <= 1.0
        e = r["ensemble"]
        assert e["samples"] == 2 and e["latent_mse_of_mean"] >= 0 and e["sample_spread"] >= 0
        w = r["reward"]
        assert w["matched"] <= min(w["real_events"], w["predicted_events"])
    s = rep["action_sensitivity"]
    assert s["steps"] == 8 and s["contexts"] == 8 and 0.0 <= s["fraction_apart"] <= 1.0
    assert (s["up_action"], s["down_action"]) == ("RIGHT", "LEFT")


def test_dtype_runs_the_model_in_bfloat16_on_the_same_contexts(tmp_path, store):
    bundle = make_tiny_bundle(tmp_path / "dit")
    ref = _run(bundle, store, tmp_path / "fp32")
    bf = _run(bundle, store, tmp_path / "bf16", dtype="bfloat16")
    assert bf["args"]["dtype"] == "bfloat16" and bf["starts"] == ref["starts"]
    assert [r["latent_mse"] for r in bf["horizons"]] != [r["latent_mse"] for r in ref["horizons"]]


class GaussianModel:
    """Predicts ``offset + N(0, 1)`` latents from its generator, whatever the context: a known sampler."""

    num_actions, latent_dim, context_len, offset = 6, 512, 2, 0.5

    def initial_state(self, context_z, context_a):
        return {"n": context_z.shape[0]}

    def step(self, state, action, generator=None):
        z = self.offset + torch.randn(state["n"], self.latent_dim, generator=generator)
        return state, z, torch.zeros(state["n"]), torch.zeros(state["n"], dtype=torch.bool)


def test_ensemble_errors_hand_computed():
    model, n, H, seeds = GaussianModel(), 3, 2, [5, 6, 7, 8]
    z = torch.zeros(n, model.context_len + H, model.latent_dim)
    a = torch.zeros(n, model.context_len + H, dtype=torch.int64)
    got = ensemble_latent_errors(model, z, a, seeds=seeds, device=torch.device("cpu"))
    draws = []  # the same draws, by hand: (S, H, N, d)
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        draws.append([(model.offset + torch.randn(n, model.latent_dim, generator=g)).double().numpy()
                      for _ in range(H)])
    draws = np.array(draws)
    assert np.allclose(got["mean_se"], (draws.mean(0) ** 2).mean(-1).T)
    assert np.allclose(got["spread"], draws.var(0, ddof=1).mean(-1).T)
    # and the decomposition it is there for: mean error ~ offset^2 + 1/S, spread ~ 1
    assert abs(got["mean_se"].mean() - (0.25 + 1 / 4)) < 0.05 and abs(got["spread"].mean() - 1.0) < 0.05
    with pytest.raises(ValueError, match="seeds: expected at least 2"):
        ensemble_latent_errors(model, z, a, seeds=[1], device=torch.device("cpu"))


def test_same_contexts_for_dit_and_rssm(tmp_path, store):
    from tests.test_rssm_bundle import make_rssm_model

    dit = _run(make_tiny_bundle(tmp_path / "dit"), store, tmp_path / "a")
    rssm_model = make_rssm_model()
    z = torch.zeros(1, rssm_model.context_len, rssm_model.latent_dim)
    a = torch.full((1, rssm_model.context_len), 6, dtype=torch.int64)
    path = save_bundle(rssm_model, tmp_path / "rssm", game="Pong", action_meanings=list(action_meanings("Pong")),
                       start_z=z, start_a=a)
    rssm = _run(path, store, tmp_path / "b")
    assert rssm["model_type"] == "rssm" and rssm["context_len"] != dit["context_len"]
    assert rssm["starts"] == dit["starts"]
    again = _run(make_tiny_bundle(tmp_path / "dit2"), store, tmp_path / "c")
    assert again["horizons"] == dit["horizons"] and again["action_sensitivity"] == dit["action_sensitivity"]


@pytest.mark.parametrize("extra, field", [
    (["--horizons", "0", "4"], "--horizons"),
    (["--contexts", "0"], "--contexts"),
    (["--history", "2"], "--history"),  # below the tiny model's context_len 4
    (["--horizons", "200"], "--data"),  # no held-out episode that long
    (["--sampling-steps", "-1"], "--sampling-steps"),
    (["--samples", "0"], "--samples"),
    (["--temperature", "-0.5"], "--temperature"),
    (["--sampling-shift", "-1"], "--sampling-shift"),
])
def test_bad_args_exit_2_and_write_nothing(tmp_path, store, capsys, extra, field):
    bundle = make_tiny_bundle(tmp_path / "dit")
    out = tmp_path / "out"
    rc = evaluate_cli(["fidelity", "--world-model", str(bundle), "--data", str(store), "--out", str(out), *extra])
    assert rc == 2 and not out.exists()
    assert f"error: {field}:" in capsys.readouterr().err


def test_temperature_on_a_model_without_one_exits_2(tmp_path, store, capsys):
    from tests.test_rssm_bundle import make_rssm_model

    rssm = make_rssm_model()
    path = save_bundle(rssm, tmp_path / "rssm", game="Pong", action_meanings=list(action_meanings("Pong")),
                       start_z=torch.zeros(1, rssm.context_len, rssm.latent_dim),
                       start_a=torch.full((1, rssm.context_len), 6, dtype=torch.int64))
    out = tmp_path / "out"
    rc = evaluate_cli(["fidelity", "--world-model", str(path), "--data", str(store), "--out", str(out),
                       "--temperature", "0.5"])
    assert rc == 2 and not out.exists()
    assert "error: --temperature: the rssm model has no sampling temperature, got 0.5" in capsys.readouterr().err
    rc = evaluate_cli(["fidelity", "--world-model", str(path), "--data", str(store), "--out", str(out),
                       "--sampling-shift", "2"])
    assert rc == 2 and not out.exists()
    assert "error: --sampling-shift: the rssm model has no sampler time shift, got 2.0" in capsys.readouterr().err


def test_bad_paths_exit_2(tmp_path, store, capsys):
    bundle = make_tiny_bundle(tmp_path / "dit")
    base = ["fidelity", "--out", str(tmp_path / "out")]
    assert evaluate_cli([*base, "--world-model", str(tmp_path / "none"), "--data", str(store)]) == 2
    assert "--world-model:" in capsys.readouterr().err
    assert evaluate_cli([*base, "--world-model", str(bundle), "--data", str(tmp_path / "none")]) == 2
    assert "--data:" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert evaluate_cli(["fidelity", "--out", str(tmp_path / "full"), "--world-model", str(bundle),
                         "--data", str(store)]) == 2
    assert "--out:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_report_without_pong_objects(tmp_path):
    """A non-Pong game has no object figures: they are None in the JSON, and the PNG still renders."""
    from types import SimpleNamespace

    from trainers.fidelity_report import format_table, plot_png

    n, H = 3, 4
    res = {"latent_se": np.ones((n, H)), "psnr": np.full((n, H), 20.0), "reward_pred": np.zeros((n, H)),
           "ae_psnr": np.array([30.0, 31.0]), "gif_pred": np.zeros((1, H, 3, 64, 64), np.uint8)}
    model = SimpleNamespace(context_len=2, latent_dim=5, sampling_steps=1)
    args = Args(world_model="w", data="d", out="o")
    rep = build_report(args=args, horizons=[1, 4], model=model, config={"model_type": "dit", "game": "Breakout"},
                       res=res, real_reward=np.zeros((n, H)), starts=[],
                       candidates=0, sensitivity=None, device=torch.device("cpu"))
    assert rep["horizons"][0]["ball"] is None and rep["per_step"]["ball_median_px"] is None
    assert rep["horizons"][1]["reward"]["precision"] is None
    json.dumps(rep, allow_nan=False)
    assert plot_png(rep)[:4] == b"\x89PNG" and " - " in format_table(rep)


def test_action_sensitivity_on_paddle_drawing_model():
    """A stand-in whose decoded paddle moves 1 px per UP/DOWN step is 100 % sensitive and right-way-round."""
    from tests.conftest import random_frames

    class Paddle:
        num_actions, latent_dim, context_len = 6, 1, 1

        def initial_state(self, z, a):
            return {"y": z[:, -1, 0].clone()}

        def step(self, state, action, generator=None):
            y = state["y"] + torch.where(action == 2, -1.0, torch.where(action == 3, 1.0, 0.0))
            return {"y": y}, y[:, None], torch.zeros(len(y)), torch.zeros(len(y), dtype=torch.bool)

        def decode(self, z):
            frames = random_frames(len(z), torch.Generator().manual_seed(0))
            frames[:, :, :, 54:60] = torch.tensor([144, 72, 17], dtype=torch.uint8)[:, None, None]
            for i, y in enumerate(z[:, 0].long()):
                frames[i, :, y - 2:y + 2, 56:58] = torch.tensor([92, 186, 92], dtype=torch.uint8)[:, None, None]
            return frames

    z = torch.tensor([[[30.0]], [[40.0]]])
    s = action_sensitivity(Paddle(), z, torch.zeros(2, 1, dtype=torch.int64), 2, 3, seed=0,
                           device=torch.device("cpu"))
    assert s["fraction_apart"] == 1.0 and s["fraction_correct_direction"] == 1.0
    assert s["mean_down_minus_up_px"] == 16.0 and s["paddle_missing_rate"] == 0.0


def test_metric_functions_hand_computed():
    from trainers.fidelity_metrics import position_stats, psnr, reward_event_stats

    real = np.array([[10.0, 10.0], [20.0, 20.0], [30.0, 30.0], [np.nan, np.nan], [np.nan, np.nan]])
    pred = np.array([[10.0, 11.0], [23.0, 24.0], [np.nan, np.nan], [5.0, 5.0], [np.nan, np.nan]])
    s = position_stats(pred, real)  # errors 1 and 5 px, one miss, one ghost
    assert s == {"visible": 3, "miss_rate": 1 / 3, "ghost_rate": 0.5, "median_px": 3.0, "within_2px": 0.5,
                 "within_3px": 0.5}
    w = reward_event_stats(np.array([[0.9, -0.7, 0.2], [0.0, 0.6, 0.0]]), np.array([[1.0, 1.0, 0.0], [0.0, 1.0, -1.0]]))
    assert w == {"real_events": 4, "predicted_events": 3, "matched": 2, "precision": 2 / 3, "recall": 0.5}
    a = np.zeros((2, 3, 64, 64), np.uint8)
    b = a.copy()
    b[1] = 1  # MSE 1 → 20·log10(255) dB
    assert np.allclose(psnr(b, a), [100.0, 20 * np.log10(255.0)])
