"""`ditwm pipeline` (the whole recipe, tiny) and `ditwm quickstart` (the README's main job)."""
import json
import shutil

import gymnasium as gym
import numpy as np
import pytest
import torch
from PIL import Image

import dit_envs  # noqa: F401  (registers DiTWM/*)
from dit_envs.bundle import load_bundle
from tests.conftest import PONG_ACTIONS, random_frames
from trainers.pipeline import cli as pipeline
from trainers.pong_objects import track_actions
from trainers.quickstart import cli as quickstart

TINY = ["--tiny", "--env-steps", "192", "--pretrain-steps", "6", "--distill-steps", "4", "--agent-steps", "2",
        "--threads", "1"]


def test_tiny_pipeline_runs_every_stage_then_skips_and_resumes(tmp_path, capsys):
    out = tmp_path / "p"
    assert pipeline(["--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    for stage in ("collect", "pretrain", "distill", "train-agent"):
        assert f"pipeline: {stage}: starting" in printed and f"pipeline: {stage}: exit 0" in printed
    runs = json.loads((out / "pipeline.json").read_text())
    assert [r["stage"] for r in runs] == ["collect", "pretrain", "distill", "train-agent"]
    rel = load_bundle(out / "release" / "pong-v0")
    assert rel.config["dtype"] == "float16" and rel.model.dit.config.shortcut_steps == 4
    assert rel.config["temperature"] == 0.5 == rel.model.temperature
    assert "--temperature 0.5" in " ".join(runs[-1]["argv"])  # stage 3 runs at the release temperature
    assert "Stage 2b: distillation" in (out / "release" / "pong-v0" / "README.md").read_text()
    envs = gym.make_vec("DiTWM/Pong-v0", num_envs=2, checkpoint=str(out / "release" / "pong-v0"))
    envs.reset(seed=0)
    obs, *_ = envs.step(np.array([2, 3]))
    assert obs.shape == (2, 3, 64, 64)
    envs.close()

    assert pipeline(["--out", str(out), *TINY]) == 0  # everything done: nothing runs again
    printed = capsys.readouterr().out
    assert printed.count("skipped") == 6 and "starting" not in printed

    shutil.rmtree(out / "distill" / "bundle")  # a distillation that stopped before its export
    shutil.rmtree(out / "release")
    assert pipeline(["--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "pipeline: distill: resuming" in printed and "--resume" in printed
    assert "pipeline: train-agent: done" in printed and (out / "release" / "pong-v0" / "config.json").is_file()


def test_pipeline_bad_arguments(tmp_path, capsys):
    assert pipeline(["--out", str(tmp_path / "x"), "--env-steps", "0"]) == 2
    assert "--env-steps" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert pipeline(["--out", str(tmp_path / "x"), "--temperature", "-1"]) == 2
    assert "--temperature" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_pipeline_refuses_torchrun(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # each torchrun rank would leave after its first DDP stage
    assert pipeline(["--out", str(tmp_path / "x")]) == 2
    assert "WORLD_SIZE: expected 1" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_quickstart_writes_a_gif_and_prints_steps_per_second(tiny_bundle, tmp_path, capsys):
    gif = tmp_path / "q.gif"
    assert quickstart(["--checkpoint", str(tiny_bundle), "--num-envs", "3", "--steps", "12", "--gif-envs", "2",
                       "--out", str(gif), "--threads", "1", "--temperature", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert "imagined env steps/s" in printed and "3 envs x 12 steps" in printed and "temperature 0.5" in printed
    im = Image.open(gif)
    assert 2 <= im.n_frames <= 13 and im.size == (2 * 64 * 3, 64 * 3)  # PIL merges repeated frames


def test_quickstart_bad_arguments(tiny_bundle, tmp_path, capsys):
    assert quickstart(["--checkpoint", str(tiny_bundle), "--steps", "0", "--out", str(tmp_path / "q.gif")]) == 2
    assert "--steps" in capsys.readouterr().err and not (tmp_path / "q.gif").exists()
    assert quickstart(["--env-id", "DiTWM/Nope-v0", "--out", str(tmp_path / "q.gif")]) == 2
    assert "--env-id" in capsys.readouterr().err
    assert quickstart(["--checkpoint", str(tiny_bundle), "--temperature", "-1", "--out", str(tmp_path / "q.gif")]) == 2
    assert "error: --temperature: expected a finite real number >= 0, got -1.0" in capsys.readouterr().err


def test_track_policy_moves_the_paddle_towards_the_ball():
    frames = random_frames(3, torch.Generator().manual_seed(0)).numpy()
    frames[:, :, 10:59, 50:60] = np.array([144, 72, 17], np.uint8)[:, None, None]  # clear the agent's side
    frames[:, :, 10:59, 30:34] = np.array([144, 72, 17], np.uint8)[:, None, None]
    for i, (paddle_top, ball_row) in enumerate([(40, 15), (12, 50), (30, 33)]):
        frames[i, :, paddle_top:paddle_top + 6, 56:58] = np.array([92, 186, 92], np.uint8)[:, None, None]
        frames[i, :, ball_row, 32] = 236
    actions = track_actions(frames, PONG_ACTIONS, np.random.default_rng(0))
    assert [PONG_ACTIONS[a] for a in actions] == ["RIGHT", "LEFT", "NOOP"]
    with pytest.raises(ValueError, match="action_meanings"):
        track_actions(frames, ["NOOP", "FIRE"], np.random.default_rng(0))


def test_quickstart_runs_the_bundled_pong_model_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    gif = tmp_path / "pong.gif"
    assert quickstart(["--num-envs", "2", "--steps", "6", "--gif-envs", "1", "--out", str(gif)]) == 0
    printed = capsys.readouterr().out
    assert "registry/bundled/pong-v0" in printed and "sampling_steps 2" in printed and gif.stat().st_size > 0


def test_quickstart_bad_checkpoint_and_non_pong_policy(tiny_bundle, tmp_path, capsys):
    assert quickstart(["--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "q.gif")]) == 2
    assert "--checkpoint" in capsys.readouterr().err and not (tmp_path / "q.gif").exists()
