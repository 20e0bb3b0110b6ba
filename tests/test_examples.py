"""The diagnostic example scripts run end to end on the bundled model and return well-formed figures."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_reward_rates_tiny(capsys):
    rates = _load("reward_rates").main(["--num-envs", "2", "--steps", "30"])
    assert set(rates) == {"imagined", "real"}
    for r in rates.values():
        assert set(r) == {"wins", "losses", "episode_ends"} and all(0.0 <= v <= 1000.0 for v in r.values())
    assert "events per 1000 steps" in capsys.readouterr().out
    fates = _load("reward_rates").main(["--num-envs", "2", "--steps", "30", "--fates"])
    for r in fates.values():
        assert {"returns", "phantom_returns", "vanished", "ball_seen"} <= set(r) and 0.0 <= r["ball_seen"] <= 1.0
        assert 0.0 <= r["phantom_returns"] <= r["returns"] and r["vanished"] >= 0.0
    assert "phantom_returns" in capsys.readouterr().out
    kept = _load("reward_rates").main(["--num-envs", "2", "--steps", "30", "--fates", "--keep-ball", "2",
                                       "--keep-ball-returns"])
    assert kept["real"] == fates["real"]  # the rule acts on imagination only
    assert 0.0 <= kept["imagined"]["still_rejected_rate"] <= kept["imagined"]["rejected_rate"] <= 1.0
    assert "imagined steps rejected (the ball lost, or a phantom return) at the first draw" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        _load("reward_rates").main(["--num-envs", "2", "--steps", "3", "--keep-ball", "-1"])
    assert "--keep-ball: expected an integer >= 0, got -1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _load("reward_rates").main(["--num-envs", "2", "--steps", "3", "--keep-ball-returns"])
    assert "--keep-ball-returns: expected it only with --keep-ball >= 1, got --keep-ball 0" in capsys.readouterr().err


def test_reward_rates_intercept_loses_fewer_points_than_random_play():
    mod = _load("reward_rates")
    import dit_envs
    rates = {}
    for policy in ("random", "intercept"):
        env = dit_envs.make_real_env("Pong", num_envs=2, seed=0)
        rates[policy] = mod.play(env, 1500, 0, policy, list(env.action_meanings), fates=True)
        env.close()
    assert rates["random"]["losses"] > 15.0  # real random play loses ~21.6 points per 1000 steps
    assert rates["intercept"]["losses"] < 0.5 * rates["random"]["losses"]
    assert rates["intercept"]["wins"] > rates["random"]["wins"]  # it is there to win points
    # the real ball never turns without the paddle nor vanishes before it; intercept play returns many balls
    assert rates["intercept"]["returns"] > 5.0 and rates["random"]["returns"] < rates["intercept"]["returns"]
    for r in rates.values():
        assert r["phantom_returns"] == 0.0 and r["vanished"] == 0.0 and r["ball_seen"] > 0.5


def test_compare_sampling_speed_breakdown(tiny_bundle, capsys):
    configs = [f"{tiny_bundle}:4", f"{tiny_bundle}:1"]
    rates = _load("compare_sampling_speed").main([*configs, "--num-envs", "4", "--steps", "2", "--repeats", "2",
                                                  "--breakdown"])
    assert list(rates) == configs and all(v > 0 for v in rates.values())
    out = capsys.readouterr().out.splitlines()
    assert "context" in out[2] and "fixed share" in out[2]
    for line, linear in zip(out[3:5], ("1.00", "4.00")):
        ctx, step = map(float, line.split()[1:3])
        assert ctx > 0 and step > 0 and line.endswith(f", {linear}")


def test_reward_rates_bad_args():
    with pytest.raises(SystemExit):
        _load("reward_rates").main(["--steps", "0"])
    with pytest.raises(SystemExit):
        _load("reward_rates").main(["--policy", "/nonexistent"])
    with pytest.raises(ValueError, match="action_meanings"):
        _load("reward_rates").play(None, 1, 0, "intercept")


def test_reward_rates_of_a_trained_policy(tiny_bundle, tmp_path, capsys, monkeypatch):
    """A train-agent policy plays the imagined game on latents and the real one through its encoder; its actions
    are its own samples (the same generator draws the same actions on the same latents), or with ``--greedy`` the
    argmax on both paths."""
    import torch

    from trainers.train_agent import Args, main as train_agent

    assert train_agent(Args(world_model=str(tiny_bundle), out=str(tmp_path / "p"), steps=1, init="scratch",
                            num_envs=2, horizon=2, eval_every=0, eval_episodes=1, eval_max_steps=2)) == 0
    mod = _load("reward_rates")
    rates = mod.main(["--policy", str(tmp_path / "p"), "--world-model", str(tiny_bundle), "--num-envs", "2",
                      "--steps", "20"])
    assert set(rates) == {"imagined", "real"} and "events per 1000 steps" in capsys.readouterr().out
    pol, ref = mod.LatentPolicy(str(tmp_path / "p"), seed=3), mod.LatentPolicy(str(tmp_path / "p"), seed=3)
    z = torch.randn(5, 4, 32).numpy()
    assert (pol(z, None) == ref.actor.act(torch.from_numpy(z).flatten(1), ref.gen, greedy=False).numpy()).all()
    frames = np.zeros((2, 3, 64, 64), np.uint8)
    assert pol(frames, None).shape == (2,) and pol.real.stack.stack.shape == (2, 4, 32)

    greedy = mod.LatentPolicy(str(tmp_path / "p"), seed=3, greedy=True)
    argmax = greedy.actor.act(torch.from_numpy(z).flatten(1), greedy.gen, greedy=True).numpy()
    assert (greedy(z, None) == argmax).all()
    seen, act = [], greedy.actor.act  # every call, imagined or real, asks the actor for its argmax
    greedy.actor.act = lambda o, gen=None, greedy=False: seen.append(greedy) or act(o, gen, greedy)
    real = np.random.default_rng(0).integers(0, 256, (2, 3, 64, 64), dtype=np.uint8)
    greedy(z, None), greedy(real, None), greedy(real, np.zeros(2, bool))
    assert seen == [True, True, True]
    assert (greedy(real, np.zeros(2, bool)) == act(greedy.real.stack.flat(), None, True).numpy()).all()

    made = []

    class Spy(mod.LatentPolicy):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self.greedy)

    monkeypatch.setattr(mod, "LatentPolicy", Spy)
    rates = mod.main(["--policy", str(tmp_path / "p"), "--world-model", str(tiny_bundle), "--num-envs", "2",
                      "--steps", "5", "--greedy"])
    assert set(rates) == {"imagined", "real"} and made == [True]
    with pytest.raises(SystemExit):
        mod.main(["--num-envs", "2", "--steps", "3", "--greedy"])
    assert "--greedy: expected it only with --policy DIR (a trained policy), got --policy random" in \
        capsys.readouterr().err


def test_ball_returns_finds_real_returns_and_scores_a_model(tiny_stage1_store, tiny_bundle, capsys):
    out = _load("ball_returns").main(["--data", str(tiny_stage1_store), "--world-model", str(tiny_bundle),
                                      "--max-events", "4"])
    assert set(out) == {"train", "held-out"}
    for r in out.values():
        assert r["misses"] <= 4
        for k in ("return_recall", "false_return_rate", "ceiling_recall", "ceiling_false_rate"):
            assert np.isnan(r[k]) or 0.0 <= r[k] <= 1.0
    assert "imagined return recall" in capsys.readouterr().out


def test_event_recall_scores_both_signs_of_a_tiny_store(tiny_stage1_store, tiny_bundle, capsys):
    out = _load("event_recall").main(["--data", str(tiny_stage1_store), "--world-model", str(tiny_bundle),
                                      "--max-events", "3", "--lead", "2", "--tail", "1"])
    assert set(out) == {f"{s} {p}" for s in ("positive", "negative") for p in ("train", "held-out")}
    assert sum(r["events"] for r in out.values()) > 0  # random play loses points within 192 steps
    for r in out.values():
        assert r["events"] <= 3
        assert (r["events"] == 0) == np.isnan(r["recall"]) and (np.isnan(r["recall"]) or 0 <= r["recall"] <= 1)
        assert r["events"] == 0 or 0 <= r["head_recall"] <= 1  # a DiT bundle has a transition head
    assert "imagined recall" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        _load("event_recall").main(["--data", str(tiny_stage1_store), "--lead", "0"])


def test_event_rows_need_room_in_their_episode():
    rows = _load("event_recall").event_rows
    reward = np.array([0, 0, 0, 1, 0, -1, 0, 0, 1, 0], float)
    episode = np.array([0] * 7 + [1] * 3)
    assert rows(reward, episode, 1, context_len=2, lead=1, tail=1).tolist() == [3]  # row 8: its context is in ep 0
    assert rows(reward, episode, -1, context_len=2, lead=2, tail=1).tolist() == [5]
    assert rows(reward, episode, -1, context_len=2, lead=2, tail=2).tolist() == []  # row 7 is the next episode's
    with pytest.raises(ValueError, match="sign"):
        rows(reward, episode, 0, context_len=2, lead=1, tail=1)


def test_ball_return_events_on_a_synthetic_track():
    find = _load("ball_returns").find_events
    col = np.array([30, 40, 50, 55, 50, 40, 30, 40, 50, 56, 58, 60, np.nan, np.nan], float)
    ep = np.zeros(len(col), np.int64)
    returns, misses = find(col, ep, context_len=2, lead=1)
    assert returns.tolist() == [3] and misses.tolist() == [10]
    returns, _ = find(col, ep, context_len=3, lead=2)  # the return at row 3 has no room for 3 + 2 rows before it
    assert returns.tolist() == []


def test_error_sources_splits_the_error_of_a_tiny_model(tiny_bundle, tmp_path, capsys):
    from tests.test_fidelity import make_pong_store  # a store with held-out episodes

    store = make_pong_store(tmp_path / "store")
    out = _load("error_sources").main(["--data", str(store), "--world-model", str(tiny_bundle),
                                       "--contexts", "4", "--horizon", "6", "--history", "4", "--seeds", "0", "1"])
    n = out["contexts"]
    assert 0 < n <= 8 and sum(r["contexts"] for r in out["by_first_point"].values()) == n
    for r in out["by_object"].values():
        assert 0.0 <= r["right"] <= 1.0 and 0.0 <= r["share_of_error_wrong"] <= 1.0 + 1e-9
    assert "error sources at h 6" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        _load("error_sources").main(["--data", str(store), "--world-model", str(tiny_bundle), "--horizon", "0"])
    assert "--horizon: expected >= 1, got 0" in capsys.readouterr().err


def test_error_sources_classify_on_known_rollouts():
    mod = _load("error_sources")
    nan = np.nan
    res = {"latent_se": np.array([[0.0, 1.0], [0.0, 3.0]]), "reward_pred": np.array([[0.0, -0.9], [0.2, 0.0]]),
           "real_ball": np.array([[[1, 1], [5, 5]], [[1, 1], [nan, nan]]], float),
           "pred_ball": np.array([[[1, 1], [6, 7]], [[1, 1], [nan, nan]]], float),
           "real_agent_paddle": np.array([[0, 10], [0, 10]], float),
           "pred_agent_paddle": np.array([[0, 12], [0, nan]], float),
           "real_opponent_paddle": np.array([[0, nan], [0, 20]], float),
           "pred_opponent_paddle": np.array([[0, nan], [0, 30]], float)}
    f = mod.classify(res, np.array([[0.0, -1.0], [0.0, -1.0]]), 2, context_ball=np.array([True, False]))
    assert f["se"].tolist() == [1.0, 3.0] and f["first_point"].tolist() == [1, 1]
    assert f["score"].tolist() == [True, False]  # the second rollout missed the point lost at step 2
    assert f["ball"].tolist() == [True, True] and f["agent"].tolist() == [True, False]
    assert f["opponent"].tolist() == [True, False]
    s = mod.summarise(f, 2)
    assert s["all_right"]["fraction"] == 0.5 and s["all_right"]["latent_mse"] == 1.0
    assert s["by_object"]["score"]["share_of_error_wrong"] == 0.75
    assert f["no_point"].tolist() == [False, True] and s["point_missed_entirely"]["share_of_error"] == 0.75
    assert f["ball_kept"].tolist() == [True, False] and not f["ball_dropped"].any()
    assert f["ball_real"].tolist() == [True, False] and f["ball_pred"].tolist() == [True, False]
    res["pred_ball"][1, 1] = [3, 3]  # an imagined ball the real frame does not show: "extra"
    s = mod.summarise(mod.classify(res, np.array([[0.0, -1.0], [0.0, -1.0]]), 2), 2)["ball_wrong"]
    assert s["extra"] == {"fraction": 0.5, "latent_mse": 3.0} and s["misplaced"]["fraction"] == 0.0
    assert s["missing"]["fraction"] == 0.0 and np.isnan(s["missing"]["latent_mse"])
    res["pred_ball"][1, 1] = nan
    res["pred_ball"][0, 0] = nan  # the first rollout now loses the ball one step ahead
    assert mod.classify(res, np.zeros((2, 2)), 2, context_ball=np.array([True, True]))["ball_dropped"].tolist() == [
        True, False]


def test_model_agreement_of_a_model_with_itself_and_on_known_errors(tiny_bundle, tmp_path, capsys):
    import hashlib
    import json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from dit_envs.envs.loading import load_for_env
    from tests.test_fidelity import make_pong_store  # a store with held-out episodes
    from trainers.data import EpisodeStore
    from trainers.fidelity import encode_frames, rollout, select_starts

    mod = _load("model_agreement")
    store = make_pong_store(tmp_path / "store")
    twin = tmp_path / "twin"  # the same model under another path
    shutil.copytree(tiny_bundle, twin)
    out = mod.main(["--data", str(store), "--world-models", str(tiny_bundle), str(twin), "--contexts", "4",
                    "--horizons", "1", "3", "--history", "4", "--seeds", "0", "--temperature", "0"])
    (pair,) = out["pairs"].values()  # the same model twice, the same seed: the same rollouts
    assert pair["between"] == [0.0, 0.0] and np.allclose(pair["error_corr"], 1.0)
    assert np.allclose(pair["mean_mse"], out["mse"][str(tiny_bundle)]) and min(pair["mean_mse"]) > 0
    assert "error correlation" in capsys.readouterr().out
    # the evaluator's own rollout of the same starts gives the same error at each horizon
    model = load_for_env(None, str(tiny_bundle), temperature=0.0)[0].model.eval()
    data, K = EpisodeStore(store).load(), model.context_len
    starts, _ = select_starts(data, history=4, horizon=3, count=4, seed=0)
    rows = starts[:, None] + np.arange(-K, 3)[None]
    actions = torch.from_numpy(np.where(data["action"][rows] < 0, model.num_actions, data["action"][rows]))
    z = encode_frames(model, data["obs"][rows], torch.device("cpu"))
    res = rollout(model, z, actions, data["obs"][rows[:, K:]], horizons=[3],
                  generator=torch.Generator().manual_seed(0), pong=False, gif_contexts=0)
    assert np.allclose(out["mse"][str(tiny_bundle)], res["latent_se"][:, [0, 2]].mean(0), rtol=1e-5)
    real = np.zeros((1, 2, 3))
    e = np.array([[[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]])
    r = mod.agreement({"a": e, "b": -e, "c": np.roll(e, 1, axis=2)}, real, [1])
    assert r["pairs"]["a | b"]["error_corr"] == [-1.0] and r["pairs"]["a | b"]["mean_mse"] == [0.0]
    assert r["pairs"]["a | c"]["error_corr"] == [0.0] and r["mse"]["a"] == [5.0 / 6.0]
    assert r["pairs"]["a | b"]["between"] == [20.0 / 6.0]
    with pytest.raises(ValueError, match=r"pred\['a'\]: expected shape"):
        mod.agreement({"a": e[:, :1], "b": e}, real, [1])
    with pytest.raises(SystemExit):
        mod.main(["--data", str(store), "--world-models", str(tiny_bundle)])
    assert "--world-models: expected >= 2 bundles, got 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        mod.main(["--data", str(store), "--world-models", str(tiny_bundle), str(tiny_bundle) + "/"])
    assert "--world-models: expected distinct bundles" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        mod.main(["--data", str(store), "--world-models", str(tiny_bundle), str(twin), "--seeds", "-1"])
    assert "--seeds: expected every seed >= 0, got [-1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        mod.main(["--data", str(tmp_path / "nostore"), "--world-models", str(tiny_bundle), str(twin)])
    assert "--data: expected an episode store directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        mod.main(["--data", str(store), "--world-models", str(tiny_bundle), str(tmp_path / "none")])
    assert f"--world-models {tmp_path / 'none'}:" in capsys.readouterr().err
    other = tmp_path / "other_encoder"  # the same DiT behind another stage-1 encoder
    shutil.copytree(tiny_bundle, other)
    w = load_file(other / "autoencoder.safetensors")
    save_file({k: v + 0.5 if v.is_floating_point() else v for k, v in w.items()}, other / "autoencoder.safetensors")
    config = json.loads((other / "config.json").read_text())
    weights = (other / "autoencoder.safetensors").read_bytes()
    config["files"]["autoencoder.safetensors"] = hashlib.sha256(weights).hexdigest()
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit):
        mod.main(["--data", str(store), "--world-models", str(tiny_bundle), str(other), "--contexts", "2",
                  "--horizons", "1", "--history", "4"])
    assert f"--world-models {other}: expected the frozen encoder of {tiny_bundle}" in capsys.readouterr().err


def test_draw_spread_reports_on_a_tiny_model(tiny_bundle, tmp_path, capsys):
    from tests.test_fidelity import make_pong_store  # a store with held-out episodes

    mod = _load("draw_spread")
    store = make_pong_store(tmp_path / "store")
    res = mod.main(["--data", str(store), "--world-model", str(tiny_bundle), "--contexts", "16", "--draws", "3",
                    "--temperature", "1"])
    assert res["spread_mean"] > 0 and res["spread_fresh_mean"] > 0
    for key in ("spearman_one", "spearman_mean"):
        assert -1.0 <= res[key] <= 1.0
    assert "Spearman with the spread" in capsys.readouterr().out
    assert mod.spearman(np.array([1.0, 2.0, 3.0]), np.array([10.0, 30.0, 20.0])) == pytest.approx(0.5)
    for bad, flag in ((["--draws", "1"], "--draws"), (["--contexts", "5"], "--contexts")):
        with pytest.raises(SystemExit) as e:
            mod.main(["--data", str(store), "--world-model", str(tiny_bundle), *bad])
        assert e.value.code == 2 and flag in capsys.readouterr().err
