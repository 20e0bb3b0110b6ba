"""The diagnostic example scripts run end to end on the bundled model and return well-formed figures."""
from __future__ import annotations

import importlib.util
from pathlib import Path

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


def test_reward_rates_bad_args():
    with pytest.raises(SystemExit):
        _load("reward_rates").main(["--steps", "0"])
