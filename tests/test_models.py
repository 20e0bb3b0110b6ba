"""Fast CPU tests of the frame autoencoder, rectified flow, causal DiT, heads and the DiT world model."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import random_frames
from dit_envs.models.autoencoder import AUTOENCODER_PRESETS, AutoencoderConfig, FrameAutoencoder, background_mask
from dit_envs.models.dit import DIT_PRESETS, DiT, DiTConfig
from dit_envs.models.dit_world_model import DiTWorldModel
from dit_envs.models.flow import (
    flow_matching_loss,
    interpolate,
    logit_normal_times,
    sample,
    uniform_times,
    velocity_target,
)
from dit_envs.models.heads import HeadsConfig, RewardTermHead
from dit_envs.models.world_model import WorldModel

A, K, D_Z = 6, 4, 32


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _perturbed_dit(seed: int = 0, **kw) -> DiT:
    torch.manual_seed(seed)
    dit = DiT(DiTConfig.from_preset("tiny", latent_dim=D_Z, num_actions=A, context_len=K, **kw))
    g = _gen(seed)
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return dit


def _tiny_world_model(seed: int = 0, steps: int = 2) -> DiTWorldModel:
    torch.manual_seed(seed)
    model = DiTWorldModel(
        FrameAutoencoder(AUTOENCODER_PRESETS["tiny"]),
        _perturbed_dit(seed),
        RewardTermHead(HeadsConfig(latent_dim=D_Z, num_actions=A, hidden=16, layers=1, num_bins=31, low=-5, high=5)),
        sampling_steps=steps,
    )
    return model.eval()


# ----- autoencoder -------------------------------------------------------------------------------------------------
def test_autoencoder_shapes_and_ranges():
    ae = FrameAutoencoder(AUTOENCODER_PRESETS["tiny"])
    frames = random_frames(3, _gen())
    z = ae.encode(frames)
    assert z.shape == (3, D_Z) and z.dtype == torch.float32 and z.abs().max() < 1
    x = ae.decode(z)
    assert x.shape == (3, 3, 64, 64) and 0 <= x.min() and x.max() <= 1
    u8 = ae.decode_uint8(z)
    assert u8.dtype == torch.uint8 and u8.shape == (3, 3, 64, 64)
    assert AUTOENCODER_PRESETS["base"].latent_dim == 256
    with pytest.raises(ValueError, match="frames"):
        ae.encode(frames.float())
    with pytest.raises(ValueError, match="z"):
        ae.decode(torch.zeros(3, D_Z + 1))
    with pytest.raises(ValueError, match="latent_size"):
        AutoencoderConfig(latent_size=12)


def test_background_mask_marks_mode_colour():
    frames = torch.zeros(1, 3, 64, 64, dtype=torch.uint8)
    frames[0, :, 10, 20] = 255  # a one-pixel ball
    mask = background_mask(frames)
    assert mask.shape == (1, 64, 64) and mask.sum() == 64 * 64 - 1 and not mask[0, 10, 20]


def test_autoencoder_training_lowers_loss():
    torch.manual_seed(0)
    ae = FrameAutoencoder(AUTOENCODER_PRESETS["tiny"])
    frames = random_frames(8, _gen())
    opt = torch.optim.Adam(ae.parameters(), lr=3e-3)
    first, metrics = ae.loss(frames)
    for _ in range(40):
        loss, metrics = ae.loss(frames)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert metrics["loss"] < 0.5 * first.item()
    assert set(metrics) >= {"loss", "recon", "mse", "fg_mse", "psnr", "latent_abs"}


# ----- rectified flow ----------------------------------------------------------------------------------------------
def test_uniform_times_and_validation():
    assert uniform_times(4) == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert uniform_times(1) == [1.0, 0.0]
    shifted = uniform_times(4, shift=3.0)
    assert shifted[0] == 1.0 and shifted[-1] == 0.0 and shifted[2] > 0.5
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="steps"):
            uniform_times(bad)
    with pytest.raises(ValueError, match="times"):
        sample(lambda x, t: x, torch.zeros(2, 3), [1.0, 0.5])
    with pytest.raises(ValueError, match="times"):
        sample(lambda x, t: x, torch.zeros(2, 3), [1.0, 0.5, 0.7, 0.0])


def test_sampler_one_step_is_one_euler_step():
    noise = torch.randn(5, 7, generator=_gen())
    w = torch.randn(7, 7, generator=_gen(1))

    def velocity(x, t):
        return torch.tanh(x @ w) * t[:, None]

    expected = noise + (0.0 - 1.0) * velocity(noise, torch.ones(5))
    assert torch.equal(sample(velocity, noise, uniform_times(1)), expected)
    # two steps by hand
    x_half = noise - 0.5 * velocity(noise, torch.ones(5))
    expected2 = x_half - 0.5 * velocity(x_half, torch.full((5,), 0.5))
    assert torch.allclose(sample(velocity, noise, uniform_times(2)), expected2)


def test_sampler_recovers_data_with_exact_velocity():
    x0, noise = torch.randn(4, 3, generator=_gen()), torch.randn(4, 3, generator=_gen(1))
    out = sample(lambda x, t: velocity_target(x0, noise), noise, uniform_times(3))  # straight path
    assert torch.allclose(out, x0, atol=1e-6)


def test_interpolation_loss_and_times():
    x0, noise = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    t = torch.tensor([[0.0, 0.5, 1.0], [1.0, 0.0, 0.25]])
    xt = interpolate(x0, noise, t)
    assert torch.allclose(xt[0, 0], x0[0, 0]) and torch.allclose(xt[0, 2], noise[0, 2])
    assert torch.allclose(xt[1, 2], 0.75 * x0[1, 2] + 0.25 * noise[1, 2])
    assert flow_matching_loss(noise - x0, x0, noise) == 0
    mask = torch.tensor([[True, False, False], [False, False, False]])
    v = noise - x0
    v[0, 1:] += 5.0  # errors outside the mask do not count
    assert flow_matching_loss(v, x0, noise, mask) == 0
    # Element weights: all ones is the plain mean; a weight on one element alone gives that element's error.
    v = noise - x0 + torch.arange(8.0)
    ones = torch.ones(2, 3, 8)
    assert torch.allclose(flow_matching_loss(v, x0, noise, weight=ones), flow_matching_loss(v, x0, noise))
    one = torch.zeros(2, 3, 8)
    one[..., 5] = 3.0
    assert torch.allclose(flow_matching_loss(v, x0, noise, weight=one), torch.tensor(25.0))
    one[0, 0, 5], one[0, 0, 6] = 0.0, 1.0  # and with a mask: only the masked-in position counts
    assert torch.allclose(flow_matching_loss(v, x0, noise, mask, weight=one), torch.tensor(36.0))
    ts = logit_normal_times((1000,), generator=_gen())
    assert ts.shape == (1000,) and 0 < ts.min() and ts.max() < 1 and abs(ts.median() - 0.5) < 0.05
    assert torch.equal(ts, logit_normal_times((1000,), generator=_gen()))


# ----- DiT ---------------------------------------------------------------------------------------------------------
def test_fresh_dit_outputs_exactly_zero():
    dit = DiT(DiTConfig.from_preset("tiny", latent_dim=D_Z, num_actions=A, context_len=K))
    v = dit(torch.randn(2, K + 1, D_Z), torch.rand(2, K + 1), torch.randint(0, A + 1, (2, K + 1)))
    assert v.shape == (2, K + 1, D_Z) and torch.count_nonzero(v) == 0


def test_dit_shapes_presets_and_validation():
    dit = _perturbed_dit()
    v = dit(torch.randn(3, 2, D_Z), torch.rand(3, 2), torch.randint(0, A + 1, (3, 2)))
    assert v.shape == (3, 2, D_Z) and v.abs().sum() > 0
    with pytest.raises(ValueError, match="x"):
        dit(torch.randn(1, K + 2, D_Z), torch.rand(1, K + 2), torch.zeros(1, K + 2, dtype=torch.long))
    with pytest.raises(ValueError, match="noise_level"):
        dit(torch.randn(1, 2, D_Z), torch.rand(1, 3), torch.zeros(1, 2, dtype=torch.long))
    assert {"tiny", "S", "B", "L"} <= set(DIT_PRESETS)
    with pytest.raises(KeyError, match="preset"):
        DiTConfig.from_preset("XXL", latent_dim=8, num_actions=2)
    with pytest.raises(ValueError, match="heads"):
        DiTConfig(latent_dim=8, num_actions=2, width=30, heads=4)


def test_dit_is_causal():
    dit = _perturbed_dit()
    x, t, a = torch.randn(2, K + 1, D_Z), torch.rand(2, K + 1), torch.randint(0, A + 1, (2, K + 1))
    v1 = dit(x, t, a)
    x2, a2 = x.clone(), a.clone()
    x2[:, -1] += 1.0
    a2[:, -1] = (a2[:, -1] + 1) % A
    v2 = dit(x2, t, a2)
    assert torch.allclose(v1[:, :-1], v2[:, :-1], atol=1e-6)
    assert not torch.allclose(v1[:, -1], v2[:, -1])


@pytest.mark.parametrize("action_cond", [True, False])
def test_cached_inference_equals_full_forward(action_cond):
    dit = _perturbed_dit(action_cond=action_cond)
    N = 5
    ctx, ctx_a = torch.randn(N, K, D_Z), torch.randint(0, A + 1, (N, K))
    x, t, a = torch.randn(N, D_Z), torch.rand(N), torch.randint(0, A, (N,))
    full = dit(
        torch.cat([ctx, x[:, None]], 1),
        torch.cat([torch.zeros(N, K), t[:, None]], 1),
        torch.cat([ctx_a, a[:, None]], 1),
    )[:, -1]
    cache = dit.context_cache(ctx, ctx_a)
    assert len(cache) == dit.config.depth and cache[0][0].shape == (N, dit.config.heads, K, 16)
    assert torch.allclose(dit.predict_next(x, t, a, cache), full, atol=1e-5)
    # a shorter context sits at the same positions as in the full forward
    short = dit(ctx[:, :2], torch.zeros(N, 2), ctx_a[:, :2])
    full3 = dit(torch.cat([ctx[:, :2], x[:, None]], 1), torch.cat([torch.zeros(N, 2), t[:, None]], 1),
                torch.cat([ctx_a[:, :2], a[:, None]], 1))
    assert short.shape == (N, 2, D_Z)
    cache2 = dit.context_cache(ctx[:, :2], ctx_a[:, :2])
    assert torch.allclose(dit.predict_next(x, t, a, cache2), full3[:, -1], atol=1e-5)


def test_flow_loss_overfits_tiny_fixed_batch():
    torch.manual_seed(0)
    dit = DiT(DiTConfig.from_preset("tiny", latent_dim=8, num_actions=3, context_len=3))
    g = _gen()
    x0, noise = torch.randn(4, 4, 8, generator=g), torch.randn(4, 4, 8, generator=g)
    t = logit_normal_times((4, 4), generator=g)
    a = torch.randint(0, 4, (4, 4), generator=g)
    xt = interpolate(x0, noise, t)
    opt = torch.optim.Adam(dit.parameters(), lr=3e-3)
    first = flow_matching_loss(dit(xt, t, a), x0, noise).item()
    for _ in range(300):
        loss = flow_matching_loss(dit(xt, t, a), x0, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.02 * first


# ----- heads -------------------------------------------------------------------------------------------------------
def test_heads_shapes_loss_and_predict():
    torch.manual_seed(0)
    head = RewardTermHead(HeadsConfig(latent_dim=D_Z, num_actions=A, hidden=32, layers=1, num_bins=31, low=-5, high=5))
    z, zn, a = torch.randn(2, 3, D_Z), torch.randn(2, 3, D_Z), torch.randint(0, A, (2, 3))
    logits, term = head(z, a, zn)
    assert logits.shape == (2, 3, 31) and term.shape == (2, 3)
    r, t = head.predict(z[0], a[0], zn[0])
    assert r.dtype == torch.float32 and t.dtype == torch.bool and torch.all(r == 0) and not t.any()  # zero init
    reward = torch.tensor([[0.0, 1.0, -1.0], [0.0, 0.0, 1.0]])
    term_t = torch.tensor([[False, False, True], [False, True, False]])
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(100):
        loss, metrics = head.loss(z, a, zn, reward, term_t)
        opt.zero_grad()
        loss.backward()
        opt.step()
    r, t = head.predict(z.flatten(0, 1), a.flatten(), zn.flatten(0, 1))
    assert torch.equal(r == 0, reward.flatten() == 0)
    assert torch.allclose(r, reward.flatten(), atol=0.05) and torch.equal(t, term_t.flatten())
    assert metrics["term_acc"] == 1.0
    r_mean, _ = head.predict(z[0], a[0], zn[0], reward_decode="mean")
    assert torch.allclose(r_mean, reward[0], atol=0.1)
    with pytest.raises(ValueError, match="reward_decode"):
        head.predict(z[0], a[0], zn[0], reward_decode="mode")
    with pytest.raises(ValueError, match="num_bins"):
        HeadsConfig(latent_dim=4, num_actions=2, num_bins=32)


# ----- world model -------------------------------------------------------------------------------------------------
def _context(model: DiTWorldModel, n: int, seed: int = 0):
    g = _gen(seed)
    z = model.encode(random_frames(n * K, g)).reshape(n, K, D_Z)
    a = torch.randint(0, A + 1, (n, K), generator=g)
    return z, a


def test_world_model_protocol_and_step_shapes():
    model = _tiny_world_model()
    assert isinstance(model, WorldModel)
    assert (model.num_actions, model.latent_dim, model.context_len) == (A, D_Z, K)
    z, a = _context(model, 3)
    state = model.initial_state(z, a)
    action = torch.tensor([0, 3, 5])
    nxt, z_next, reward, term = model.step(state, action, _gen())
    assert z_next.shape == (3, D_Z) and z_next.dtype == torch.float32 and z_next.abs().max() <= 1
    assert reward.shape == (3,) and reward.dtype == torch.float32
    assert term.shape == (3,) and term.dtype == torch.bool
    hist = model.latent_history(nxt)
    assert hist.shape == (3, K, D_Z) and torch.equal(hist[:, -1], z_next) and torch.equal(hist[:, :-1], z[:, 1:])
    assert torch.equal(nxt["a"][:, -1], action) and torch.equal(state["z"], z)  # input state untouched
    frames = model.decode(z_next)
    assert frames.shape == (3, 3, 64, 64) and frames.dtype == torch.uint8
    # masked reset keeps the state valid
    fresh = model.initial_state(*_context(model, 3, seed=1))
    mask = torch.tensor([True, False, True])
    for k in nxt:
        nxt[k][mask] = fresh[k][mask]
    model.step(nxt, action, _gen())


def test_world_model_step_determinism():
    model = _tiny_world_model(steps=3)
    state = model.initial_state(*_context(model, 4))
    action = torch.tensor([1, 2, 3, 4])
    out1 = model.step(state, action, _gen(7))
    out2 = model.step(state, action, _gen(7))
    out3 = model.step(state, action, _gen(8))
    for x, y in zip(out1[1:], out2[1:]):
        assert torch.equal(x, y)
    assert torch.equal(out1[0]["z"], out2[0]["z"])
    assert not torch.equal(out1[1], out3[1])


def test_world_model_validation():
    model = _tiny_world_model()
    z, a = _context(model, 2)
    state = model.initial_state(z, a)
    for bad in (torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0]), torch.tensor([0, A]),
                torch.tensor([-1, 0]), [0, 1]):
        with pytest.raises(ValueError, match="action"):
            model.step(state, bad, _gen())
    with pytest.raises(ValueError, match="context_z"):
        model.initial_state(z[:, :-1], a)
    with pytest.raises(ValueError, match="context_a"):
        model.initial_state(z, a.int())
    with pytest.raises(ValueError, match="context_a"):
        model.initial_state(z, a + A + 1)
    for bad in (0, -2, 1.5, "4", True):
        with pytest.raises(ValueError, match="sampling_steps.*expected.*got"):
            model.sampling_steps = bad
    model.sampling_steps = 1
    assert model.sampling_steps == 1
    model.step(state, torch.tensor([0, 1]), _gen())
    for bad in (-0.1, float("nan"), float("inf"), "0.5", True, None):
        with pytest.raises(ValueError, match="temperature: expected a finite real number >= 0, got"):
            model.temperature = bad
    assert model.temperature == 1.0


def test_temperature_scales_the_initial_noise():
    """``τ`` multiplies the sampler's initial noise (checked against the sampler called by hand); τ = 0 gives the
    same future for every seed, τ > 0 different ones."""
    model = _tiny_world_model(steps=2)
    z, a = _context(model, 3)
    state, action = model.initial_state(z, a), torch.tensor([0, 1, 2])
    model.temperature = 0.5
    _, got, _, _ = model.step(state, action, _gen(7))
    noise = torch.randn(3, D_Z, generator=_gen(7))
    with torch.no_grad():
        x0 = model.dit.sample_next(0.5 * noise, action, model.dit.context_cache(model.normalize(z), a), 2)
    assert torch.equal(got, model.denormalize(x0).clamp(-1, 1))
    model.temperature = 0
    assert torch.equal(model.step(state, action, _gen(1))[1], model.step(state, action, _gen(2))[1])
    model.temperature = 1
    assert not torch.equal(model.step(state, action, _gen(1))[1], model.step(state, action, _gen(2))[1])


def test_sampling_shift_moves_the_euler_times():
    """``sampling_shift`` samples on :func:`uniform_times` shifted by it (checked against the sampler called by hand
    with those times); 1 is the uniform sampler; a step-conditioned student refuses any other value."""
    model = _tiny_world_model(steps=4)
    z, a = _context(model, 3)
    state, action = model.initial_state(z, a), torch.tensor([0, 1, 2])
    uniform = model.step(state, action, _gen(7))[1]
    model.sampling_shift = 3.0
    got = model.step(state, action, _gen(7))[1]
    noise = torch.randn(3, D_Z, generator=_gen(7))
    cache = model.dit.context_cache(model.normalize(z), a)
    d = torch.full((3,), 0.25)
    with torch.no_grad():
        x0 = sample(lambda x, t: model.dit.predict_next(x, t, action, cache, step_size=d, shared_level=True), noise,
                    uniform_times(4, 3.0))
    assert torch.equal(got, model.denormalize(x0).clamp(-1, 1)) and not torch.equal(got, uniform)
    model.sampling_shift = 1
    assert torch.equal(model.step(state, action, _gen(7))[1], uniform)
    for bad in (0, -1.0, float("nan"), float("inf"), 1e17, "3", True, None):
        with pytest.raises(ValueError, match=r"sampling_shift: expected a real number in \(0, 100\], got"):
            model.sampling_shift = bad
    assert model.sampling_shift == 1.0
    student = _perturbed_dit(shortcut_steps=4)
    with pytest.raises(ValueError, match="sampling_shift: expected 1 for a distilled"):
        DiTWorldModel(model.autoencoder, student, model.heads, sampling_shift=2.0)
    with pytest.raises(ValueError, match="sampling_shift: expected 1 for a distilled"):
        student.sample_next(noise, action, student.context_cache(model.normalize(z), a), 2, shift=2.0)
    # a shift that rounds the first time below 1 (s·1 / (1 + (s − 1)·1) in floats) still starts at exactly 1
    assert uniform_times(4, 0.33)[0] == 1.0 and uniform_times(4, 0.33)[-1] == 0.0
    sample(lambda x, t: x, torch.zeros(2, 3), uniform_times(4, 0.33))
    for bad in (float("nan"), float("inf"), 0.0):
        with pytest.raises(ValueError, match="shift"):
            uniform_times(4, bad)
    with pytest.raises(ValueError, match="times"):
        sample(lambda x, t: x, torch.zeros(2, 3), [1.0, float("nan"), 0.0])
