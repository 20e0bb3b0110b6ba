"""`ditwm train-agent --kl-coef`: the actor is held near its initial policy by KL(π_init ‖ π)."""
from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import make_tiny_bundle
from trainers import cli
from trainers.agent_io import load_agent
from trainers.checkpoint import load_checkpoint
from trainers.rollout import reference_kl
from trainers.train_agent import Args, main

TINY = dict(num_envs=4, horizon=3, eval_episodes=1, eval_max_steps=10, episode_steps=20, eval_every=0)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> str:
    return str(make_tiny_bundle(tmp_path_factory.mktemp("kl") / "bundle"))


@pytest.fixture(scope="module")
def start(bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("kl_start") / "p"
    assert main(Args(world_model=bundle, out=str(out), steps=1, init="scratch", **TINY)) == 0
    return out


def test_reference_kl_is_the_categorical_kl_and_trains_the_actor_only():
    torch.manual_seed(0)
    actor, ref = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    obs = torch.randn(7, 2, 5)
    kl = reference_kl(actor, ref, obs)
    p, q = ref(obs).softmax(-1), actor(obs).softmax(-1)
    assert torch.allclose(kl, (p * (p.log() - q.log())).sum(-1).mean(), atol=1e-6)
    kl.backward()
    assert actor.weight.grad is not None and ref.weight.grad is None
    assert reference_kl(ref, ref, obs).abs().item() < 1e-6


def _drift(bundle, start, out, kl_coef, steps=6):
    assert main(Args(world_model=bundle, out=str(out), steps=steps, init=f"policy:{start}", lr=3e-3,
                     kl_coef=kl_coef, **TINY)) == 0
    ac0, ac1 = load_agent(start)[0], load_agent(out)[0]
    obs = torch.randn(256, ac0.config.obs_dim, generator=torch.Generator().manual_seed(1))
    return reference_kl(ac1.actor, ac0.actor, obs).item()


def test_kl_coef_holds_the_policy_near_its_start_and_is_logged(bundle, start, tmp_path):
    free = _drift(bundle, start, tmp_path / "free", 0.0)
    held = _drift(bundle, start, tmp_path / "held", 100.0)
    assert free > 0 and held < 0.5 * free, (free, held)
    recs = [json.loads(line) for line in (tmp_path / "held" / "metrics.jsonl").read_text().splitlines()]
    assert any("kl_init" in r for r in recs)
    assert not any("kl_init" in r for r in map(json.loads, (tmp_path / "free" / "metrics.jsonl").open()))


def test_kl_coef_resumes_bit_exact_and_is_checked_on_resume(bundle, start, tmp_path, capsys):
    args = dict(world_model=bundle, init=f"policy:{start}", kl_coef=1.0, **{**TINY, "eval_every": 2})
    assert main(Args(out=str(tmp_path / "full"), steps=4, **args)) == 0
    assert main(Args(out=str(tmp_path / "split"), steps=2, **args)) == 0
    assert main(Args(out=str(tmp_path / "split"), steps=4, resume=True, **args)) == 0
    a, _ = load_checkpoint(tmp_path / "full")
    b, _ = load_checkpoint(tmp_path / "split")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    argv = ["train-agent", "--world-model", bundle, "--init", f"policy:{start}", "--out", str(tmp_path / "split"),
            "--steps", "6", "--resume", "--kl-coef", "2"]
    assert cli.main(argv) == 2
    assert "--kl-coef" in capsys.readouterr().err


@pytest.mark.parametrize("init, value", [("scratch", "1"), ("policy:START", "-1"), ("policy:START", "nan")])
def test_bad_kl_coef_exits_2_and_writes_nothing(bundle, start, tmp_path, capsys, init, value):
    argv = ["train-agent", "--world-model", bundle, "--init", init.replace("START", str(start)),
            "--out", str(tmp_path / "x"), "--steps", "1", "--kl-coef", value]
    assert cli.main(argv) == 2
    assert "--kl-coef" in capsys.readouterr().err and not (tmp_path / "x").exists()
