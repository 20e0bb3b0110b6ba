"""Stage 3 (`ditwm train-agent`, `ditwm evaluate agent`, the SB3 example): tiny CPU runs in seconds."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode

from tests.conftest import make_tiny_bundle
from trainers import cli
from trainers.agent import ActorCritic, AgentConfig
from trainers.agent_io import load_agent
from trainers.checkpoint import load_checkpoint
from trainers.rollout import collect_rollout, rollout_loss, rollout_returns
from trainers.train_agent import Args, main

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(num_envs=4, horizon=3, eval_episodes=2, eval_max_steps=10, episode_steps=20)
TINY_ARGV = [s for k, v in TINY.items() for s in (f"--{k.replace('_', '-')}", str(v))]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> str:
    return str(make_tiny_bundle(tmp_path_factory.mktemp("ta") / "bundle"))


@pytest.fixture(scope="module")
def stage1_out(tiny_stage1_store) -> Path:
    """A tiny stage-1 run on real Pong (tiny autoencoder: d_z = 32, K = 4, like the tiny DiT bundle)."""
    return tiny_stage1_store


# ---- autoreset handling on a hand-made env ------------------------------------------------------------------
class EpisodeEnv(gym.vector.VectorEnv):
    """Env ``i`` ends every ``lengths[i]`` steps (``kinds[i]``: "term" or "trunc"); SAME_STEP autoreset.

    Observation ``(1, 2)`` = ``[episode index, step in episode]``; reward ``10 ** episode index``.
    """

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP}

    def __init__(self, lengths: list[int], kinds: list[str]) -> None:
        self.num_envs, self.lengths, self.kinds = len(lengths), np.array(lengths), kinds
        self.single_observation_space = gym.spaces.Box(-np.inf, np.inf, (1, 2), np.float32)
        self.single_action_space = gym.spaces.Discrete(3)
        self.steps_called = 0

    def _obs(self, mask=slice(None)) -> np.ndarray:
        return np.stack([self.ep, self.t], -1)[mask, None, :].astype(np.float32)

    def reset(self, *, seed=None, options=None):
        self.ep, self.t = np.zeros(self.num_envs, np.int64), np.zeros(self.num_envs, np.int64)
        return self._obs(), {}

    def step(self, actions):
        self.steps_called += 1
        reward = (10.0 ** self.ep).astype(np.float32)
        self.t += 1
        end = self.t >= self.lengths
        term = end & np.array([k == "term" for k in self.kinds])
        trunc = end & ~term
        info = {}
        if end.any():
            final = np.full(self.num_envs, None, dtype=object)
            final[np.flatnonzero(end)] = list(self._obs(end))
            info = {"final_obs": final, "_final_obs": end.copy()}
            self.ep[end] += 1
            self.t[end] = 0
        return self._obs(), reward, term, trunc, info


def test_rollout_cuts_returns_at_episode_ends():
    env = EpisodeEnv([2, 3], ["term", "trunc"])
    obs, _ = env.reset()
    running = np.zeros(2)
    ro, obs = collect_rollout(env, lambda x: torch.zeros(x.shape[0], dtype=torch.int64), obs, 5, 1, running)
    assert env.steps_called == 5  # one batched call per step
    tr = ro.traj
    assert tr.obs.shape == (6, 2, 2) and tr.actions.shape == (5, 2)
    assert tr.rewards[:, 0].tolist() == [1, 1, 10, 10, 100] and tr.rewards[:, 1].tolist() == [1, 1, 1, 10, 10]
    assert tr.continues[:, 0].tolist() == [1, 0, 1, 0, 1] and tr.continues[:, 1].tolist() == [1] * 5
    assert ro.truncated[:, 0].tolist() == [0] * 5 and ro.truncated[:, 1].tolist() == [0, 0, 1, 0, 0]
    # The acted-on obs after an end is the next episode's first; final_obs holds the ended episode's last.
    assert tr.obs[2, 0].tolist() == [1, 0] and ro.final_obs[1, 0].tolist() == [0, 2]
    assert tr.obs[3, 1].tolist() == [1, 0] and ro.final_obs[2, 1].tolist() == [0, 3]
    assert torch.equal(ro.final_obs[0], tr.obs[1])  # no end at t = 0: the successor is the next obs
    assert sorted(ro.episode_returns) == [2.0, 3.0, 20.0] and running.tolist() == [100.0, 20.0]
    # γ = λ = 1, all values 0 except V(final_obs of the truncation) = 5:
    values, final_values = torch.zeros(6, 2), torch.zeros(5, 2)
    final_values[2, 1] = 5.0
    ret = rollout_returns(tr.rewards, values, tr.continues, ro.truncated, final_values, 1.0, 1.0)
    assert ret[:, 0].tolist() == [2, 1, 20, 10, 100]  # termination: nothing of the next episode leaks back
    assert ret[:, 1].tolist() == [8, 7, 6, 20, 10]  # truncation: r + γ·V(final_obs), not the next episode
    # λ < 1 mixes in values of the same episode only: R_1 of env 0 is r_1 whatever v_2 (the reset obs) is.
    values[2, 0] = 1e6
    ret = rollout_returns(tr.rewards, values, tr.continues, ro.truncated, final_values, 0.9, 0.5)
    assert ret[1, 0].item() == 1.0 and ret[0, 0].item() == pytest.approx(1 + 0.9 * (0.5 * 0 + 0.5 * 1))


def test_rollout_loss_runs_and_trains_both_networks():
    env = EpisodeEnv([2, 3], ["term", "trunc"])
    obs, _ = env.reset()
    ac = ActorCritic(AgentConfig(obs_dim=2, num_actions=3, hidden=8, num_bins=15))
    gen = torch.Generator().manual_seed(0)
    ro, _ = collect_rollout(env, lambda x: ac.act(x, gen), obs, 5, 1, np.zeros(2))
    loss, m = rollout_loss(ac, ro)
    loss.backward()
    assert torch.isfinite(loss) and m["return_scale"] >= 1.0
    assert all(p.grad is not None for p in [*ac.actor.parameters(), *ac.critic.parameters()])
    assert all(p.grad is None for p in ac.slow_critic.parameters())


def test_collect_rollout_rejects_next_step_env():
    env = EpisodeEnv([2], ["term"])
    env.metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP}
    with pytest.raises(ValueError, match="autoreset_mode"):
        collect_rollout(env, lambda x: torch.zeros(1, dtype=torch.int64), env.reset()[0], 2, 1, np.zeros(1))


# ---- the trainer --------------------------------------------------------------------------------------------
def run(bundle, out, steps, resume=False, **kw):
    return main(Args(world_model=str(bundle), out=str(out), steps=steps, resume=resume,
                     **{"init": "scratch", "eval_every": 2, **TINY, **kw}))


def test_scratch_run_outputs_and_bit_exact_resume(bundle, tmp_path, capsys):
    assert run(bundle, tmp_path / "full", 4) == 0
    out = tmp_path / "full"
    for f in ("agent.safetensors", "agent.json", "curves.png", "metrics.jsonl", "ckpt/state.json"):
        assert (out / f).is_file(), f
    assert "updates/s" in capsys.readouterr().out
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval_return_mean" in r]
    assert [r["updates"] for r in evals] == [0, 2, 4]
    best = max(evals, key=lambda r: r["eval_return_mean"])
    chosen = json.loads((out / "best" / "agent.json").read_text())["selected_by"]
    assert chosen["updates"] == best["updates"] and chosen["eval_return_mean"] == best["eval_return_mean"]
    assert load_agent(out / "best")[1]["updates"] == best["updates"]
    ac, meta = load_agent(out)
    assert meta["init"] == "scratch" and meta["updates"] == 4 and meta["context_len"] == 4
    assert ac.config.obs_dim == 4 * 32 and ac.config.horizon == 3
    # Stop after 2 updates, resume in a fresh call: identical training state.
    assert run(bundle, tmp_path / "split", 2) == 0
    assert run(bundle, tmp_path / "split", 4, resume=True) == 0
    a, ma = load_checkpoint(out)
    b, mb = load_checkpoint(tmp_path / "split")
    assert ma["updates"] == mb["updates"] == 4 and ma["env_steps"] == mb["env_steps"] == 4 * 3 * 4
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_world_model_dtype_bfloat16_trains_a_float32_agent(bundle, tmp_path, monkeypatch):
    import trainers.agent_envs as ta

    made = {}
    real_make = ta.make_imagination_env

    def spy(*a, **kw):
        made["envs"] = real_make(*a, **kw)
        return made["envs"]

    import trainers.train_agent as tt

    seen = []
    real_eval = tt.evaluate_policy

    def eval_spy(encoder, *a, **kw):  # the real game is read through a float32 encoder
        seen.append({p.dtype for p in encoder.parameters()})
        return real_eval(encoder, *a, **kw)

    monkeypatch.setattr(ta, "make_imagination_env", spy)
    monkeypatch.setattr(tt, "evaluate_policy", eval_spy)
    assert run(bundle, tmp_path / "bf16", 2, dtype="bfloat16") == 0
    assert next(made["envs"].unwrapped.bundle.model.parameters()).dtype == torch.bfloat16
    assert seen and all(s == {torch.float32} for s in seen)
    ac, meta = load_agent(tmp_path / "bf16")
    assert meta["updates"] == 2 and all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in ac.parameters())
    from trainers.common import ArgError

    with pytest.raises(ArgError, match="dtype.*'bf16'"):  # from Python, where argparse's choices never ran
        run(bundle, tmp_path / "bad", 1, dtype="bf16")
    assert not (tmp_path / "bad").exists()


def test_best_snapshot_follows_the_best_evaluation(bundle, tmp_path, monkeypatch, capsys):
    import trainers.train_agent as ta

    scores = iter([-3.0, -1.0, -2.0, -1.0])  # evaluations at 0, 1, 2, 3 updates: the best is the first -1 (1)
    weights = {}

    def fake_eval(encoder, actor, k, game, episodes, seed, **kw):
        weights[len(weights)] = {n: v.clone() for n, v in actor.state_dict().items()}
        return {"mean": next(scores), "std": 0.0, "returns": [0.0], "lengths": [1]}

    monkeypatch.setattr(ta, "evaluate_policy", fake_eval)
    assert run(bundle, tmp_path / "b", 3, eval_every=1) == 0
    meta = json.loads((tmp_path / "b" / "best" / "agent.json").read_text())
    assert meta["updates"] == 1 and meta["selected_by"]["eval_return_mean"] == -1.0
    best = load_agent(tmp_path / "b" / "best")[0].actor.state_dict()
    assert all(torch.equal(best[n], weights[1][n]) for n in best)
    assert not all(torch.equal(best[n], weights[3][n]) for n in best)
    assert "best evaluation: -1.00" in capsys.readouterr().out


def test_stage1_init_on_rssm_and_dit(stage1_out, bundle, tmp_path, capsys):
    s1 = stage1_out / "stage1"
    ac0, _ = load_agent(s1)
    # rssm:DIR world model, --init auto → the same stage-1 dir; 0 learning rate keeps the actor = stage 1's.
    assert main(Args(world_model=f"rssm:{stage1_out}", out=str(tmp_path / "rssm"), steps=2, init="auto",
                     lr=1e-12, eval_every=0, **TINY)) == 0
    ac1, meta = load_agent(tmp_path / "rssm")
    assert "warning" not in capsys.readouterr().err  # the RSSM bundle holds the stage-1 autoencoder itself
    assert meta["init"] == f"stage1:{s1}" and meta["world_model"] == f"rssm:{stage1_out}"
    for (k, v0), v1 in zip(ac0.actor.state_dict().items(), ac1.actor.state_dict().values()):
        assert torch.allclose(v0, v1, atol=1e-6), k
    # The same stage-1 agent fine-tuned in a DiT bundle (same d_z and K, but another, random, autoencoder).
    assert run(bundle, tmp_path / "dit", 2, init=f"stage1:{stage1_out}") == 0
    assert "autoencoder" in capsys.readouterr().err
    assert load_agent(tmp_path / "dit")[1]["init"] == f"stage1:{s1}"
    # policy:DIR continues a train-agent run (here in the same bundle; a vanishing step keeps its actor).
    assert run(bundle, tmp_path / "cont", 1, init=f"policy:{tmp_path / 'dit'}", lr=1e-12, eval_every=0) == 0
    assert "warning" not in capsys.readouterr().err  # its recorded world model has this very encoder
    assert run(bundle, tmp_path / "cont_bf16", 1, init=f"policy:{tmp_path / 'dit'}", eval_every=0,
               dtype="bfloat16") == 0
    assert "warning" not in capsys.readouterr().err  # the same encoder, run in bfloat16
    ac2, meta2 = load_agent(tmp_path / "cont")
    assert meta2["init"] == f"policy:{tmp_path / 'dit'}" and meta2["updates"] == 1
    for (k, v0), v1 in zip(load_agent(tmp_path / "dit")[0].actor.state_dict().items(),
                           ac2.actor.state_dict().values()):
        assert torch.allclose(v0, v1, atol=1e-6), k
    # ... but into the RSSM, whose stage-1 encoder is another one, it warns.
    assert main(Args(world_model=f"rssm:{stage1_out}", out=str(tmp_path / "rssm2"), steps=1,
                     init=f"policy:{tmp_path / 'dit'}", eval_every=0, **TINY)) == 0
    assert "policy's world model) differs" in capsys.readouterr().err
    # The stage-1 policy itself on the real game, through its own autoencoder (default --encoder).
    assert cli.main(["evaluate", "agent", "--policy", str(stage1_out), "--episodes", "2", "--max-steps", "5"]) == 0
    assert json.loads((s1 / "eval_real.json").read_text())["lengths"] == [5, 5]


def test_sigterm_checkpoints_exits_143_and_resumes(bundle, tmp_path):
    out = tmp_path / "t"
    proc = subprocess.Popen([sys.executable, "-m", "trainers.cli", "train-agent", "--world-model", bundle,
                             "--init", "scratch", "--steps", "100000", "--num-envs", "4", "--horizon", "3",
                             "--eval-every", "0", "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or os.path.getsize(out / "metrics.jsonl") == 0:
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else "timeout"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    _, meta = load_checkpoint(out)
    assert 0 < meta["updates"] < 100000 and not (out / "agent.json").exists()
    assert main(Args(world_model=bundle, out=str(out), steps=meta["updates"] + 2, init="scratch", eval_every=0,
                     resume=True, **{**TINY, "num_envs": 4})) == 0
    assert load_agent(out)[1]["updates"] == meta["updates"] + 2


@pytest.mark.parametrize("argv, field", [
    (["--steps", "0"], "--steps"),
    (["--num-envs", "0"], "--num-envs"),
    (["--init", "bogus"], "--init"),
    (["--init", "stage1:/nonexistent/dir"], "--init"),
    (["--init", "auto"], "--init"),  # a bare bundle dir has no stage-1 agent beside it
    (["--world-model", "/nonexistent/bundle"], "--world-model"),
    (["--world-model", "DiTWM/Nope-v0"], "--world-model"),
    (["--device", "cuda:7"], "--device"),
    (["--lr", "0"], "--lr"),
    (["--gamma", "1.5"], "--gamma"),
    (["--entropy-coef", "-1"], "--entropy-coef"),
    (["--eval-seed", "-2"], "--eval-seed"),
    (["--eval-starts", "3:1"], "--eval-starts"),
    (["--temperature", "-1"], "--temperature"),
    (["--sampling-shift", "0"], "--sampling-shift"),
    (["--start-data", "/nonexistent/store"], "--start-data"),
    (["--start-data", "/nonexistent/store", "--start-contexts", "0"], "--start-contexts"),
    (["--start-contexts", "64"], "--start-contexts"),  # without --start-data
])
def test_bad_arguments_exit_2_and_write_nothing(bundle, tmp_path, capsys, argv, field):
    base = {"--world-model": bundle, "--steps": "2", "--init": "scratch", "--out": str(tmp_path / "x")}
    for flag, value in zip(argv[::2], argv[1::2]):
        base[flag] = value
    if field == "--device" and torch.cuda.is_available():
        pytest.skip("CUDA present")
    assert cli.main(["train-agent", *[s for kv in base.items() for s in kv]]) == 2
    err = capsys.readouterr().err
    assert field in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_start_data_replaces_the_bundles_start_contexts(bundle, tiny_stage1_store, tmp_path, capsys):
    from trainers.train_agent import prepare

    args = Args(world_model=bundle, out=str(tmp_path / "s"), steps=2, init="scratch", start_data=str(tiny_stage1_store),
                start_contexts=50, **TINY)
    core = prepare(args).envs.unwrapped.core
    assert core.start_z.shape == (50, 4, 32) and core.start_a.shape == (50, 4)
    assert not torch.equal(core.start_z[:1], core.bundle.start_z[:1])
    assert torch.equal(prepare(args).envs.unwrapped.core.start_z, core.start_z)  # seeded: a resume draws the same
    assert run(bundle, tmp_path / "run", 2, start_data=str(tiny_stage1_store), start_contexts=50) == 0
    assert cli.main(["train-agent", "--world-model", bundle, "--steps", "4", "--init", "scratch", "--resume",
                     "--out", str(tmp_path / "run")]) == 2
    assert "error: --start-data: expected" in capsys.readouterr().err
    grown = tmp_path / "grown"  # the same path, more rows: the seeded draw would differ, so the resume is refused
    shutil.copytree(tiny_stage1_store, grown)
    assert run(bundle, tmp_path / "g", 2, start_data=str(grown), start_contexts=50) == 0
    chunks = sorted((grown / "chunks").glob("chunk-*.npz"))
    shutil.copy(chunks[0], chunks[-1].with_name("chunk-99999999.npz"))
    assert cli.main(["train-agent", "--world-model", bundle, "--steps", "4", "--init", "scratch", "--resume",
                     "--start-data", str(grown), "--start-contexts", "50", *TINY_ARGV, "--out", str(tmp_path / "g")]) == 2
    assert "error: --start-data: expected the store of the run being resumed" in capsys.readouterr().err


def test_resume_with_other_world_model_is_refused(bundle, tmp_path, capsys):
    assert run(bundle, tmp_path / "r", 2) == 0
    other = make_tiny_bundle(tmp_path / "other", seed=1)
    before = sorted(p.name for p in (tmp_path / "r").iterdir())
    assert cli.main(["train-agent", "--world-model", str(other), "--steps", "4", "--init", "scratch", "--resume",
                     "--out", str(tmp_path / "r")]) == 2
    assert "--world-model" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == before
    assert cli.main(["train-agent", "--world-model", str(bundle), "--steps", "4", "--init", "scratch", "--resume",
                     "--temperature", "0.5", "--out", str(tmp_path / "r")]) == 2
    assert "error: --temperature: expected None (the run being resumed), got 0.5" in capsys.readouterr().err
    assert cli.main(["train-agent", "--world-model", str(bundle), "--steps", "4", "--init", "scratch", "--resume",
                     "--sampling-shift", "3", "--out", str(tmp_path / "r")]) == 2
    assert "error: --sampling-shift: expected None (the run being resumed), got 3.0" in capsys.readouterr().err
    assert cli.main(["train-agent", "--world-model", str(bundle), "--steps", "4", "--init", "scratch", "--resume",
                     "--gamma", "0.99", "--out", str(tmp_path / "r")]) == 2
    assert "error: --gamma: expected 0.997 (the run being resumed), got 0.99" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == before


# ---- real-game evaluation -----------------------------------------------------------------------------------
def test_evaluate_policy_fixed_episodes_short_cap(bundle):
    from dit_envs.bundle import load_bundle
    from trainers.policy import evaluate_policy

    model = load_bundle(bundle).model
    actor = ActorCritic(AgentConfig(obs_dim=4 * 32, num_actions=6, hidden=8)).actor
    res = evaluate_policy(model, actor, 4, "Pong", episodes=3, seed=0, max_steps=7)
    assert len(res["returns"]) == 3 and res["lengths"] == [7, 7, 7]  # real Pong lasts far longer than 7 steps


def test_evaluate_agent_cli(bundle, tmp_path, capsys):
    assert run(bundle, tmp_path / "p", 1, eval_every=0) == 0
    capsys.readouterr()
    assert cli.main(["evaluate", "agent", "--policy", str(tmp_path / "p"), "--episodes", "3", "--max-steps",
                     "5"]) == 0  # encoder: the world model recorded in agent.json
    rep = json.loads((tmp_path / "p" / "eval_real.json").read_text())
    assert len(rep["returns"]) == 3 and rep["lengths"] == [5, 5, 5] and rep["greedy"] is True
    assert rep["mean"] == pytest.approx(np.mean(rep["returns"])) and "mean" in capsys.readouterr().out
    js = tmp_path / "random.json"
    assert cli.main(["evaluate", "agent", "--policy", "random", "--episodes", "2", "--max-steps", "5",
                     "--json-out", str(js)]) == 0
    assert len(json.loads(js.read_text())["returns"]) == 2
    assert cli.main(["evaluate", "agent", "--policy", str(tmp_path / "p"), "--encoder", str(tmp_path / "nothing"),
                     "--episodes", "1"]) == 2
    assert "--encoder" in capsys.readouterr().err


@pytest.mark.parametrize("greedy", [False, True])
def test_collect_with_a_trained_policy_replays_its_actions(bundle, tmp_path, capsys, greedy):
    """`ditwm collect --agent policy [--greedy]`: every stored action is the policy's sample (argmax) on the stack of
    the latents of the frames stored before it (same generator), so the store is the data of that policy."""
    from dit_envs.bundle import load_bundle
    from trainers.data import EpisodeStore
    from trainers.policy import LatentStack

    assert run(bundle, tmp_path / "p", 1, eval_every=0) == 0
    out = tmp_path / "store"
    assert cli.main(["collect", "--agent", "policy", "--policy", str(tmp_path / "p"), "--epsilon", "0",
                     "--steps", "60", "--num-envs", "2", "--seed", "4", "--out", str(out),
                     *(["--greedy"] if greedy else [])]) == 0
    store = EpisodeStore(out)
    assert store.read_meta()["collector"]["policy"] == str(tmp_path / "p")
    assert store.read_meta()["collector"]["greedy"] is greedy
    d = store.load()
    assert sorted(np.unique(d["episode"])) == [0, 1]  # 30 steps: no real Pong episode ends
    obs = np.stack([d["obs"][d["episode"] == i] for i in (0, 1)], 1)  # (31, 2, 3, 64, 64)
    acts = np.stack([d["action"][d["episode"] == i] for i in (0, 1)], 1)[1:]
    encoder = load_bundle(bundle).model
    ac, _ = load_agent(tmp_path / "p")
    gen, stack = torch.Generator().manual_seed(4), LatentStack(2, 4, 32)  # the seed of a fresh store
    with torch.no_grad():
        stack.reset(encoder.encode(torch.from_numpy(obs[0])))
        for t in range(30):
            assert acts[t].tolist() == ac.actor.act(stack.flat(), gen, greedy=greedy).tolist(), t
            stack.push(encoder.encode(torch.from_numpy(obs[t + 1])))
    # Bad input: no --policy, or one that does not load; exit 2 naming the flag, nothing written.
    for argv in ([], ["--policy", str(tmp_path / "none")]):
        assert cli.main(["collect", "--agent", "policy", *argv, "--steps", "8", "--out", str(tmp_path / "x")]) == 2
        assert "--policy" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert cli.main(["collect", "--policy", str(tmp_path / "p"), "--steps", "8", "--out", str(tmp_path / "x")]) == 2
    assert "--policy" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert cli.main(["collect", "--greedy", "--steps", "8", "--out", str(tmp_path / "x")]) == 2  # random play
    assert "--greedy" in capsys.readouterr().err and not (tmp_path / "x").exists()
    flip = [] if greedy else ["--greedy"]  # resuming the store with the other action choice
    assert cli.main(["collect", "--agent", "policy", "--policy", str(tmp_path / "p"), "--epsilon", "0", "--steps",
                     "80", "--num-envs", "2", "--seed", "4", "--out", str(out), "--resume", *flip]) == 2
    assert "--greedy" in capsys.readouterr().err and len(EpisodeStore(out).load()["action"]) == 62


# ---- the SB3 example ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("obs_type, extra", [("latent", ["--keep-ball", "2", "--lost-ball-truncate", "--n-epochs", "2",
                                                        "--lr", "1e-4", "--net-arch", "32,16", "--activation", "silu",
                                                        "--starts", "0:3"]),
                                             ("pixels", ["--uncertainty-penalty", "0.05", "--uncertainty-draws", "2",
                                                         "--uncertainty-truncate", "--temperature", "1"])])
def test_sb3_example_runs(bundle, obs_type, extra, capsys, tmp_path):
    spec = importlib.util.spec_from_file_location("sb3_example", ROOT / "examples" / "sb3_ppo_in_imagination.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(["--checkpoint", bundle, "--timesteps", "32", "--num-envs", "2", "--n-steps", "16",
                    "--episodes", "2", "--episode-steps", "8", "--max-steps", "10", "--obs-type", obs_type, *extra,
                    "--save", str(tmp_path / "ppo.zip")])
    assert set(res) == {"imagined_mean", "imagined_std", "real_mean", "real_std"}
    from stable_baselines3 import PPO
    assert PPO.load(tmp_path / "ppo.zip").num_timesteps == 32
    out = capsys.readouterr().out
    assert "imagination return" in out and "real Pong return" in out
    assert ("[32, 16] silu" if "--net-arch" in extra else "default tanh") in out
    assert ("real games: the 3 starts 0:3" if "--starts" in extra else "real games: 2 episodes") in out
    for bad in ("0,64", "a,b", ""):  # a bad --net-arch exits 2 naming the flag
        with pytest.raises(SystemExit) as e:
            mod.parse(["--net-arch", bad])
        assert e.value.code == 2 and "--net-arch" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        mod.parse(["--starts", "3"])
    assert e.value.code == 2 and "--starts: expected" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--uncertainty-draws: expected --uncertainty-penalty or"):
        mod.main(["--checkpoint", bundle, "--timesteps", "32", "--uncertainty-draws", "3"])
