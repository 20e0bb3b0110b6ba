"""Stage 1 (`ditwm collect --agent rssm`): tiny runs on real Pong — artifacts, bit-exact resume, SIGTERM."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from trainers.checkpoint import load_checkpoint
from trainers.collect import Args, main

TINY = dict(agent="rssm", size="tiny", num_envs=2, prefill=64, ae_steps=8, train_every=16, checkpoint_every=96,
            chunk_rows=64, segment_reset=True)


def run(out, steps, resume=False):
    return main(Args(steps=steps, out=str(out), resume=resume, **TINY))


def test_tiny_run_writes_store_artifacts_and_checkpoint(tmp_path, capsys):
    assert run(tmp_path / "a", 192) == 0
    printed = capsys.readouterr().out
    assert "env steps/s" in printed and "artifacts" in printed
    art = tmp_path / "a" / "stage1"
    for f in ("autoencoder.safetensors", "autoencoder.json", "agent.safetensors", "agent.json"):
        assert (art / f).is_file()
    from dit_envs.bundle import load_bundle
    b = load_bundle(art / "rssm", expect={"game": "Pong", "num_actions": 6})
    assert b.config["model_type"] == "rssm"
    tensors, meta = load_checkpoint(tmp_path / "a")
    assert meta["env_steps"] == 192 and meta["phase"] == "agent" and meta["updates"] == (192 - 64) // 16


def test_resume_in_new_process_is_bit_exact(tmp_path, monkeypatch):
    # Same thread count in this process and the child: float reductions differ between thread counts, and
    # other tests (e.g. pretrain --threads 1) change this process's setting.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    try:
        _resume_equality(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _resume_equality(tmp_path):
    assert run(tmp_path / "full", 288) == 0
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    first = subprocess.run([sys.executable, "-m", "trainers.cli", "collect", "--agent", "rssm", "--size", "tiny",
                            "--num-envs", "2", "--prefill", "64", "--ae-steps", "8", "--train-every", "16",
                            "--checkpoint-every", "96", "--chunk-rows", "64", "--steps", "192", "--segment-reset",
                            "--out", str(tmp_path / "split")], cwd=root, capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert first.returncode == 0, first.stderr
    assert run(tmp_path / "split", 288, resume=True) == 0
    a, ma = load_checkpoint(tmp_path / "full")
    b, mb = load_checkpoint(tmp_path / "split")
    assert ma["env_steps"] == mb["env_steps"] == 288 and ma["updates"] == mb["updates"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sigterm_writes_checkpoint_and_exits_143(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "t"
    proc = subprocess.Popen([sys.executable, "-m", "trainers.cli", "collect", "--agent", "rssm", "--size", "tiny",
                             "--num-envs", "2", "--prefill", "64", "--ae-steps", "8", "--train-every", "4",
                             "--checkpoint-every", "100000", "--steps", "100000", "--out", str(out)],
                            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or os.path.getsize(out / "metrics.jsonl") == 0:
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else "timeout"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    _, meta = load_checkpoint(out)
    assert 0 < meta["env_steps"] < 100000
    assert run(out, meta["env_steps"] + 64, resume=True) == 0


def test_bad_rssm_arguments(tmp_path, capsys):
    from trainers import cli
    assert cli.main(["collect", "--agent", "rssm", "--steps", "10", "--train-every", "0",
                     "--out", str(tmp_path / "x")]) == 2
    assert "--train-every" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
