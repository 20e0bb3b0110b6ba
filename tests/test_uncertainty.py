"""Draw disagreement of imagined steps (`dit_envs.envs.uncertainty`) and its penalty
(`ImaginationCore.set_uncertainty_penalty`, `ditwm train-agent --uncertainty-penalty P`)."""
from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
import torch

import dit_envs  # noqa: F401  (registers the ids)
from dit_envs.envs.uncertainty import UncertaintyPenalty, calibrate_threshold, draw_spread
from tests.conftest import make_tiny_bundle
from trainers import cli
from trainers.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("uncertainty") / "b", game="Pong")


def _env(bundle, n=16, **kw):
    return gym.make_vec("DiTWM/Pong-v0", num_envs=n, checkpoint=str(bundle), obs_type="latent",
                        max_episode_steps=1000, **kw)


def test_the_spread_is_zero_for_a_deterministic_sampler_and_grows_with_the_temperature(bundle):
    spreads = {}
    for temperature in (0.0, 0.5, 1.0):
        core = _env(bundle, temperature=temperature).unwrapped.core
        core.reset_envs()
        actions = torch.arange(16) % 6
        gen = torch.Generator().manual_seed(0)
        first = core.model.step(core.state, actions, gen)[1]
        spreads[temperature] = draw_spread(core.model, core.state, actions, 4, gen, first=first)
        assert spreads[temperature].shape == (16,) and spreads[temperature].dtype == torch.float32
    assert torch.all(spreads[0.0] < 1e-10)  # every draw is the same latent
    assert 0 < spreads[0.5].mean() < spreads[1.0].mean()
    with pytest.raises(ValueError, match="draws: expected an integer >= 2, got 1"):
        draw_spread(core.model, core.state, actions, 1, gen)


def _rewards(bundle, penalty, threshold, steps=20):
    env = _env(bundle, temperature=1.0)
    assert env.unwrapped.core.set_uncertainty_penalty(penalty, 3, threshold=threshold) == threshold
    obs, _ = env.reset(seed=3)
    rng = np.random.default_rng(0)
    out = [env.step(rng.integers(0, 6, 16)) for _ in range(steps)]
    return np.stack([o[1] for o in out]), out[-1][0], env.unwrapped.core.uncertainty


def test_the_penalty_charges_exactly_the_steps_whose_spread_passes_the_threshold(bundle):
    base, obs, unc = _rewards(bundle, 0.25, 0.0)  # threshold 0: at temperature 1 every step is uncertain
    assert unc.counts["uncertain"] == unc.counts["steps"] == 20 * 16
    mid = float(unc.counts["spread_sum"] / unc.counts["steps"])  # the mean spread: some steps pass it, some not
    low, obs_low, unc_low = _rewards(bundle, 0.25, mid)
    high, obs_high, unc_high = _rewards(bundle, 0.75, mid)
    assert np.array_equal(obs_low, obs_high)  # the size of the penalty never changes the trajectory
    charged = np.isclose(low - high, 0.5, atol=1e-6)
    assert np.isclose(low, high, atol=1e-6)[~charged].all()
    assert 0 < int(charged.sum()) == unc_low.counts["uncertain"] < unc_low.counts["steps"]
    rates = unc_low.rates()
    assert rates["uncertain_rate"] == pytest.approx(charged.mean()) and rates["spread_mean"] > 0
    assert unc_low.rates() == {}  # reset by the call


def _truncating_run(bundle, penalty, threshold, steps=20):
    env = _env(bundle, temperature=1.0)
    env.unwrapped.core.set_uncertainty_penalty(penalty, 3, threshold=threshold, truncate=np.True_)
    obs, _ = env.reset(seed=3)
    rng = np.random.default_rng(0)
    out = []
    for _ in range(steps):
        prev = obs
        obs, reward, term, trunc, info = env.step(rng.integers(0, 6, 16))
        out.append((prev, reward, term, trunc, info))
    return out, env.unwrapped.core


def test_truncation_ends_exactly_the_uncertain_steps_episodes_at_their_successor(bundle):
    probe = _env(bundle, temperature=1.0).unwrapped.core
    probe.set_uncertainty_penalty(0.1, 3, threshold=0.0)
    probe.reset_envs()
    for _ in range(5):
        probe.step(torch.zeros(16, dtype=torch.int64))
    mid = probe.uncertainty.counts["spread_sum"] / probe.uncertainty.counts["steps"]
    low, core = _truncating_run(bundle, 0.25, mid)
    high, _ = _truncating_run(bundle, 0.75, mid)  # the same draws: the size of the penalty changes nothing else
    cut = 0
    for (prev, r_low, term, trunc, info), (_, r_high, term_h, trunc_h, _) in zip(low, high):
        uncertain = np.isclose(r_low - r_high, 0.5, atol=1e-6)  # the charged steps
        assert np.array_equal(trunc, uncertain & ~term) and np.array_equal(trunc, trunc_h)
        for i in np.flatnonzero(trunc):  # the episode ends at the uncertain successor, kept as final_obs
            assert np.array_equal(info["final_obs"][i][:-1], prev[i][1:])
        cut += int(trunc.sum())
    assert 0 < cut < core.uncertainty.counts["steps"]
    off = _env(bundle, temperature=1.0).unwrapped.core
    assert off.set_uncertainty_penalty(0, truncate=np.False_) is None and off.uncertainty is None
    with pytest.raises(ValueError, match="truncate: expected a bool, got 'yes'"):
        core.set_uncertainty_penalty(0.1, truncate="yes")


def test_off_by_default_and_undone_steps_are_neither_charged_nor_counted(bundle):
    from tests.test_keep_ball import positive_first

    runs = []
    for penalty in (None, 0.0):
        env = _env(bundle, temperature=1.0)
        if penalty is not None:
            env.unwrapped.core.set_uncertainty_penalty(penalty)
        env.reset(seed=3)
        rng = np.random.default_rng(0)
        runs.append([env.step(rng.integers(0, 6, 16))[:2] for _ in range(10)])
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(*runs))  # same stream
    env = _env(bundle, temperature=1.0)
    core = env.unwrapped.core
    core.set_resample_rule(positive_first, 1, truncate_rejected=True)
    core.set_uncertainty_penalty(0.1, 2, threshold=0.0)  # every kept step is uncertain
    env.reset(seed=3)
    rng = np.random.default_rng(0)
    for _ in range(10):
        reward, trunc = env.step(rng.integers(0, 6, 16))[1:4:2]
        assert np.all(reward[trunc] == 0.0)  # an undone step is not charged
    assert core.uncertainty.counts["steps"] == 10 * 16 - core.resample_counts["still_rejected"] > 0
    assert core.uncertainty.counts["uncertain"] == core.uncertainty.counts["steps"]


def test_the_threshold_is_calibrated_reproducibly_without_touching_the_envs_draws(bundle):
    core = _env(bundle, temperature=1.0).unwrapped.core
    before = core.generator.get_state()
    t90 = core.set_uncertainty_penalty(0.1, 4, quantile=0.9)
    assert torch.equal(before, core.generator.get_state())
    assert t90 == core.uncertainty.threshold == _env(bundle, temperature=1.0).unwrapped.core.set_uncertainty_penalty(
        0.1, 4, quantile=0.9)
    t50 = calibrate_threshold(core.model, core.start_z, core.start_a, 0.5, 4, core.num_actions)
    assert 0 < t50 < t90
    assert core.set_uncertainty_penalty(0.0) is None and core.uncertainty is None


@pytest.mark.parametrize("kw,match", [
    (dict(penalty=-0.1), "penalty: expected a finite number >= 0, got -0.1"),
    (dict(penalty=float("nan")), "penalty: expected a finite number >= 0"),
    (dict(penalty=True), "penalty: expected a finite number >= 0, got True"),
    (dict(penalty=0.1, draws=1), "draws: expected an integer >= 2, got 1"),
    (dict(penalty=0.1, quantile=1.0), r"quantile: expected a number in \(0, 1\), got 1.0"),
    (dict(penalty=0.1, threshold=-1.0), "threshold: expected a finite number >= 0, got -1.0"),
])
def test_bad_settings_are_refused_by_name(bundle, kw, match):
    core = _env(bundle, 2).unwrapped.core
    with pytest.raises(ValueError, match=match):
        core.set_uncertainty_penalty(**kw)
    assert core.uncertainty is None
    with pytest.raises(ValueError, match="penalty: expected a finite number > 0, got 0"):
        UncertaintyPenalty(0, 2, 1.0)


def test_train_agent_uncertainty_penalty_logs_its_rates_and_is_checked_on_resume(bundle, tmp_path, capsys):
    out = tmp_path / "u"
    argv = ["train-agent", "--world-model", str(bundle), "--init", "scratch", "--steps", "2", "--eval-every", "2",
            "--num-envs", "4", "--horizon", "3", "--eval-episodes", "2", "--eval-max-steps", "10", "--out", str(out)]
    unc = ["--temperature", "1", "--uncertainty-penalty", "0.1", "--uncertainty-draws", "3"]
    assert cli.main([*argv, *unc]) == 0
    assert "uncertainty penalty 0.1 on steps whose spread of 3 draws passes" in capsys.readouterr().out
    rec = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "uncertain_rate" in r]
    assert [r["updates"] for r in rec] == [2] and 0.0 <= rec[0]["uncertain_rate"] <= 1.0 and rec[0]["spread_mean"] > 0
    assert load_checkpoint(out)[1]["args"]["uncertainty_penalty"] == 0.1
    assert cli.main([*argv, *unc[:3], "0.2", *unc[4:], "--resume"]) == 2
    assert "--uncertainty-penalty" in capsys.readouterr().err
    for bad, flag in ((["--uncertainty-penalty", "-1"], "--uncertainty-penalty"),
                      (["--uncertainty-draws", "3"], "--uncertainty-draws"),  # without the penalty
                      (["--uncertainty-quantile", "0.5"], "--uncertainty-quantile"),
                      (["--uncertainty-penalty", "0.1", "--uncertainty-draws", "1"], "--uncertainty-draws"),
                      (["--uncertainty-penalty", "0.1", "--uncertainty-quantile", "2"], "--uncertainty-quantile"),
                      (["--uncertainty-penalty", "0.1", "--world-model", "real:/x"], "--uncertainty-penalty"),
                      (["--uncertainty-truncate", "--world-model", "real:/x"], "--uncertainty-truncate"),
                      (["--uncertainty-penalty", "0.1", "--uncertainty-draws", "1", "--world-model", "/nope"],
                       "--uncertainty-draws")):  # checked before the model loads
        assert cli.main([*argv[:-1], str(tmp_path / "bad"), *bad]) == 2
        err = capsys.readouterr().err
        assert flag in err and err.count("\n") == 1
        assert not (tmp_path / "bad").exists()
