"""`ditwm evaluate throughput`: the figures it prints and writes, with and without the uncertainty draws."""
import json

from trainers import cli


def test_throughput_reports_every_figure(tmp_path, capsys, monkeypatch):
    from dit_envs.envs.uncertainty import UncertaintyPenalty

    calls = []
    apply = UncertaintyPenalty.apply
    monkeypatch.setattr(UncertaintyPenalty, "apply",
                        lambda self, *a, **k: (calls.append(self.draws), apply(self, *a, **k))[1])
    out = tmp_path / "t.json"
    argv = ["evaluate", "throughput", "--random-init", "tiny:tiny", "--num-envs", "4", "--steps", "2", "--repeats",
            "1", "--warmup", "1", "--threads", "1", "--uncertainty-draws", "3", "--json-out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "uncertainty penalty of 3 draws" in printed and "real ALE Pong" in printed
    figures = json.loads(out.read_text())
    for key in ("imagined_latent_steps_per_s", "imagined_pixels_steps_per_s", "imagined_uncertainty_steps_per_s",
                "real_ale_steps_per_s"):
        assert figures[key] > 0, key
    assert figures["args"]["uncertainty_draws"] == 3
    assert calls and set(calls) == {3}  # the timed env really drew 3 per step


def test_throughput_refuses_one_draw(tmp_path, capsys):
    assert cli.main(["evaluate", "throughput", "--random-init", "tiny:tiny", "--uncertainty-draws", "1"]) == 2
    assert "--uncertainty-draws" in capsys.readouterr().err
