"""Rejection sampling of imagined steps (`ImaginationCore.set_resample_rule`) and Pong's lost-ball rule
(`ditwm train-agent --keep-ball R`)."""
from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
import torch

import dit_envs  # noqa: F401  (registers the ids)
from dit_envs.envs.imagination import DiTWMVectorEnv
from tests.conftest import make_tiny_bundle
from tests.test_pong_objects import _field_frame
from trainers import cli
from trainers.checkpoint import load_checkpoint
from trainers.pong_fates import LostBallRule, keep_ball


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("keep_ball") / "b", game="Pong")


def _env(bundle, n=16):
    return gym.make_vec("DiTWM/Pong-v0", num_envs=n, checkpoint=str(bundle), obs_type="latent",
                        max_episode_steps=1000)


def positive_first(prev_z, z, reward, term):
    """A rule for the tests: reject every step whose newest latent has a positive third entry (about half of the
    tiny model's draws)."""
    return z[:, 2] > 0


def _rate_and_obs(bundle, rule, draws, steps=30):
    env = _env(bundle)
    if rule is not None:
        env.unwrapped.core.set_resample_rule(rule, draws)
    obs, _ = env.reset(seed=3)
    rng = np.random.default_rng(0)
    seen = []
    for _ in range(steps):
        obs, _, term, trunc, _ = env.step(rng.integers(0, 6, 16))
        seen.append(obs[~(term | trunc), -1, 2])  # the newest latent of the envs that did not just reset
    return float((np.concatenate(seen) > 0).mean()), env.unwrapped.core.resample_counts, obs


def test_rejected_steps_are_drawn_again_and_the_state_follows(bundle):
    free, _, _ = _rate_and_obs(bundle, None, 0)
    kept, counts, obs = _rate_and_obs(bundle, positive_first, 6)
    assert 0.2 < free < 0.8  # the rule rejects a fair share of the model's draws
    assert kept < 0.25 * free  # the observations (the env state) hold the accepted draws
    assert counts["steps"] == 30 * 16 and 0 < counts["still_rejected"] < counts["rejected"]
    assert counts["resampled"] == 6 * counts["rejected"]
    again = _rate_and_obs(bundle, positive_first, 6)
    assert np.array_equal(obs, again[2])  # seeded: rejection sampling is reproducible


def test_a_step_rejected_in_every_draw_gets_the_rejected_reward(bundle):
    env = _env(bundle)
    env.unwrapped.core.set_resample_rule(positive_first, 1, rejected_reward=-7.0)
    env.reset(seed=3)
    rng = np.random.default_rng(0)
    penalised = sum(int((env.step(rng.integers(0, 6, 16))[1] == -7.0).sum()) for _ in range(30))
    assert penalised == env.unwrapped.core.resample_counts["still_rejected"] > 0


def test_the_rejection_penalty_charges_every_step_rejected_at_the_first_draw(bundle):
    rewards = {}
    for penalty in (0.0, 0.25):
        env = _env(bundle)
        env.unwrapped.core.set_resample_rule(positive_first, 2, rejection_penalty=penalty)
        env.reset(seed=3)
        rng = np.random.default_rng(0)
        rewards[penalty] = np.stack([env.step(rng.integers(0, 6, 16))[1] for _ in range(30)])
        counts = env.unwrapped.core.resample_counts
    charged = np.isclose(rewards[0.0] - rewards[0.25], 0.25, atol=1e-6)  # the same draws, seeded alike
    assert np.isclose(rewards[0.0] - rewards[0.25], 0.0, atol=1e-6)[~charged].all()
    assert int(charged.sum()) == counts["rejected"] > counts["still_rejected"]  # kept redraws are charged too


def test_a_step_rejected_in_every_draw_is_undone_and_truncates(bundle):
    env = _env(bundle)
    env.unwrapped.core.set_resample_rule(positive_first, 1, truncate_rejected=True)
    obs, _ = env.reset(seed=3)
    rng = np.random.default_rng(0)
    cut = 0
    for _ in range(30):
        prev = obs
        obs, reward, term, trunc, info = env.step(rng.integers(0, 6, 16))
        for i in np.flatnonzero(trunc):
            assert np.array_equal(info["final_obs"][i], prev[i]) and reward[i] == 0.0  # the step was undone
            assert env.unwrapped.core.elapsed[i] == 0  # and the env started a new episode
        kept = ~(term | trunc)
        assert (obs[kept, -1, 2] <= 0).all()  # no rejected draw reaches the policy
        cut += int(trunc.sum())
    assert cut == env.unwrapped.core.resample_counts["still_rejected"] > 0


def test_the_single_pixel_env_truncates_at_an_undone_step(bundle):
    env = gym.make("DiTWM/Pong-v0", checkpoint=str(bundle), obs_type="pixels", max_episode_steps=1000)
    env.unwrapped.core.set_resample_rule(positive_first, 1, truncate_rejected=True)
    obs, _ = env.reset(seed=3)
    for t in range(200):
        prev = obs
        obs, reward, term, trunc, _ = env.step(t % 6)
        if trunc:
            break
    assert trunc and not term and reward == 0.0 and np.array_equal(obs, prev)  # the frame before the undone step
    with pytest.raises(gym.error.ResetNeeded):
        env.step(0)


def test_resample_rule_errors(bundle):
    core = _env(bundle, 2).unwrapped.core
    with pytest.raises(ValueError, match="rule: expected None or a callable"):
        core.set_resample_rule("not callable", 2)
    with pytest.raises(ValueError, match="max_resamples: expected an integer >= 1"):
        core.set_resample_rule(positive_first, 0)
    with pytest.raises(ValueError, match="rejected_reward: expected None or a finite number"):
        core.set_resample_rule(positive_first, 2, float("nan"))
    with pytest.raises(ValueError, match="truncate_rejected: expected a bool, got 'yes'"):
        core.set_resample_rule(positive_first, 2, None, "yes")
    for bad in (-0.1, float("inf"), True, "0.1"):
        with pytest.raises(ValueError, match="rejection_penalty: expected a finite number >= 0"):
            core.set_resample_rule(positive_first, 2, rejection_penalty=bad)
    with pytest.raises(ValueError, match="rejection_penalty: expected 0 without a rule, got 0.1"):
        core.set_resample_rule(None, 0, rejection_penalty=0.1)
    env = _env(bundle, 2)
    env.unwrapped.core.set_resample_rule(lambda p, z, r, t: torch.zeros(3, dtype=torch.bool), 2)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"resample_rule: expected a bool mask of shape \(2,\)"):
        env.step(np.zeros(2, np.int64))


def _decode_ball_at(cols, paddles=None):
    """A fake ``decode``: latent row ``i`` → a field frame with the ball at row 30, column ``cols[v]`` and the agent's
    paddle centred on row ``paddles[v]`` (None: not drawn), ``v`` the row's first entry."""
    def decode(z):
        frames = []
        for v in z[:, 0].tolist():
            f = _field_frame()
            c, p = cols[int(v)], (paddles or {}).get(int(v))
            if p is not None:
                f[:, p - 3:p + 3, 56:58] = np.array([92, 186, 92], np.uint8)[:, None, None]
            if c is not None:
                f[:, 30, c] = 236
            frames.append(f)
        return torch.as_tensor(np.stack(frames))
    return decode


def _hist(*rows):
    """``history (n, 2, 1)`` from pairs of latent values (oldest first)."""
    return torch.tensor(rows, dtype=torch.float32)[:, :, None]


def test_lost_ball_rule_on_synthetic_frames():
    rule = LostBallRule(_decode_ball_at([30, None, 62, 56]))  # latent value → ball column
    hist = _hist(*[(0, p) for p in (0, 0, 2, 1, 0, 0, 3)])
    nxt = torch.tensor([[1.0], [3.0], [1.0], [1.0], [1.0], [1.0], [1.0]])
    reward = torch.tensor([0.1, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0])  # 0.1: an expected reward (RSSM), no point
    term = torch.tensor([False, False, False, False, False, True, False])
    # lost in mid-field; kept; lost at the field's edge (col 62); no ball before; a point; the game ended; lost at
    # the agent's paddle (col 56)
    assert rule(hist, nxt, reward, term).tolist() == [True, False, False, False, False, False, True]


def test_phantom_returns_rule_on_synthetic_frames():
    # ball columns 44, 50 (paddle far), 50 (paddle at the ball), 46, 52, 40
    decode = _decode_ball_at([44, 50, 50, 46, 52, 40], paddles={1: 50, 2: 30})
    hist = _hist((0, 1), (0, 2), (0, 1), (3, 0))
    nxt = torch.tensor([[3.0], [3.0], [4.0], [5.0]])
    quiet, going = torch.zeros(4), torch.zeros(4, dtype=torch.bool)
    # turned with the paddle 20 px away: phantom; turned at the paddle: a return; did not turn; moving left
    assert LostBallRule(decode, phantom_returns=True)(hist, nxt, quiet, going).tolist() == [True, False, False,
                                                                                           False]
    assert not LostBallRule(decode)(hist, nxt, quiet, going).any()
    with pytest.raises(ValueError, match="history: expected at least 2 latents per env for phantom returns, got 1"):
        LostBallRule(decode, phantom_returns=True)(hist[:, -1:], nxt, quiet, going)


def test_keep_ball_attach_and_refusals(bundle, tmp_path):
    env = _env(bundle, 2)
    keep_ball(env, 3)
    assert isinstance(env.unwrapped.core.resample_rule, LostBallRule) and env.unwrapped.core.max_resamples == 3
    keep_ball(env, 0)
    assert env.unwrapped.core.resample_rule is None
    with pytest.raises(ValueError, match="max_resamples: expected an integer >= 0, got -1"):
        keep_ball(env, -1)
    with pytest.raises(ValueError, match="lost_ball_reward: expected it only with max_resamples >= 1"):
        keep_ball(env, 0, -1.0)
    keep_ball(env, 2, -1.0)
    assert env.unwrapped.core.rejected_reward == -1.0 and not env.unwrapped.core.truncate_rejected
    with pytest.raises(ValueError, match="truncate_lost: expected it only with max_resamples >= 1"):
        keep_ball(env, 0, None, False, True)
    with pytest.raises(ValueError, match="truncate_lost: expected a bool, got 'no'"):
        keep_ball(env, 2, None, False, "no")
    keep_ball(env, 2, None, False, True)
    assert env.unwrapped.core.truncate_rejected and env.unwrapped.core.rejection_penalty == 0.0
    with pytest.raises(ValueError, match="rejection_penalty: expected it only with max_resamples >= 1"):
        keep_ball(env, 0, rejection_penalty=0.1)
    with pytest.raises(ValueError, match="rejection_penalty: expected a finite number >= 0, got -0.1"):
        keep_ball(env, 2, rejection_penalty=-0.1)
    keep_ball(env, 2, rejection_penalty=0.05)
    assert env.unwrapped.core.rejection_penalty == 0.05
    other = DiTWMVectorEnv(2, obs_type="latent",
                           checkpoint=str(make_tiny_bundle(tmp_path / "breakout", game="Breakout", num_actions=4)))
    with pytest.raises(ValueError, match="max_resamples: expected 0 for a world model of another game than Pong, "
                                         "got 2 for game 'Breakout'"):
        keep_ball(other, 2)
    with pytest.raises(ValueError, match="envs: expected an imagination env"):
        keep_ball(gym.make_vec("CartPole-v1", num_envs=2), 2)


def test_train_agent_keep_ball_logs_rejection_rates(bundle, tmp_path, capsys):
    out = tmp_path / "kb"
    argv = ["train-agent", "--world-model", str(bundle), "--init", "scratch", "--steps", "2", "--eval-every", "2",
            "--num-envs", "4", "--horizon", "3", "--eval-episodes", "2", "--eval-max-steps", "10", "--out", str(out)]
    assert cli.main([*argv, "--keep-ball", "2"]) == 0
    last = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "rejected_rate" in r]
    assert [r["updates"] for r in last] == [2]
    assert 0.0 <= last[0]["still_rejected_rate"] <= last[0]["rejected_rate"] <= 1.0
    assert load_checkpoint(out)[1]["args"]["keep_ball"] == 2
    capsys.readouterr()
    assert cli.main([*argv, "--keep-ball", "3", "--resume"]) == 2  # another env than the run being resumed
    assert "--keep-ball" in capsys.readouterr().err
    assert cli.main([*argv, "--keep-ball", "2", "--rejection-penalty", "0.1", "--resume"]) == 2
    assert "--rejection-penalty" in capsys.readouterr().err
    for bad, flag in ((["--keep-ball", "-1"], "--keep-ball"),
                      (["--keep-ball", "2", "--world-model", "real:/nonexistent"], "--keep-ball"),
                      (["--lost-ball-reward", "-1"], "--lost-ball-reward"),
                      (["--keep-ball", "2", "--lost-ball-reward", "inf"], "--lost-ball-reward"),
                      (["--keep-ball-returns"], "--keep-ball-returns"),
                      (["--lost-ball-truncate"], "--lost-ball-truncate"),
                      (["--rejection-penalty", "0.1"], "--rejection-penalty"),
                      (["--keep-ball", "2", "--rejection-penalty", "-1"], "--rejection-penalty")):
        assert cli.main([*argv[:-1], str(tmp_path / "bad"), *bad]) == 2
        err = capsys.readouterr().err
        assert flag in err and "max_resamples" not in err and not (tmp_path / "bad").exists()
