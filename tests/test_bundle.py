"""Checkpoint bundle: round trip, atomic layout, and every validation error (each names its field or file)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import make_tiny_bundle
from dit_envs.bundle import MODEL_LOADERS, load_bundle, save_bundle
from dit_envs.io import sha256_file
from dit_envs.models.autoencoder import AUTOENCODER_PRESETS
from dit_envs.models.dit import DiTConfig
from dit_envs.models.dit_world_model import DiTWorldModel
from dit_envs.models.heads import HeadsConfig

FILES = ["autoencoder.safetensors", "dynamics.safetensors", "heads.safetensors", "start_contexts.safetensors"]


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(src, dst)
    return dst


def _rollout(model, start_z, start_a, steps=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = model.initial_state(start_z, start_a)
    outs = []
    for _ in range(steps):
        action = torch.randint(0, model.num_actions, (start_z.shape[0],), generator=g)
        state, z, r, t = model.step(state, action, g)
        outs += [z, r, t]
    return outs


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_layout_and_config(tiny_bundle):
    names = {p.name for p in tiny_bundle.iterdir()}
    assert names == {"config.json", "README.md", *FILES}
    cfg = json.loads((tiny_bundle / "config.json").read_text())
    assert cfg["format_version"] == 1 and cfg["model_type"] == "dit" and cfg["game"] == "Pong"
    assert cfg["num_actions"] == len(cfg["action_meanings"]) == 6
    assert cfg["obs_shape"] == [3, 64, 64] and cfg["latent_dim"] == 32 and cfg["context_len"] == 4
    assert set(cfg["configs"]) == {"autoencoder", "dit", "heads"} and set(cfg["files"]) == set(FILES)
    assert all(sha256_file(tiny_bundle / f) == h for f, h in cfg["files"].items())
    card = (tiny_bundle / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: dit-wm" in card and "Pong" in card
    assert "dit" in MODEL_LOADERS
    for p in tiny_bundle.parent.iterdir():  # no temp dirs left behind
        assert not p.name.startswith(".")


def test_round_trip_gives_identical_steps(tmp_path):
    path = make_tiny_bundle(tmp_path / "a", card="Measured: nothing yet.")
    b = load_bundle(path, expect=dict(game="Pong", num_actions=6, obs_shape=(3, 64, 64), latent_dim=32))
    assert b.start_z.shape == (8, 4, 32) and b.start_a.dtype == torch.int64 and b.path == path
    assert "Measured: nothing yet." in (path / "README.md").read_text()
    # save the loaded model again and load that: same weights, same rollouts
    path2 = save_bundle(b.model, tmp_path / "b", game="Pong", action_meanings=b.config["action_meanings"],
                        start_z=b.start_z, start_a=b.start_a)
    b2 = load_bundle(path2)
    for x, y in zip(_rollout(b.model, b.start_z, b.start_a), _rollout(b2.model, b2.start_z, b2.start_a)):
        assert torch.equal(x, y)
    # the same seed builds byte-identical weight files
    path3 = make_tiny_bundle(tmp_path / "c")
    assert json.loads((path3 / "config.json").read_text())["files"] == b.config["files"]


def test_loaded_model_equals_saved_model(tmp_path):
    torch.manual_seed(0)
    model = DiTWorldModel.build(
        AUTOENCODER_PRESETS["tiny"],
        DiTConfig.from_preset("tiny", latent_dim=32, num_actions=3, context_len=2),
        HeadsConfig(latent_dim=32, num_actions=3, hidden=16, layers=1),
        sampling_steps=3, temperature=0.75, sampling_shift=2.5,
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.set_latent_stats(torch.randn(32) * 0.1, torch.rand(32) + 0.5)
    start_z, start_a = torch.rand(5, 2, 32) * 2 - 1, torch.randint(0, 4, (5, 2))
    path = save_bundle(model, tmp_path / "m", game="Toy", action_meanings=["A", "B", "C"],
                       start_z=start_z, start_a=start_a)
    b = load_bundle(path, expect=dict(game="Toy", num_actions=3, context_len=2))
    assert b.model.sampling_steps == 3 and torch.equal(b.start_z, start_z) and torch.equal(b.start_a, start_a)
    assert b.model.temperature == 0.75 == b.config["temperature"]
    assert "| temperature | 0.75 |" in (path / "README.md").read_text()
    assert b.model.sampling_shift == 2.5 == b.config["sampling_shift"]
    assert "| sampling_shift | 2.5 |" in (path / "README.md").read_text()
    assert torch.equal(b.model.latent_std, model.latent_std)
    for x, y in zip(_rollout(model, start_z, start_a), _rollout(b.model, b.start_z, b.start_a)):
        assert torch.equal(x, y)


def test_tiny_bundle_rollouts_have_events(tiny_bundle):
    b = load_bundle(tiny_bundle)
    n = 64
    idx = torch.arange(n) % b.start_z.shape[0]
    outs = _rollout(b.model, b.start_z[idx], b.start_a[idx], steps=200)
    rewards, terms = torch.stack(outs[1::3]), torch.stack(outs[2::3])
    assert 0.005 < (rewards != 0).float().mean() < 0.2
    assert 0.0005 < terms.float().mean() < 0.05
    assert (rewards > 0).any() and (rewards < 0).any()


def test_refuses_overwrite(tiny_bundle, tmp_path):
    dst = _copy(tiny_bundle, tmp_path)
    b = load_bundle(dst)
    kw = dict(game="Pong", action_meanings=b.config["action_meanings"], start_z=b.start_z, start_a=b.start_a)
    with pytest.raises(FileExistsError, match="out_dir"):
        save_bundle(b.model, dst, **kw)
    save_bundle(b.model, dst, overwrite=True, **kw, card="second")
    assert "second" in (dst / "README.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    with pytest.raises(ValueError, match="action_meanings"):
        save_bundle(b.model, tmp_path / "x", **{**kw, "action_meanings": ["NOOP"]})
    with pytest.raises(ValueError, match="start_z"):
        save_bundle(b.model, tmp_path / "x", **{**kw, "start_z": b.start_z[:, :2]})
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("fname", ["config.json", *FILES])
def test_missing_file(tiny_bundle, tmp_path, fname):
    dst = _copy(tiny_bundle, tmp_path)
    (dst / fname).unlink()
    with pytest.raises(FileNotFoundError, match=fname):
        load_bundle(dst)


@pytest.mark.parametrize("fname", FILES)
def test_truncated_file_fails_sha256(tiny_bundle, tmp_path, fname):
    dst = _copy(tiny_bundle, tmp_path)
    data = (dst / fname).read_bytes()
    (dst / fname).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{fname}: sha256 expected .* actual"):
        load_bundle(dst)


@pytest.mark.parametrize("fname", FILES)
def test_bit_flip_fails_sha256(tiny_bundle, tmp_path, fname):
    dst = _copy(tiny_bundle, tmp_path)
    data = bytearray((dst / fname).read_bytes())
    data[-3] ^= 0x01  # inside the tensor data: safetensors alone would load this silently
    (dst / fname).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{fname}: sha256"):
        load_bundle(dst)


def test_unreadable_safetensors_with_matching_sha(tiny_bundle, tmp_path):
    dst = _copy(tiny_bundle, tmp_path)
    f = dst / "dynamics.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    cfg = json.loads((dst / "config.json").read_text())
    _edit_config(dst, files={**cfg["files"], f.name: sha256_file(f)})
    with pytest.raises(ValueError, match="dynamics.safetensors: not a readable safetensors"):
        load_bundle(dst)


@pytest.mark.parametrize(
    "expect, message",
    [
        (dict(num_actions=3), "num_actions: bundle has 6, env expects 3"),
        (dict(game="Breakout"), "game: bundle has 'Pong', env expects 'Breakout'"),
        (dict(obs_shape=(3, 84, 84)), r"obs_shape: bundle has \[3, 64, 64\], env expects \(3, 84, 84\)"),
        (dict(latent_dim=256), "latent_dim: bundle has 32, env expects 256"),
        (dict(colour="red"), "colour"),
    ],
)
def test_expect_mismatch(tiny_bundle, expect, message):
    with pytest.raises(ValueError, match=message):
        load_bundle(tiny_bundle, expect=expect)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(format_version=2), "format_version: bundle has 2, expected 1"),
        (dict(model_type="rssm9"), "model_type: bundle has 'rssm9', expected one of"),
        (dict(files={"../autoencoder.safetensors": "0"}), "files: expected plain file names"),
        (dict(latent_dim=64), "latent_dim: config.json has 64"),
    ],
)
def test_bad_config_fields(tiny_bundle, tmp_path, changes, message):
    dst = _copy(tiny_bundle, tmp_path)
    _edit_config(dst, **changes)
    with pytest.raises(ValueError, match=message):
        load_bundle(dst)


def test_bad_json_and_wrong_tensor_shapes(tiny_bundle, tmp_path):
    dst = _copy(tiny_bundle, tmp_path)
    (dst / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        load_bundle(dst)
    shutil.rmtree(dst)
    dst = _copy(tiny_bundle, tmp_path)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["configs"]["dit"]["width"] = 64  # weights no longer fit the config
    _edit_config(dst, configs=cfg["configs"])
    with pytest.raises(ValueError, match="dynamics.safetensors: .* expected shape"):
        load_bundle(dst)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_bundle_loads(tmp_path, dtype):
    path = make_tiny_bundle(tmp_path / "half", dtype=dtype)
    ref = load_bundle(make_tiny_bundle(tmp_path / "full"))
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["dtype"] == str(dtype).removeprefix("torch.")
    assert (path / "dynamics.safetensors").stat().st_size < 0.6 * (ref.path / "dynamics.safetensors").stat().st_size
    b = load_bundle(path)  # float32 by default
    assert next(b.model.parameters()).dtype == torch.float32
    z, _, _ = _rollout(b.model, b.start_z, b.start_a, steps=1)
    z_ref, _, _ = _rollout(ref.model, ref.start_z, ref.start_a, steps=1)
    assert torch.allclose(z, z_ref, atol=0.1)
    b16 = load_bundle(path, dtype=dtype)
    assert next(b16.model.parameters()).dtype == dtype
    z16, r16, t16 = _rollout(b16.model, b16.start_z, b16.start_a, steps=1)
    assert z16.dtype == torch.float32 and r16.dtype == torch.float32 and t16.dtype == torch.bool
