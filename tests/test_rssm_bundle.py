"""RSSM world models in checkpoint bundles: same config fields as the DiT, bit-identical round trip, errors."""
from __future__ import annotations

import json

import pytest
import torch

from dit_envs.bundle import MODEL_LOADERS, load_bundle, save_bundle
from dit_envs.models.autoencoder import AUTOENCODER_PRESETS, FrameAutoencoder
from dit_envs.models.rssm import RSSM
from dit_envs.models.rssm_world_model import RSSMWorldModel
from dit_envs.models.world_model import WorldModel
from tests.conftest import PONG_ACTIONS, random_frames

K = 3


def make_rssm_model(seed: int = 0) -> RSSMWorldModel:
    """Tiny RSSM (deter 16, 4×5 categoricals) over the tiny autoencoder (d_z = 32), 6 Pong actions."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ae = FrameAutoencoder(AUTOENCODER_PRESETS["tiny"])
        rssm = RSSM(ae.latent_dim, len(PONG_ACTIONS), deter=16, stoch=4, classes=5, hidden=12, layers=1,
                    num_bins=31)
        with torch.no_grad():  # move the reward head off its zero init so rewards differ between steps
            for p in rssm.reward_head.parameters():
                p.add_(0.1 * torch.randn(p.shape))
    return RSSMWorldModel(rssm, ae, K).eval()


def _starts(model: RSSMWorldModel, m: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    z = model.encode(random_frames(m * K, g)).reshape(m, K, -1)
    a = torch.randint(0, model.num_actions + 1, (m, K), generator=g)
    a[:, 0] = model.num_actions
    return z, a


def _rollout(model, z, a, steps=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    state, outs = model.initial_state(z, a), []
    for _ in range(steps):
        action = torch.randint(0, model.num_actions, (z.shape[0],), generator=g)
        state, zn, r, t = model.step(state, action, g)
        outs += [zn, r, t, model.decode(zn)]
    return outs


def test_rssm_bundle_round_trip(tmp_path):
    model = make_rssm_model()
    z, a = _starts(model)
    path = save_bundle(model, tmp_path / "rssm", game="Pong", action_meanings=PONG_ACTIONS, start_z=z, start_a=a)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "rssm" and "rssm" in MODEL_LOADERS
    assert (cfg["game"], cfg["num_actions"], cfg["obs_shape"]) == ("Pong", 6, [3, 64, 64])
    assert (cfg["latent_dim"], cfg["context_len"]) == (32, K)
    assert set(cfg["files"]) == {"autoencoder.safetensors", "dynamics.safetensors", "start_contexts.safetensors"}

    b = load_bundle(path, expect=dict(game="Pong", num_actions=6, latent_dim=32, context_len=K))
    assert isinstance(b.model, RSSMWorldModel) and isinstance(b.model, WorldModel)
    assert torch.equal(b.start_z, z) and torch.equal(b.start_a, a)
    for x, y in zip(_rollout(model, z, a), _rollout(b.model, b.start_z, b.start_a)):
        assert torch.equal(x, y)
    assert not torch.equal(_rollout(model, z, a, seed=0)[0], _rollout(model, z, a, seed=1)[0])


def test_rssm_bundle_errors(tmp_path):
    model = make_rssm_model()
    z, a = _starts(model)
    path = save_bundle(model, tmp_path / "rssm", game="Pong", action_meanings=PONG_ACTIONS, start_z=z, start_a=a)
    cfg = json.loads((path / "config.json").read_text())
    cfg["configs"]["rssm"]["deter"] = 17  # weights no longer fit the config
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="dynamics.safetensors: .*expected shape"):
        load_bundle(path)
    del cfg["configs"]["rssm"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="configs: cannot build the rssm"):
        load_bundle(path)
    with pytest.raises(ValueError, match="sampling_steps"):
        model.sampling_steps = 0
