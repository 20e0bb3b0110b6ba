"""DreamerV3 actor-critic: hand-computed λ-returns and percentiles, losses, imagination. Tiny, CPU."""
from __future__ import annotations

import pytest
import torch

from dit_envs.io import atomic_save_tensors, load_tensors
from dit_envs.models.rssm import RSSM
from dit_envs.models.rssm_world_model import RSSMWorldModel
from trainers.agent import (ActorCritic, AgentConfig, ReturnNormalizer, Trajectory, actor_critic_loss,
                            critic_loss, imagine, lambda_returns, trajectory_weights)

D_Z, K, A = 4, 2, 3
OBS = K * D_Z


def col(*xs: float) -> torch.Tensor:
    return torch.tensor(xs).unsqueeze(1)  # (T, 1)


def test_lambda_returns_hand_computed():
    # γ = 0.9, λ = 0.5, r = (1, 2, 3), v = (0.5, 1, 2, 4):
    #   R_3 = v_3 = 4
    #   R_2 = 3 + 0.9·(0.5·4 + 0.5·4)     = 3 + 3.6   = 6.6
    #   R_1 = 2 + 0.9·(0.5·2 + 0.5·6.6)   = 2 + 3.87  = 5.87
    #   R_0 = 1 + 0.9·(0.5·1 + 0.5·5.87)  = 1 + 3.0915 = 4.0915
    r, v = col(1.0, 2.0, 3.0), col(0.5, 1.0, 2.0, 4.0)
    ret = lambda_returns(r, v, col(1.0, 1.0, 1.0), gamma=0.9, lam=0.5)
    assert torch.allclose(ret, col(4.0915, 5.87, 6.6))
    # Continue cut c = (1, 0, 1): s_2 is terminal, so R_1 = r_1 = 2 and R_0 = 1 + 0.9·(0.5·1 + 0.5·2) = 2.35.
    ret = lambda_returns(r, v, col(1.0, 0.0, 1.0), gamma=0.9, lam=0.5)
    assert torch.allclose(ret, col(2.35, 2.0, 6.6))
    # λ = 0 is one-step TD: R_t = r_t + γ v_{t+1} → (1 + 0.9·1, 2 + 0.9·2, 3 + 0.9·4) = (1.9, 3.8, 6.6).
    assert torch.allclose(lambda_returns(r, v, col(1.0, 1.0, 1.0), 0.9, 0.0), col(1.9, 3.8, 6.6))
    # λ = 1 is the discounted sum bootstrapped with v_3: R_2 = 6.6, R_1 = 2 + 0.9·6.6 = 7.94, R_0 = 8.146.
    assert torch.allclose(lambda_returns(r, v, col(1.0, 1.0, 1.0), 0.9, 1.0), col(8.146, 7.94, 6.6))
    # Batched: columns are independent.
    both = lambda_returns(torch.cat([r, r], 1), torch.cat([v, v], 1), torch.cat([col(1, 1, 1), col(1, 0, 1)], 1),
                          0.9, 0.5)
    assert torch.allclose(both, torch.cat([col(4.0915, 5.87, 6.6), col(2.35, 2.0, 6.6)], 1))


def test_lambda_returns_bad_shapes():
    with pytest.raises(ValueError, match="values: expected shape"):
        lambda_returns(torch.zeros(3, 2), torch.zeros(3, 2), torch.ones(3, 2), 0.9, 0.5)
    with pytest.raises(ValueError, match="lam"):
        lambda_returns(torch.zeros(3, 2), torch.zeros(4, 2), torch.ones(3, 2), 0.9, 1.5)


def test_trajectory_weights():
    w = trajectory_weights(col(1.0, 0.0, 1.0), gamma=0.5)
    assert torch.allclose(w, col(1.0, 0.5, 0.0))  # w_0 = 1, w_1 = γ·c_0, w_2 = γ²·c_0·c_1


def test_return_normalizer_hand_computed(tmp_path):
    norm = ReturnNormalizer()
    # 21 returns 0, 100, ..., 2000: linear-interpolation percentiles at positions 0.05·20 = 1 and 0.95·20 = 19.
    norm.update(torch.arange(0.0, 2001.0, 100.0).view(3, 7))
    assert norm.low.item() == pytest.approx(0.01 * 100.0) and norm.high.item() == pytest.approx(0.01 * 1900.0)
    assert norm.scale().item() == pytest.approx(18.0)  # EMA from 0 with decay 0.99: 0.01 · 1800
    # 5 returns 0..40: positions 0.05·4 = 0.2 and 0.95·4 = 3.8 → percentiles 2 and 38. From a fresh normalizer:
    # update 1: low = 0.01·2 = 0.02, high = 0.01·38 = 0.38;
    # update 2: low = 0.99·0.02 + 0.02 = 0.0398, high = 0.99·0.38 + 0.38 = 0.7562.
    small = ReturnNormalizer()
    small.update(torch.tensor([0.0, 10.0, 20.0, 30.0, 40.0]))
    assert small.low.item() == pytest.approx(0.02) and small.high.item() == pytest.approx(0.38)
    small.update(torch.tensor([40.0, 30.0, 20.0, 10.0, 0.0]))
    assert small.low.item() == pytest.approx(0.0398) and small.high.item() == pytest.approx(0.7562)
    assert small.scale().item() == 1.0  # S = 0.7164 < 1 → scale floor 1
    atomic_save_tensors(tmp_path / "norm.safetensors", norm.state_dict())
    fresh = ReturnNormalizer()
    fresh.load_state_dict(load_tensors(tmp_path / "norm.safetensors"))
    assert fresh.scale().item() == pytest.approx(18.0)


def test_actor_and_critic_outputs():
    torch.manual_seed(0)
    ac = ActorCritic(AgentConfig(obs_dim=OBS, num_actions=A, hidden=16, layers=1))
    obs = torch.randn(5, OBS)
    logits = ac.actor(obs)
    assert logits.shape == (5, A) and logits.exp().min() >= 0.01 / A - 1e-7
    assert ac.critic(obs).shape == (5, 255) and ac.critic.value(obs).abs().max() < 1e-5  # zero-init critic
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a1, a2 = ac.act(obs, g1), ac.act(obs, g2)
    assert a1.dtype == torch.int64 and a1.shape == (5,) and torch.equal(a1, a2)
    assert torch.equal(ac.act(obs, greedy=True), logits.argmax(-1))
    with pytest.raises(ValueError, match="obs: expected last dim 8"):
        ac.actor(torch.randn(5, OBS + 1))


def test_critic_loss_shapes():
    torch.manual_seed(0)
    ac = ActorCritic(AgentConfig(obs_dim=OBS, num_actions=A, hidden=16, layers=1))
    logits = ac.critic(torch.randn(4, 3, OBS))  # (T, B, bins)
    loss, metrics = critic_loss(logits, torch.randn(4, 3), torch.zeros(4, 3), torch.ones(4, 3), ac.critic.twohot)
    assert loss.shape == () and {"critic_loss", "value_mean", "return_mean"} <= set(metrics)
    with pytest.raises(ValueError, match="returns: expected shape"):
        critic_loss(logits, torch.randn(3, 3), torch.zeros(4, 3), torch.ones(4, 3), ac.critic.twohot)


def fixed_trajectory(t: int = 6, b: int = 8) -> Trajectory:
    g = torch.Generator().manual_seed(3)
    cont = torch.ones(t, b)
    cont[3, :2] = 0.0
    return Trajectory(obs=torch.randn(t + 1, b, OBS, generator=g), actions=torch.randint(0, A, (t, b), generator=g),
                      rewards=torch.randn(t, b, generator=g), continues=cont)


def test_actor_critic_loss_decreases_on_fixed_batch():
    torch.manual_seed(0)
    ac = ActorCritic(AgentConfig(obs_dim=OBS, num_actions=A, hidden=32, layers=1))
    traj = fixed_trajectory()
    opt = torch.optim.Adam([*ac.actor.parameters(), *ac.critic.parameters()], lr=3e-3)
    first, metrics = actor_critic_loss(ac.actor, ac.critic, ac.slow_critic, traj, ac.normalizer,
                                       update_normalizer=False)
    assert {"actor_loss", "actor_ent", "critic_loss", "return_scale", "adv_mean"} <= set(metrics)
    for _ in range(60):
        loss, _ = ac.loss(traj, update_normalizer=False)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ac.update_slow()
    last, _ = ac.loss(traj, update_normalizer=False)
    assert last.item() < first.item() - 0.5
    assert all(p.grad is None for p in ac.slow_critic.parameters())


def test_update_slow_is_an_ema():
    torch.manual_seed(0)
    ac = ActorCritic(AgentConfig(obs_dim=OBS, num_actions=A, hidden=16, layers=1))
    with torch.no_grad():
        for p in ac.critic.parameters():
            p.add_(1.0)
    before = [p.clone() for p in ac.slow_critic.parameters()]
    ac.update_slow(0.25)
    for old, slow, fast in zip(before, ac.slow_critic.parameters(), ac.critic.parameters()):
        assert torch.allclose(slow, 0.75 * old + 0.25 * fast)


def test_imagine_in_rssm_world_model():
    torch.manual_seed(0)
    wm = RSSMWorldModel(RSSM(D_Z, A, deter=16, stoch=4, classes=4, hidden=12, layers=1), torch.nn.Identity(), K)
    ac = ActorCritic(AgentConfig(obs_dim=OBS, num_actions=A, hidden=16, layers=1, horizon=4))
    start = wm.initial_state(torch.randn(5, K, D_Z), torch.full((5, K), A))
    traj = imagine(wm, ac.actor, start, ac.config.horizon, torch.Generator().manual_seed(0))
    assert traj.obs.shape == (5, 5, OBS) and traj.actions.shape == (4, 5) and traj.actions.dtype == torch.int64
    assert traj.rewards.shape == traj.continues.shape == (4, 5)
    again = imagine(wm, ac.actor, start, 4, torch.Generator().manual_seed(0))
    assert torch.equal(traj.obs, again.obs) and torch.equal(traj.actions, again.actions)
    loss, metrics = ac.loss(traj)
    loss.backward()
    assert ac.normalizer.high.item() >= ac.normalizer.low.item()
