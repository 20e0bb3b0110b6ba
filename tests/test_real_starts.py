"""Exhaustive real-game starts (`--starts`): with sticky actions off a game is fixed by its no-op count at reset."""
from __future__ import annotations

import json

import numpy as np
import pytest

from dit_envs.envs.real import PROTOCOL, make_start_env, parse_starts, start_seeds
from trainers import cli


def test_parse_starts():
    assert parse_starts("") is None
    assert parse_starts("all") == list(range(PROTOCOL["noop_max"])) == list(range(30))
    assert parse_starts("30:33") == [30, 31, 32]
    for bad in ("3", "5:5", "4:2", "-1:3", "a:b", "all:"):
        with pytest.raises(ValueError, match=f"starts: expected .* got '{bad}'"):
            parse_starts(bad)


@pytest.mark.parametrize("starts, noop_max", [([0, 2, 5], 30), ([30, 31], 60)])
def test_predicted_seeds_are_the_ones_the_env_gives(starts, noop_max):
    predicted = start_seeds("Pong", starts, noop_max)
    assert predicted.tolist() == start_seeds("Pong", starts, noop_max, scan=True, block=16).tolist()
    with pytest.raises(ValueError, match=r"starts: expected no-op counts in \[0, 30\), got \[30\]"):
        start_seeds("Pong", [1, 30], 30)


def test_a_start_fixes_the_game():
    env, obs, seeds = make_start_env("Pong", [5, 5, 6, 40])  # 40: beyond the protocol's draws
    same, other, frames = [], [], []
    for _ in range(30):
        obs, *_ = env.step(np.zeros(4, np.int64))
        same.append((obs[0] == obs[1]).all())
        other.append((obs[0] == obs[2]).all())
        frames.append(obs)
    obs, info = env.reset(seed=seeds)  # the same games again
    assert info["episode_frame_number"].tolist() == [5, 5, 6, 40]
    for want in frames:
        obs, *_ = env.step(np.zeros(4, np.int64))
        assert (obs == want).all()
    env.close()
    assert all(same) and not all(other)  # one no-op frame apart: the ball is served at another frame


def test_evaluate_agent_starts_cli(tmp_path, capsys):
    js = tmp_path / "r.json"
    assert cli.main(["evaluate", "agent", "--policy", "random", "--starts", "2:5", "--max-steps", "5",
                     "--json-out", str(js)]) == 0
    rep = json.loads(js.read_text())
    assert rep["starts"] == [2, 3, 4] and len(rep["returns"]) == 3 and rep["episodes"] == 3
    assert "over the 3 starts 2:5" in capsys.readouterr().out
    assert cli.main(["evaluate", "agent", "--policy", "random", "--starts", "7"]) == 2
    assert "--starts: expected '', 'all' or 'A:B'" in capsys.readouterr().err
