"""Every ``ditwm`` subcommand (and ``ditwm evaluate`` target) prints its ``--help`` and exits 0."""
from __future__ import annotations

import pytest

from trainers.cli import COMMANDS, main
from trainers.evaluate import EVALUATIONS

ARGVS = [[c] for c in COMMANDS if c != "evaluate"] + [["evaluate", w] for w in EVALUATIONS]


@pytest.mark.parametrize("argv", ARGVS, ids=" ".join)
def test_help_prints_and_exits_zero(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "--" in out


def test_top_level_and_evaluate_help(capsys):
    assert main(["--help"]) == 0
    assert main(["evaluate", "--help"]) == 0
    assert "fidelity" in capsys.readouterr().out
