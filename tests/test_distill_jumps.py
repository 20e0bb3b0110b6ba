"""`ditwm distill --jumps all`: every jump of a teacher trajectory supervises the student, the context encoded once."""
import json

import pytest
import torch

from dit_envs.bundle import load_bundle
from dit_envs.models.dit import DiT, DiTConfig
from tests.test_distill import D_Z, K, TINY, batch, teacher
from tests.test_distill_options import perturb
from trainers.checkpoint import load_checkpoint
from trainers.common import ArgError
from trainers.distill import Args, main
from trainers.distill_student import make_student
from trainers.distill_objective import (DistillNet, all_jumps, distill_loss, make_distill_inputs, student_velocities,
                                        student_velocity, teacher_trajectory)
from trainers.pretrain_objective import motion_weighted_mse


def test_all_jumps_by_hand():
    traj = torch.randn(5, 3, D_Z)  # N = 4
    out = all_jumps(traj)
    starts = [(0, 1), (1, 1), (2, 1), (3, 1), (0, 2), (2, 2), (0, 4)]  # (j, m): 4 + 2 + 1 jumps
    assert out["x"].shape == (7, 3, D_Z) and out["v"].shape == (7, 3, D_Z)
    for i, (j, m) in enumerate(starts):
        assert torch.equal(out["x"][i], traj[j])
        assert out["t"][i].item() == 1.0 - j / 4 and out["step_size"][i].item() == m / 4
        assert torch.allclose(out["v"][i], (traj[j] - traj[j + m]) / (m / 4))
    # each level shares a third of the weight equally: the expectation of shortcut_targets' one drawn jump
    assert torch.allclose(out["weight"], torch.tensor([1 / 12] * 4 + [1 / 6] * 2 + [1 / 3]))
    assert out["final"].tolist() == [3, 5, 6]  # the jumps ending at the sample


def student(streaming: bool) -> DiT:
    torch.manual_seed(1)
    s = DiT(DiTConfig.from_preset("tiny", latent_dim=D_Z, num_actions=4, context_len=K, depth=3, shortcut_steps=4,
                                  streaming=streaming))
    with torch.no_grad():
        for p in s.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return s


@pytest.mark.parametrize("streaming", [False, True])
def test_every_jump_at_once_equals_one_jump_at_a_time(streaming):
    """The cached context plus one query per jump is the whole-sequence forward of each jump, history and padding
    rows included; the weighted loss is the weighted sum of the one-jump losses."""
    s, B = student(streaming), 6
    ctx, ctx_a, a = batch(B=B)
    inputs = make_distill_inputs(teacher(), ctx, ctx_a, a, teacher_steps=4, generator=torch.Generator(), jumps="all")
    if streaming:
        g = torch.Generator().manual_seed(2)
        H = 3 * K  # H + K rows: more than the depth·K the last rows depend on, so the first block is trimmed too
        valid = torch.ones(B, H, dtype=torch.bool)
        valid[0, :4], valid[3], valid[4, :-1] = False, False, False  # history rows before an episode start
        inputs.update(history=torch.randn(B, H, D_Z, generator=g),
                      history_action=torch.randint(0, 5, (B, H), generator=g), history_valid=valid)
    v = student_velocities(s, inputs)
    assert v.shape == (7, B, D_Z)
    ref_loss = 0.0
    for i in range(7):
        one = {**inputs, "x": inputs["x"][i], "v": inputs["v"][i], "t": inputs["t"][i].expand(B),
               "step_size": inputs["step_size"][i].expand(B)}
        ref_loss += inputs["weight"][i] * distill_loss(s, one)
        assert torch.allclose(v[i], student_velocity(s, one), atol=1e-4), i
    assert DistillNet(s)(inputs).item() == pytest.approx(ref_loss.item(), rel=1e-4)


def test_streaming_context_cache_of_a_long_sequence_is_the_rolling_cache():
    """A history longer than the window: the pyramid pass (each block only the rows the last K depend on) gives
    the cache that rolling the same rows in one at a time gives."""
    s, B, L = student(True), 4, 3 * K + 2
    g = torch.Generator().manual_seed(3)
    z, za = torch.randn(B, L, D_Z, generator=g), torch.randint(0, 5, (B, L), generator=g)
    cache = s.context_cache(z[:, :1], za[:, :1])
    for i in range(1, L):
        cache = s.extend_cache(cache, z[:, i], za[:, i])
    for (k, v), (k2, v2) in zip(cache, s.context_cache(z, za)):
        assert k2.shape == (B, s.config.heads, K, s.config.width // s.config.heads)
        assert torch.allclose(k, k2, rtol=1e-4, atol=1e-4) and torch.allclose(v, v2, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="key_valid"):
        s.context_cache(z, za, key_valid=torch.ones(B, L - 1, dtype=torch.bool))
    plain = make_student(teacher(), 4)
    with pytest.raises(ValueError, match="context steps"):
        plain.context_cache(torch.randn(B, K + 1, D_Z), torch.zeros(B, K + 1, dtype=torch.int64))
    with pytest.raises(ValueError, match="key_valid"):
        plain.context_cache(torch.randn(B, K, D_Z), torch.zeros(B, K, dtype=torch.int64),
                            key_valid=torch.ones(B, K, dtype=torch.bool))


def test_pixel_term_of_every_jump_by_hand(teacher_bundle):
    wm = perturb(load_bundle(teacher_bundle).model)
    d_z = wm.latent_dim
    g = torch.Generator().manual_seed(0)
    B = 5
    traj = torch.randn(5, B, d_z, generator=g)
    inputs = {"context": torch.randn(B, 2, d_z, generator=g), **all_jumps(traj)}
    net = DistillNet(make_student(teacher(), 4))
    mean, std = torch.randn(d_z, generator=g) * 0.1, torch.rand(d_z, generator=g) + 0.5
    net.set_decoder(wm.autoencoder, mean, std, pixel_weight=2.0, motion_boost=50.0)
    assert net.pixel_loss_all(inputs, inputs["v"]).item() == pytest.approx(0.0, abs=1e-9)  # the teacher's own jumps
    v = inputs["v"] + 0.3 * torch.randn(7, B, d_z, generator=g)
    raw = lambda x: (x * std + mean).clamp(-1.0, 1.0)  # noqa: E731
    with torch.no_grad():
        target = wm.autoencoder.decode(raw(traj[4]))
        prev = wm.autoencoder.decode(raw(inputs["context"][:, -1]))
        ref = 0.0
        for i, w in ((3, 1 / 7), (5, 2 / 7), (6, 4 / 7)):  # the jumps ending at t = 0, weighted m / N (normalised)
            d = inputs["step_size"][i]
            img = wm.autoencoder.decode(raw(inputs["x"][i] - d * v[i]))
            ref += w * motion_weighted_mse(img, target, prev, motion_boost=50.0, threshold=0.1, foreground=True).mean()
        assert ref.item() > 1e-4 and net.pixel_loss_all(inputs, v).item() == pytest.approx(ref.item(), rel=1e-4)


def test_bad_jumps_value_is_refused():
    t = teacher()
    ctx, ctx_a, a = batch(B=2)
    with pytest.raises(ValueError, match="jumps: expected one of"):
        make_distill_inputs(t, ctx, ctx_a, a, teacher_steps=4, generator=torch.Generator(), jumps="two")
    traj = teacher_trajectory(t, ctx, ctx_a, a, torch.randn(2, D_Z), 4)
    assert all_jumps(traj)["x"].shape == (7, 2, D_Z)


def test_resume_must_repeat_jumps_and_old_checkpoints_ran_one(tiny_stage1_store, teacher_bundle, tmp_path):
    common = dict(teacher=str(teacher_bundle), data=str(tiny_stage1_store), out=str(tmp_path / "d"), **TINY)
    assert main(Args(**common, steps=4, jumps="one")) == 0
    with pytest.raises(ArgError, match=r"--jumps: expected one \(the checkpoint's\), got all"):
        main(Args(**common, steps=8, resume=True))
    # a checkpoint written before --jumps existed ran one jump per context
    meta_path = next(p for p in (tmp_path / "d" / "ckpt").iterdir() if p.suffix == ".json")
    meta = json.loads(meta_path.read_text())
    del meta["args"]["jumps"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ArgError, match="--jumps"):
        main(Args(**common, steps=8, resume=True))
    assert main(Args(**common, steps=8, resume=True, jumps="one")) == 0
    assert load_checkpoint(tmp_path / "d")[1]["step"] == 8
