"""Stage-1 autoencoder trainer: learning, bit-exact resume, the reconstruction report, and the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load, save as st_save
from torch import nn

from tests.conftest import random_frames
from dit_envs import make_real_env
from dit_envs.models.autoencoder import AUTOENCODER_PRESETS, FrameAutoencoder
from trainers import cli as ditwm
from trainers.autoencoder import Args, AutoencoderTrainer, load_autoencoder, lr_at, main, reconstruction_report
from trainers.data import EpisodeStore


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _trainer(seed: int) -> AutoencoderTrainer:
    torch.manual_seed(seed)
    return AutoencoderTrainer(FrameAutoencoder(AUTOENCODER_PRESETS["tiny"]), lr=3e-3, total_steps=50, warmup=2)


class _Identity(nn.Module):
    """A perfect "autoencoder": the latent is the frame itself."""

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        return frames.flatten(1).float()

    def decode_uint8(self, z: torch.Tensor) -> torch.Tensor:
        return z.reshape(-1, 3, 64, 64).to(torch.uint8)


class _Blank(_Identity):
    """Reconstructs every frame as the plain background: every object is lost."""

    def decode_uint8(self, z: torch.Tensor) -> torch.Tensor:
        out = torch.empty(len(z), 3, 64, 64, dtype=torch.uint8)
        out[:] = torch.tensor([144, 72, 17], dtype=torch.uint8)[:, None, None]
        return out


@pytest.fixture(scope="module")
def real_frames() -> np.ndarray:
    """60 real Pong frames (4 envs × 15 random steps, after the serve so the ball is often in play)."""
    env = make_real_env("Pong", num_envs=4, seed=0)
    rng = np.random.default_rng(0)
    obs, _ = env.reset(seed=0)
    frames = []
    for i in range(75):
        obs, *_ = env.step(rng.integers(0, 6, 4))
        if i >= 60:
            frames.append(obs)
    env.close()
    return np.concatenate(frames)


def test_schedule_warmup_then_cosine():
    assert lr_at(0, 1.0, 10, 100) == pytest.approx(0.1) and lr_at(9, 1.0, 10, 100) == pytest.approx(1.0)
    assert lr_at(100, 1.0, 10, 100) == pytest.approx(0.1) and lr_at(500, 1.0, 10, 100) == pytest.approx(0.1)
    assert 0.1 < lr_at(55, 1.0, 10, 100) < 1.0
    with pytest.raises(ValueError, match="total_steps"):
        AutoencoderTrainer(FrameAutoencoder(AUTOENCODER_PRESETS["tiny"]), total_steps=0)


def test_train_step_lowers_loss():
    tr = _trainer(0)
    frames = random_frames(8, _gen())
    first = tr.train_step(frames)
    for _ in range(40):
        m = tr.train_step(frames)
    assert tr.step == 41 and m["loss"] < 0.5 * first["loss"]
    assert {"loss", "psnr", "lr", "grad_norm"} <= set(m)
    with pytest.raises(ValueError, match="frames"):
        tr.train_step(frames.float())


def test_state_dict_round_trip_resumes_bit_exactly():
    batches = [random_frames(4, _gen(i)) for i in range(4)]
    a = _trainer(0)
    for b in batches[:2]:
        a.train_step(b)
    tensors, meta = a.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in tensors.values())
    tensors = st_load(st_save(tensors))  # through safetensors bytes and JSON text: no pickle anywhere
    meta = json.loads(json.dumps(meta))
    b = _trainer(1)  # different initialisation, overwritten by the load
    b.load_state_dict(tensors, meta)
    assert b.step == 2
    for x in batches[2:]:
        ma, mb = a.train_step(x), b.train_step(x)
        assert ma == mb
    for (name, pa), pb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(pa, pb), name
    ta, tb = a.state_dict()[0], b.state_dict()[0]
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_report_perfect_and_blank_reconstruction(real_frames):
    perfect = reconstruction_report(_Identity(), real_frames, batch=16)
    assert perfect["frames"] == len(real_frames) and perfect["psnr"] >= 100
    assert perfect["agent"]["visible"] > 0 and perfect["ball"]["visible"] > 0
    for name in ("ball", "agent", "opponent"):
        r = perfect[name]
        if r["visible"]:
            assert r["within_2px"] == 1.0 and r["missing"] == 0.0 and r["median_px"] == 0.0
    blank = reconstruction_report(_Blank(), real_frames)
    assert blank["ball"]["within_2px"] == 0.0 and blank["ball"]["missing"] == 1.0
    assert blank["agent"]["median_px"] == float("inf")
    with pytest.raises(ValueError, match="frames"):
        reconstruction_report(_Identity(), real_frames[:, :1])


def _store(path, episodes: int = 11, length: int = 6) -> None:
    """A small synthetic episode store: ``episodes`` episodes of ``length`` Pong-like frames each."""
    store = EpisodeStore(path, chunk_rows=64)
    store.write_meta(game="Pong", action_meanings=["NOOP"] * 6, protocol={})
    g = _gen()
    for e in range(episodes):
        n = length
        store.add(obs=random_frames(n, g).numpy(), action=np.r_[-1, np.zeros(n - 1, np.int64)],
                  reward=np.zeros(n, np.float32), terminated=np.r_[np.zeros(n - 1, bool), True],
                  truncated=np.zeros(n, bool), episode=np.full(n, e), step=np.arange(n))
    store.flush()


def test_cli_trains_writes_and_reports(tmp_path, capsys):
    _store(tmp_path / "data")
    out = tmp_path / "ae"
    assert main(Args(data=str(tmp_path / "data"), out=str(out), steps=3, batch=4, preset="tiny", log_every=1)) == 0
    text = capsys.readouterr().out
    assert "held-out reconstruction" in text and "ball" in text
    assert {"autoencoder.safetensors", "autoencoder.json", "report.json", "metrics.jsonl"} <= {
        p.name for p in out.iterdir()}
    report = json.loads((out / "report.json").read_text())
    assert report["heldout_report"]["frames"] == 6 and report["latent_dim"] == 32
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4  # 3 steps + the held-out report
    ae = load_autoencoder(out)
    x = random_frames(2, _gen(5))
    assert ae.encode(x).shape == (2, 32)
    with pytest.raises(ValueError, match="autoencoder.json"):
        (out / "autoencoder.json").write_text(json.dumps({"latent_size": 12}))
        load_autoencoder(out)


@pytest.mark.parametrize("argv, field", [
    (["--steps", "0"], "--steps"),
    (["--steps", "5", "--batch", "0"], "--batch"),
    (["--steps", "5", "--lr", "0"], "--lr"),
    (["--steps", "5", "--data", "NOSTORE"], "--data"),
])
def test_cli_bad_args_exit_2_nothing_written(tmp_path, capsys, argv, field):
    _store(tmp_path / "data")
    argv = [a.replace("NOSTORE", str(tmp_path / "nostore")) for a in argv]
    if "--data" not in argv:
        argv += ["--data", str(tmp_path / "data")]
    out = tmp_path / "new"
    assert ditwm.main(["train-autoencoder", *argv, "--out", str(out), "--preset", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert field in err and len(err.splitlines()) == 1
    assert not out.exists() and not (tmp_path / "nostore").exists()


def test_cli_refuses_non_empty_out(tmp_path, capsys):
    _store(tmp_path / "data")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    assert ditwm.main(["train-autoencoder", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"),
                       "--steps", "1"]) == 2
    assert "--out" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
