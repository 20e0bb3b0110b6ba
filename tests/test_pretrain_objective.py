"""The stage-2 objective: what make_inputs draws, the head mask, the multi-step term, overfitting, EMA."""
import torch

from dit_envs.models.dit import DiT, DiTConfig
from dit_envs.models.heads import HeadsConfig, RewardTermHead
from trainers.pretrain_objective import (ObjectiveConfig, PretrainNet, Windows, ema_decay_at, ema_update,
                                         imagine_context, latent_motion_weights, make_inputs, total_loss)

A, K, D_Z = 3, 3, 8


def net(seed=0) -> PretrainNet:
    torch.manual_seed(seed)
    return PretrainNet(DiT(DiTConfig.from_preset("tiny", latent_dim=D_Z, num_actions=A, context_len=K)),
                       RewardTermHead(HeadsConfig(latent_dim=D_Z, num_actions=A, hidden=16, layers=1, num_bins=31,
                                                  low=-5.0, high=5.0)))


def windows(B=6, L=K + 1, seed=0) -> Windows:
    g = torch.Generator().manual_seed(seed)
    z = torch.rand(B, L, D_Z, generator=g) * 2 - 1
    a = torch.randint(0, A, (B, L), generator=g)
    a[:, 0] = A  # every window starts an episode
    reward = torch.zeros(B, L)
    reward[0, 2] = 1.0
    term = torch.zeros(B, L, dtype=torch.bool)
    term[1, -1] = True
    return Windows(x=3 * z, z=z, prev_action=a, reward=reward, terminated=term)


def test_clean_context_noises_only_the_last_token_and_masks_the_rest():
    w = windows()
    inp = make_inputs(w, ObjectiveConfig(seq_len=K + 1, clean_context=1.0, action_dropout=0.0), num_actions=A,
                      generator=torch.Generator().manual_seed(0))
    assert torch.all(inp["t"][:, :-1] == 0) and torch.all(inp["t"][:, -1] > 0)
    assert torch.equal(inp["mask"], torch.tensor([[0.0] * K + [1.0]]).expand(6, -1))
    assert torch.equal(inp["xt"][:, :-1], w.x[:, :K])  # a clean token is the data itself
    assert torch.equal(inp["prev_action"], w.prev_action)


def test_diffusion_forcing_and_action_dropout():
    w = windows(B=64)
    inp = make_inputs(w, ObjectiveConfig(seq_len=K + 1, clean_context=0.0, action_dropout=0.5), num_actions=A,
                      generator=torch.Generator().manual_seed(0))
    assert torch.all(inp["t"] > 0) and torch.all(inp["mask"] == 1)  # every token noisy, every token counts
    assert inp["t"].std(1).min() > 0  # independent levels per token
    dropped = (inp["prev_action"] == A) & (w.prev_action != A)
    assert 0.3 < dropped.float().mean() < 0.6
    assert torch.equal(inp["h_action"], w.prev_action[:, 1:])  # the head sees the real actions
    assert torch.equal(inp["h_mask"], torch.ones(64, K))


def test_same_generator_seed_same_inputs():
    w = windows()
    cfg = ObjectiveConfig(seq_len=K + 1)
    a = make_inputs(w, cfg, num_actions=A, generator=torch.Generator().manual_seed(3))
    b = make_inputs(w, cfg, num_actions=A, generator=torch.Generator().manual_seed(3))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_multistep_term_uses_the_models_own_rollout():
    m, w = net(), windows(L=K + 4)
    ctx, ctx_a = imagine_context(m.dit, w, 1, context_len=K, sampling_steps=2, clamp=lambda x: x,
                                 generator=torch.Generator())
    assert torch.equal(ctx, w.x[:, :K]) and torch.equal(ctx_a, w.prev_action[:, :K])
    ctx, ctx_a = imagine_context(m.dit, w, 3, context_len=K, sampling_steps=2, clamp=lambda x: x,
                                 generator=torch.Generator().manual_seed(0))
    assert torch.equal(ctx[:, 0], w.x[:, 2]) and not torch.equal(ctx[:, 1:], w.x[:, 3:5])
    assert torch.equal(ctx_a, w.prev_action[:, 2:5])
    cfg = ObjectiveConfig(seq_len=K + 1, rollout_steps=4)
    inp = make_inputs(w, cfg, num_actions=A, generator=torch.Generator().manual_seed(0), dit=m.dit, context_len=K,
                      clamp=lambda x: x)
    assert inp["ro_xt"].shape == (6, K + 1, D_Z) and torch.all(inp["ro_t"][:, :K] == 0)
    terms = m(inp)
    assert set(terms) == {"flow", "rollout", "reward", "term"}
    loss = total_loss(terms, cfg)
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())


def test_head_mask_ignores_transitions_without_an_action():
    m, w = net(), windows()
    w.prev_action[2, 2] = A  # not a real transition: must not count (nor crash the one-hot)
    inp = make_inputs(w, ObjectiveConfig(seq_len=K + 1), num_actions=A, generator=torch.Generator())
    assert inp["h_mask"][2, 1] == 0 and inp["h_mask"].sum() == inp["h_mask"].numel() - 1
    out = m(inp)
    assert torch.isfinite(out["reward"]) and torch.isfinite(out["term"])


def test_objective_overfits_a_fixed_batch():
    m, w = net(), windows(B=4)
    cfg = ObjectiveConfig(seq_len=K + 1, clean_context=0.5, action_dropout=0.0)
    inp = make_inputs(w, cfg, num_actions=A, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    first = m(inp)
    for _ in range(300):
        out = m(inp)
        opt.zero_grad()
        total_loss(out, cfg).backward()
        opt.step()
    assert out["flow"].item() < 0.05 * first["flow"].item()
    assert out["reward"].item() < 0.1 * first["reward"].item() and out["term"].item() < 0.1 * first["term"].item()


def test_ema_update_and_decay_warmup():
    a, b = net(0), net(1)
    ema_update(a, b, 0.0)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert ema_decay_at(0, 0.999) == 0.1 and ema_decay_at(10**6, 0.999) == 0.999


def _decoder():
    from dit_envs.models.autoencoder import AutoencoderConfig, FrameAutoencoder
    torch.manual_seed(1)
    return FrameAutoencoder(AutoencoderConfig(base_channels=4, max_channels=8, latent_channels=2, latent_size=2,
                                              res_blocks=0))


def test_pixel_term_is_zero_at_the_target_trains_only_the_dit_and_leaves_the_state_dict_alone():
    n, w = net(), windows()
    keys = set(n.state_dict())
    mean, std = torch.full((D_Z,), 0.1), torch.full((D_Z,), 0.5)
    n.set_decoder(_decoder(), mean, std)
    assert set(n.state_dict()) == keys and all(p is not q for p in n.parameters() for q in n.decoder.parameters())
    z, z_prev, t = w.z[:, -1], w.z[:, -2], torch.zeros(6)
    x_true = (z - mean) / std
    assert n.pixel_loss(x_true, t, z, z_prev).item() < 1e-10
    x = (x_true + 0.5 * torch.randn(6, D_Z)).requires_grad_(True)
    loss = n.pixel_loss(x, t, z, z_prev)
    loss.backward()
    assert loss.item() > 0 and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in n.decoder.parameters())
    assert n.pixel_loss(x, torch.ones(6), z, z_prev).item() == 0.0  # pure noise: weight 1 − t = 0


def test_pixel_term_joins_the_loss_when_configured():
    n, w = net(), windows(L=K + 3)
    n.set_decoder(_decoder(), torch.zeros(D_Z), torch.ones(D_Z))
    cfg = ObjectiveConfig(seq_len=K + 1, rollout_steps=3, pixel_weight=2.0)
    clamp = lambda x: x.clamp(-3, 3)  # noqa: E731
    inp = make_inputs(w, cfg, num_actions=A, generator=torch.Generator().manual_seed(0), dit=n.dit, context_len=K,
                      clamp=clamp)
    terms = n(inp)
    assert {"flow", "rollout", "pixel"} <= set(terms) and terms["pixel"] > 0
    base = total_loss({k: v for k, v in terms.items() if k != "pixel"}, cfg)
    assert torch.allclose(total_loss(terms, cfg), base + 2.0 * terms["pixel"])
    assert "pixel" not in net()(make_inputs(w, ObjectiveConfig(seq_len=K + 1), num_actions=A,
                                            generator=torch.Generator().manual_seed(0)))


def test_latent_motion_weights_the_elements_that_moved_in_the_flow_and_multistep_terms():
    w = windows(L=K + 3)
    w.z[:, 2] = w.z[:, 1]  # row 2 repeats row 1 but for element 4
    w.z[:, 2, 4] += 0.5
    cfg = ObjectiveConfig(seq_len=K + 1, rollout_steps=3, latent_motion_weight=9.0, latent_motion_threshold=0.05)
    gen = torch.Generator().manual_seed(0)
    inp = make_inputs(w, cfg, num_actions=A, generator=gen, dit=net().dit, context_len=K, clamp=lambda x: x)
    lw = inp["lw"]
    assert lw.shape == (6, K + 1, D_Z) and torch.equal(lw[:, 0], torch.ones(6, D_Z))  # no row before the first
    assert torch.equal(lw[:, 2], latent_motion_weights(w.z[:, 2], w.z[:, 1], 9.0, 0.05))
    assert lw[:, 2, 4].eq(10.0).all() and lw[:, 2].sum(-1).eq(D_Z + 9.0).all()
    n = next(j for j in range(2, 4) if torch.equal(inp["ro_x0"], w.x[:, K + j - 1]))  # the drawn horizon
    assert torch.equal(inp["ro_lw"], latent_motion_weights(w.z[:, K + n - 1], w.z[:, K + n - 2], 9.0, 0.05))
    terms = net()(inp)
    plain = net()({k: v for k, v in inp.items() if k not in ("lw", "ro_lw")})
    assert not torch.allclose(terms["flow"], plain["flow"]) and not torch.allclose(terms["rollout"], plain["rollout"])
    off = make_inputs(w, ObjectiveConfig(seq_len=K + 1), num_actions=A, generator=torch.Generator().manual_seed(0))
    assert "lw" not in off and "ro_lw" not in off
