"""`WorldModel.step(..., draws=M)`: M draws per env from one context pass equal stepping the repeated state."""
import pytest
import torch

from dit_envs.bundle import load_bundle
from dit_envs.models.world_model import repeat_draws
from tests.test_models import _context, _gen, _tiny_world_model
from tests.test_rssm import context as rssm_context, make_wm
from tests.test_streaming import streaming_world_model


def _same_as_repeated(model, state, action, draws, exact):
    got = model.step(state, action, _gen(3), draws=draws)
    want = model.step(*repeat_draws(state, action, draws), _gen(3))
    n = len(action) * draws
    assert got[1].shape == (n, model.latent_dim) and got[2].shape == (n,) and got[3].shape == (n,)
    assert got[0].keys() == want[0].keys()
    for x, y in [*zip(got[1:], want[1:]), *((got[0][k], want[0][k]) for k in want[0])]:
        assert x.shape == y.shape and x.dtype == y.dtype
        assert torch.equal(x, y) if exact or not x.is_floating_point() else torch.allclose(x, y, atol=1e-5)
    # the draws of one env differ (fresh noise each), and row i·M + j belongs to env i
    z = got[1].view(len(action), draws, -1)
    assert not torch.equal(z[:, 0], z[:, 1])
    hist = model.latent_history(got[0]).view(len(action), draws, *model.latent_history(state).shape[1:])
    assert torch.equal(hist[:, :, :-1], model.latent_history(state)[:, None, 1:].expand_as(hist[:, :, :-1]))
    return got


def test_dit_draws_share_one_context_pass():
    model = _tiny_world_model(steps=3)
    state = model.initial_state(*_context(model, 5))
    action = torch.tensor([0, 1, 2, 3, 5])
    _same_as_repeated(model, state, action, 3, exact=False)
    one = model.step(state, action, _gen(3), draws=1)
    assert all(torch.equal(x, y) for x, y in zip(one[1:], model.step(state, action, _gen(3))[1:]))
    calls = []
    orig = model.dit.context_cache
    model.dit.context_cache = lambda x, a: (calls.append(len(x)), orig(x, a))[1]
    model.step(state, action, _gen(3), draws=4)
    assert calls == [5]  # one context pass over the 5 envs, not 20
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="draws: expected an integer >= 1"):
            model.step(state, action, _gen(3), draws=bad)


def test_streaming_dit_draws_carry_their_rolling_cache(teacher_bundle):
    wm = streaming_world_model(load_bundle(teacher_bundle).model, sampling_steps=2)
    z = torch.rand(3, wm.context_len, wm.latent_dim, generator=_gen(1)) * 2 - 1
    state = wm.initial_state(z, torch.zeros(3, wm.context_len, dtype=torch.int64))
    got = _same_as_repeated(wm, state, torch.tensor([1, 2, 3]), 2, exact=False)
    assert got[0]["kv"].shape[0] == 6


def test_rssm_draws_are_the_repeated_state():
    wm = make_wm()
    state = wm.initial_state(*rssm_context(4))
    _same_as_repeated(wm, state, torch.tensor([0, 1, 2, 1]), 3, exact=True)
    with pytest.raises(ValueError, match="draws"):
        wm.step(state, torch.tensor([0, 1, 2, 1]), _gen(0), draws=0)


def test_the_uncertainty_penalty_makes_one_model_call_per_step(tiny_bundle):
    import gymnasium as gym
    import numpy as np

    env = gym.make_vec("DiTWM/Pong-v0", num_envs=6, checkpoint=str(tiny_bundle), obs_type="latent",
                       temperature=1.0)
    core = env.unwrapped.core
    core.set_uncertainty_penalty(0.5, 3, threshold=0.0)  # every step with any spread is charged
    calls, spreads = [], []
    step = core.model.step
    core.model.step = lambda *a, **k: (calls.append(k.get("draws", 1)), step(*a, **k))[1]
    apply = core.uncertainty.apply
    core.uncertainty.apply = lambda *a, **k: (spreads.append(k["drawn"].float().var(1).mean(1)), apply(*a, **k))[1]
    env.reset(seed=0)
    obs, reward, *_ = env.step(np.zeros(6, dtype=np.int64))
    assert calls == [3]  # the step and its spread from one call of 3 draws
    assert obs.shape == (6, core.model.context_len, core.model.latent_dim)
    assert np.allclose(reward[spreads[0].numpy() > 0] + 0.5, core.model.heads.predict(
        core.state["z"][:, -2], torch.zeros(6, dtype=torch.int64), core.state["z"][:, -1])[0].numpy()[
        spreads[0].numpy() > 0], atol=1e-5)
    with pytest.raises(ValueError, match="drawn: expected shape"):
        apply(torch.zeros(6), drawn=torch.zeros(6, 2, core.model.latent_dim))
