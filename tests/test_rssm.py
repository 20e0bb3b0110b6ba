"""RSSM (DreamerV3) and its WorldModel adapter: shapes, unimix, free bits, determinism, learning. Tiny, CPU."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dit_envs.models.dreamer_layers import categorical_kl, sample_onehot, unimix_logits
from dit_envs.models.rssm import RSSM, RSSMConfig
from dit_envs.models.rssm_world_model import RSSMWorldModel, stack_latents
from dit_envs.models.world_model import WorldModel

D_Z, A, DETER, S, C, HID = 8, 3, 16, 4, 5, 12
B, T, K = 2, 5, 3


class StandInAE(nn.Module):
    """Same methods as FrameAutoencoder: uint8 (N,3,64,64) <-> float (N, d_z)."""

    latent_dim = D_Z

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        return frames.float().mean((1, 2, 3)).unsqueeze(-1).repeat(1, D_Z) / 255.0

    def decode_uint8(self, z: torch.Tensor) -> torch.Tensor:
        return (z.clamp(0, 1).mean(-1) * 255).round().to(torch.uint8)[:, None, None, None].expand(-1, 3, 64, 64)


def make_rssm(seed: int = 0) -> RSSM:
    torch.manual_seed(seed)
    return RSSM(D_Z, A, deter=DETER, stoch=S, classes=C, hidden=HID, layers=1)


def make_batch(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    is_first = torch.zeros(B, T, dtype=torch.bool)
    is_first[:, 0] = True
    action = torch.randint(0, A, (B, T), generator=g)
    action[:, 0] = A  # null action at the episode start
    terminated = torch.zeros(B, T, dtype=torch.bool)
    terminated[0, -1] = True
    return {"z": torch.randn(B, T, D_Z, generator=g), "action": action,
            "reward": torch.randint(-1, 2, (B, T), generator=g).float(), "terminated": terminated,
            "is_first": is_first}


def test_rssm_method_shapes():
    m = make_rssm()
    st = m.initial(B, "cpu")
    assert st["deter"].shape == (B, DETER) and st["stoch"].shape == (B, S, C) and st["logits"].shape == (B, S, C)
    prior = m.img_step(st, torch.tensor([0, A]))
    assert prior["deter"].shape == (B, DETER) and prior["stoch"].shape == (B, S, C)
    assert torch.allclose(prior["stoch"].sum(-1), torch.ones(B, S))  # one-hot forward values
    embed = m.encoder(torch.randn(B, D_Z))
    post, prior = m.obs_step(st, torch.tensor([1, 2]), embed, torch.tensor([True, False]))
    assert post["stoch"].shape == prior["stoch"].shape == (B, S, C)
    assert torch.equal(post["deter"], prior["deter"])
    batch = make_batch()
    posts, priors = m.observe(m.encoder(batch["z"]), batch["action"], batch["is_first"])
    for d in (posts, priors):
        assert d["deter"].shape == (B, T, DETER) and d["stoch"].shape == (B, T, S, C)
    states, acts = m.imagine(st, torch.zeros(B, 4, dtype=torch.long), horizon=4)
    assert states["deter"].shape == (B, 4, DETER) and acts.shape == (B, 4)
    states, acts = m.imagine(st, lambda s: s["stoch"][:, 0].argmax(-1) % A, horizon=3)
    assert states["stoch"].shape == (B, 3, S, C) and acts.dtype == torch.int64
    z, rew_logits, cont = m.heads(states)
    assert z.shape == (B, 3, D_Z) and rew_logits.shape == (B, 3, 255) and cont.shape == (B, 3)
    assert m.twohot.mean(rew_logits).abs().max() < 1e-5  # zero-initialised reward head
    assert RSSM.from_config(RSSMConfig(**m.config.__dict__)).config == m.config


def test_is_first_resets_to_initial_state():
    m = make_rssm()
    embed = m.encoder(torch.randn(B, D_Z))
    junk = {"deter": torch.randn(B, DETER), "stoch": torch.randn(B, S, C)}
    first = torch.ones(B, dtype=torch.bool)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    post_a, _ = m.obs_step(junk, torch.tensor([0, 1]), embed, first, generator=g1)
    post_b, _ = m.obs_step(m.initial(B, "cpu"), torch.tensor([A, A]), embed, first, generator=g2)
    assert torch.allclose(post_a["deter"], post_b["deter"]) and torch.equal(post_a["stoch"], post_b["stoch"])


def test_unimix_probabilities():
    raw = torch.tensor([[100.0, -100.0, -100.0, -100.0]])
    p = unimix_logits(raw, 0.01).exp()
    assert torch.allclose(p, torch.tensor([[0.99 + 0.0025, 0.0025, 0.0025, 0.0025]]), atol=1e-6)
    assert torch.allclose(unimix_logits(raw, 0.01).softmax(-1), p)  # usable as logits
    m = make_rssm()
    with torch.no_grad():
        m.prior_net.net[-1].bias.mul_(0).add_(torch.arange(S * C).float() * 50)  # very peaked prior
    probs = m.initial(B, "cpu")["logits"].exp()
    assert probs.min() >= 0.01 / C - 1e-7
    assert torch.allclose(probs.sum(-1), torch.ones(B, S))


def test_straight_through_sample_is_onehot_with_gradient():
    logits = torch.randn(6, S, C, requires_grad=True)
    x = sample_onehot(logits, torch.Generator().manual_seed(0))
    assert torch.equal(x.detach().sum(-1), torch.ones(6, S)) and set(x.detach().unique().tolist()) <= {0.0, 1.0}
    (x * torch.randn_like(x)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_kl_loss_free_bits():
    m = make_rssm()
    logits = torch.randn(B, T, S, C)
    post = {"logits": logits.clone().requires_grad_(True)}
    prior = {"logits": (logits + 0.01 * torch.randn_like(logits)).requires_grad_(True)}
    loss, metrics = m.kl_loss(post, prior, free=1.0)
    assert metrics["kl_dyn"] < 1.0
    assert loss.item() == pytest.approx(0.5 * 1.0 + 0.1 * 1.0)  # both terms clipped at the free nat
    loss.backward()
    assert post["logits"].grad.abs().max() == 0 and prior["logits"].grad.abs().max() == 0
    # Above the free bits: the loss is the balanced KL and gradients flow (dyn → prior, rep → post).
    post = {"logits": torch.zeros(1, S, C).requires_grad_(True)}
    peaked = torch.full((1, S, C), -10.0)
    peaked[..., 0] = 10.0
    prior = {"logits": peaked.requires_grad_(True)}
    loss, metrics = m.kl_loss(post, prior, free=1.0)
    kl = categorical_kl(post["logits"], prior["logits"]).item()
    assert kl > 1.0 and loss.item() == pytest.approx(0.6 * kl, rel=1e-5)
    loss.backward()
    assert post["logits"].grad.abs().sum() > 0 and prior["logits"].grad.abs().sum() > 0


def test_world_model_loss_decreases():
    m = make_rssm()
    batch = make_batch()
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    first, _ = m.world_model_loss(batch, generator=g)
    for _ in range(40):
        loss, metrics = m.world_model_loss(batch, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    last, metrics = m.world_model_loss(batch, generator=g)
    assert last.item() < 0.7 * first.item()
    assert {"loss_dec", "loss_rew", "loss_cont", "kl_dyn", "kl_rep", "z_mse"} <= set(metrics)
    loss, _, posts = m.loss_with_posts(batch)
    assert posts["deter"].shape == (B, T, DETER)


def test_world_model_loss_bad_batch():
    m = make_rssm()
    batch = make_batch()
    with pytest.raises(KeyError, match="reward"):
        m.world_model_loss({k: v for k, v in batch.items() if k != "reward"})
    with pytest.raises(ValueError, match="batch.action"):
        m.world_model_loss({**batch, "action": batch["action"].int()})
    with pytest.raises(ValueError, match=r"actions: expected values in \[0, 3\], got 4"):
        m.world_model_loss({**batch, "action": batch["action"].clamp(max=A) + (batch["action"] == A).long()})
    with pytest.raises(ValueError, match="batch.z"):
        m.world_model_loss({**batch, "z": batch["z"][..., :-1]})


def make_wm() -> RSSMWorldModel:
    return RSSMWorldModel(make_rssm(), StandInAE(), context_len=K)


def context(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    ctx_a = torch.randint(0, A, (n, K), generator=g)
    ctx_a[0, 0] = A
    return torch.randn(n, K, D_Z, generator=g), ctx_a


def test_world_model_protocol_and_shapes():
    wm = make_wm()
    assert isinstance(wm, WorldModel)
    assert (wm.num_actions, wm.latent_dim, wm.context_len) == (A, D_Z, K)
    ctx_z, ctx_a = context()
    st = wm.initial_state(ctx_z, ctx_a)
    assert all(v.shape[0] == 4 for v in st.values())
    assert torch.equal(wm.latent_history(st), ctx_z)
    st2, z, r, term = wm.step(st, torch.tensor([0, 1, 2, 0]), torch.Generator().manual_seed(0))
    assert z.shape == (4, D_Z) and z.dtype == torch.float32
    assert r.shape == (4,) and r.dtype == torch.float32 and term.shape == (4,) and term.dtype == torch.bool
    hist = wm.latent_history(st2)
    assert hist.shape == (4, K, D_Z) and torch.equal(hist[:, :-1], ctx_z[:, 1:]) and torch.equal(hist[:, -1], z)
    frames = wm.decode(z)
    assert frames.shape == (4, 3, 64, 64) and frames.dtype == torch.uint8
    assert wm.encode(frames).shape == (4, D_Z)
    # Partial reset as the vector env does it: state[k][mask] = fresh[k][mask].
    mask = torch.tensor([True, False, True, False])
    for k in st2:
        st2[k][mask] = st[k][mask]
    assert torch.equal(wm.latent_history(st2)[0], ctx_z[0])


def test_world_model_step_is_deterministic_for_seeded_generator():
    wm = make_wm()
    ctx_z, ctx_a = context()
    actions = torch.tensor([0, 1, 2, 1])

    def rollout(seed: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        st, out = wm.initial_state(ctx_z, ctx_a), []
        for _ in range(5):
            st, z, r, term = wm.step(st, actions, g)
            out += [z, r, term, st["stoch"]]
        return out

    a, b, c = rollout(0), rollout(0), rollout(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    s1, s2 = wm.initial_state(ctx_z, ctx_a, g1), wm.initial_state(ctx_z, ctx_a, g2)
    assert torch.equal(s1["stoch"], s2["stoch"])


def test_world_model_bad_inputs_name_the_field():
    wm = make_wm()
    ctx_z, ctx_a = context()
    with pytest.raises(ValueError, match="context_z"):
        wm.initial_state(ctx_z[:, 1:], ctx_a)
    with pytest.raises(ValueError, match="context_a"):
        wm.initial_state(ctx_z, ctx_a[:2])
    st = wm.initial_state(ctx_z, ctx_a)
    with pytest.raises(ValueError, match=r"action: expected values in \[0, 2\], got 3"):
        wm.step(st, torch.tensor([0, 1, A, 0]))
    with pytest.raises(ValueError, match="action: expected shape"):
        wm.step(st, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="autoencoder.latent_dim"):
        bad = StandInAE()
        bad.latent_dim = D_Z + 1
        RSSMWorldModel(make_rssm(), bad, K)


def test_stack_latents_pads_with_episode_start():
    z = torch.arange(5.0).view(1, 5, 1)  # latents 0..4
    is_first = torch.tensor([[False, False, True, False, False]])
    out = stack_latents(z, is_first, 3)[0, :, :, 0]
    expected = torch.tensor([[0.0, 0, 0], [0, 0, 1], [2, 2, 2], [2, 2, 3], [2, 3, 4]])
    assert torch.equal(out, expected)


def test_start_states_from_posteriors():
    wm = make_wm()
    batch = make_batch()
    _, _, posts = wm.rssm.loss_with_posts(batch)
    st = wm.start_states(posts, batch["z"], batch["is_first"])
    assert st["deter"].shape == (B * T, DETER) and st["history"].shape == (B * T, K, D_Z)
    assert torch.equal(st["history"][T + 2, -1], batch["z"][1, 2])
    _, z, _, _ = wm.step(st, torch.zeros(B * T, dtype=torch.long), torch.Generator().manual_seed(0))
    assert z.shape == (B * T, D_Z) and math.isfinite(z.sum().item())
