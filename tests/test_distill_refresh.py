"""`ditwm distill --imagined-refresh`: the student's own rollouts in the imagined pool (DAgger)."""
import numpy as np
import pytest
import torch

from dit_envs.bundle import load_bundle
from dit_envs.models.dit_world_model import DiTWorldModel
from tests.test_distill_options import _Windows
from trainers.distill_student import make_student
from trainers.distill_pool import OwnRolloutPool, imagined_pool


def _student(wm):
    student = make_student(wm.dit, 4).eval()
    with torch.no_grad():  # a student that differs from the teacher (its fresh step embedding is zero)
        for p in student.step_embed.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    return student


def _endless(teacher_bundle, monkeypatch):
    """The teacher world model with no predicted game over: every rollout keeps all its contexts."""
    wm = load_bundle(teacher_bundle).model
    predict = wm.heads.predict
    monkeypatch.setattr(wm.heads, "predict", lambda *a, **k: (predict(*a, **k)[0], torch.zeros(a[0].shape[0],
                                                                                            dtype=torch.bool)))
    return wm


def _by_hand(wm, student, wins, combos, n):
    """The student's part of a pool rebuilt at step 3 with seed 5, part by part: ``n`` contexts of the student's env
    rollouts (2 steps, sticky 0.5) for each ``(sampling steps, temperature)``."""
    parts = []
    for i, (k, tau) in enumerate(combos):
        swm = DiTWorldModel(wm.autoencoder, student, wm.heads, sampling_steps=k, temperature=tau)
        swm.set_latent_stats(wm.latent_mean, wm.latent_std)
        seed = int(np.random.SeedSequence([5, 3, i]).generate_state(1)[0])
        parts.append(imagined_pool(swm, wins, size=n, steps=2, seed=seed, sticky=0.5))
    return parts


def test_own_rollout_pool_is_the_students_env_rollout_and_rebuilds_from_saved_weights(teacher_bundle, monkeypatch):
    wm = _endless(teacher_bundle, monkeypatch)
    wins, n = _Windows(wm), 6
    teacher_rows = imagined_pool(wm, wins, size=2 * n, steps=2, seed=3, sticky=0.5)
    kw = dict(every=3, levels=[1, 2], size=2 * n, steps=2, sticky=0.5, history=0, seed=5)
    own = OwnRolloutPool(wm, wins, teacher_rows, **kw)
    assert own.rows is teacher_rows and own.state_dict() == {}
    assert [s for s in range(10) if own.due(s)] == [3, 6, 9]
    student = _student(wm)
    assert own.refresh(3, student) == 2 * n and not own.due(3) and own.due(6)
    # the teacher's part, then n contexts of the student's 1-step env rollouts and n of its 2-step ones
    by_hand = _by_hand(wm, student, wins, [(1, wm.temperature), (2, wm.temperature)], n)
    for got, t, one, two in zip(own.rows, teacher_rows, *by_hand):
        assert torch.equal(got, torch.cat([t, one, two]))
    assert not torch.equal(by_hand[0][0], teacher_rows[0][:n])  # the student's futures are not the teacher's
    state = own.state_dict()
    assert int(state["at"]) == 3 and torch.equal(state["source.step_embed.0.weight"],
                                                 student.state_dict()["step_embed.0.weight"])
    # a resumed run at step 4 or 5 rebuilds the same pool from the saved weights, whatever the live student is now
    later = _student(wm)
    with torch.no_grad():
        next(later.parameters()).add_(1.0)
    resumed = OwnRolloutPool(wm, wins, teacher_rows, **kw)
    resumed.load_state_dict(state, later, 5)
    assert resumed.at == 3 and all(torch.equal(a, b) for a, b in zip(resumed.rows, own.rows))
    for step in (2, 6):  # before the first rebuild, or at a rebuild step: the training loop rebuilds, not the load
        fresh = OwnRolloutPool(wm, wins, teacher_rows, **kw)
        fresh.load_state_dict(state if step == 6 else {}, later, step)
        assert fresh.rows is teacher_rows and fresh.due(step) == (step == 6)
    with pytest.raises(ValueError, match="rebuilt at step 3, got none"):
        OwnRolloutPool(wm, wins, teacher_rows, **kw).load_state_dict({}, later, 4)
    with pytest.raises(ValueError, match="rebuilt at step 6, got 3"):
        OwnRolloutPool(wm, wins, teacher_rows, **kw).load_state_dict(state, later, 7)
    with pytest.raises(ValueError, match="every/levels"):
        OwnRolloutPool(wm, wins, teacher_rows, **{**kw, "levels": []})


def test_own_rollout_pool_rolls_the_student_at_each_distillation_temperature(teacher_bundle, monkeypatch):
    wm = _endless(teacher_bundle, monkeypatch)
    wins, n = _Windows(wm), 4
    teacher_rows = imagined_pool(wm, wins, size=n, steps=2, seed=3, sticky=0.5)
    own = OwnRolloutPool(wm, wins, teacher_rows, every=3, levels=[1, 2], size=4 * n, steps=2, sticky=0.5, history=0,
                         seed=5, temperatures=[0.5, 1.0])
    student = _student(wm)
    assert own.refresh(3, student) == 4 * n
    # (level, temperature) in order: (1, 0.5), (1, 1), (2, 0.5), (2, 1)
    by_hand = _by_hand(wm, student, wins, [(1, 0.5), (1, 1.0), (2, 0.5), (2, 1.0)], n)
    for got, t, *parts in zip(own.rows, teacher_rows, *by_hand):
        assert torch.equal(got, torch.cat([t, *parts]))
    assert not torch.equal(by_hand[0][0], by_hand[1][0])  # the temperature changes the student's futures
    default = OwnRolloutPool(wm, wins, teacher_rows, every=3, levels=[1], size=n, steps=2, sticky=0.5, history=0,
                             seed=5)
    assert default.temperatures == [wm.temperature]  # no temperatures: the teacher's, as before
