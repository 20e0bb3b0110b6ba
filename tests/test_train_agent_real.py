"""The real game with latent observations (`RealLatentVectorEnv`), `train-agent --world-model real:` (the perfect-model
ceiling of the learner) and the clipped multi-step update (`--epochs`, `--minibatches`)."""
from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode

from dit_envs.envs.real import make_real_env
from dit_envs.envs.real_latent import RealLatentVectorEnv
from tests.conftest import make_tiny_bundle
from tests.test_train_agent import TINY, EpisodeEnv
from trainers import cli
from trainers.agent import ActorCritic, AgentConfig
from trainers.agent_io import load_agent
from trainers.autoencoder import load_autoencoder
from trainers.rollout import clipped_loss, collect_rollout, rollout_loss, rollout_targets
from trainers.train_agent import Args, main


@pytest.fixture(scope="module")
def encoder(tiny_stage1_store):
    return load_autoencoder(tiny_stage1_store / "stage1").requires_grad_(False)


def test_real_latent_env_stacks_encoded_frames_and_keeps_the_final_stack(encoder):
    frames_env = make_real_env("Pong", num_envs=2, max_num_frames_per_episode=4 * 6)  # episodes of 6 steps
    env = RealLatentVectorEnv(make_real_env("Pong", num_envs=2, max_num_frames_per_episode=4 * 6), encoder, 4,
                              encoder.latent_dim)
    assert env.metadata["autoreset_mode"].name == "SAME_STEP"
    obs, _ = env.reset(seed=3)
    frames, _ = frames_env.reset(seed=3)  # the same games, seen as frames
    enc = lambda f: encoder.encode(torch.as_tensor(f)).float().clamp(-1, 1).numpy()  # noqa: E731
    assert obs.shape == (2, 4, encoder.latent_dim) and obs.dtype == np.float32
    assert np.allclose(obs, enc(frames)[:, None].repeat(4, 1))  # "reset" padding: every slot the first frame
    history = [enc(frames)] * 4
    for t in range(6):
        a = np.array([t % 6, (t + 2) % 6])
        obs, r, term, trunc, info = env.step(a)
        frames, _, fterm, ftrunc, finfo = frames_env.step(a)
        assert np.array_equal(term | trunc, fterm | ftrunc)
        if t < 5:
            history = history[1:] + [enc(frames)]
            assert np.allclose(obs, np.stack(history, 1), atol=1e-6) and "final_obs" not in info
    assert trunc.all() and info["_final_obs"].all()  # the 6-step cap: both truncated on the same step
    last = enc(np.stack(list(finfo["final_obs"])))
    for i in range(2):
        assert np.allclose(info["final_obs"][i], np.stack(history[1:] + [last], 1)[i], atol=1e-6)
    assert np.allclose(obs, enc(frames)[:, None].repeat(4, 1))  # the next episode's first frame, padded
    with pytest.raises(ValueError, match="k: expected an integer >= 1, got 0"):
        RealLatentVectorEnv(frames_env, encoder, 0, encoder.latent_dim)
    with pytest.raises(ValueError, match="autoreset_mode.*SAME_STEP"):
        RealLatentVectorEnv(_NextStep(frames_env), encoder, 4, encoder.latent_dim)
    env.close()
    frames_env.close()


class _FrameEnv(gym.vector.VectorEnv):
    """Env ``i`` truncates every ``lengths[i]`` steps (SAME_STEP autoreset); its frame shows (episode, step)."""

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP}

    def __init__(self, lengths: list[int]) -> None:
        self.num_envs, self.lengths = len(lengths), np.array(lengths)
        self.single_action_space = gym.spaces.Discrete(3)
        self.ep, self.t = np.zeros(self.num_envs, int), np.zeros(self.num_envs, int)

    def frames(self, ep, t) -> np.ndarray:
        f = np.zeros((len(ep), 3, 64, 64), np.uint8)
        for i, (e, s) in enumerate(zip(ep, t)):
            f[i, :, 8 * s: 8 * s + 8, 8 * e: 8 * e + 8] = 200  # a block that moves with the step and the episode
        return f

    def reset(self, *, seed=None, options=None):
        self.ep[:], self.t[:] = 0, 0
        return self.frames(self.ep, self.t), {}

    def step(self, actions):
        self.t += 1
        done = self.t >= self.lengths
        last = self.frames(self.ep, self.t)
        info = {}
        if done.any():
            info["final_obs"] = np.full(self.num_envs, None, dtype=object)
            for i in np.flatnonzero(done):
                info["final_obs"][i] = last[i]
            self.ep[done], self.t[done] = self.ep[done] + 1, 0
        z = np.zeros(self.num_envs, np.float32)
        return self.frames(self.ep, self.t), z, np.zeros(self.num_envs, bool), done, info


def test_real_latent_env_when_one_env_ends_alone(encoder):
    env = RealLatentVectorEnv(_FrameEnv([2, 3]), encoder, 3, encoder.latent_dim)
    enc = lambda f: encoder.encode(torch.as_tensor(f)).float().clamp(-1, 1).numpy()  # noqa: E731
    one = lambda e, t: enc(env.env.frames([e], [t]))[0]  # noqa: E731
    obs, _ = env.reset()
    obs, _, _, trunc, info = env.step(np.zeros(2, np.int64))
    assert not trunc.any() and "final_obs" not in info
    obs, _, _, trunc, info = env.step(np.zeros(2, np.int64))  # env 0 ends, env 1 goes on
    assert trunc.tolist() == [True, False] and info["_final_obs"].tolist() == [True, False]
    assert info["final_obs"][1] is None
    assert np.allclose(info["final_obs"][0], np.stack([one(0, 0), one(0, 1), one(0, 2)]), atol=1e-6)
    assert np.allclose(obs[0], np.stack([one(1, 0)] * 3), atol=1e-6)  # its next episode, padded
    assert np.allclose(obs[1], np.stack([one(0, 0), one(0, 1), one(0, 2)]), atol=1e-6)
    assert not np.allclose(one(0, 0), one(0, 1))  # the frames are told apart by the encoder
    with pytest.raises(ValueError, match="options: expected None"):
        env.reset(options={"reset_mask": np.array([True, False])})


class _NextStep:
    def __init__(self, env):
        self.metadata, self.num_envs = {"autoreset_mode": None}, env.num_envs


def test_train_agent_on_the_real_game(tiny_stage1_store, tmp_path, capsys):
    s1 = tiny_stage1_store / "stage1"
    ac0, _ = load_agent(s1)
    # --init auto on real:DIR is that stage-1 agent; a vanishing step keeps its actor, so the evaluation is its.
    assert main(Args(world_model=f"real:{tiny_stage1_store}", out=str(tmp_path / "r"), steps=2, init="auto",
                     lr=1e-12, num_envs=2, horizon=3, eval_every=2, eval_episodes=2, eval_max_steps=5)) == 0
    out = capsys.readouterr()
    assert "warning" not in out.err and "real Pong return after 2 updates" in out.out
    ac1, meta = load_agent(tmp_path / "r")
    assert meta["init"] == f"stage1:{s1}" and meta["world_model"] == f"real:{tiny_stage1_store}"
    assert meta["updates"] == 2 and meta["env_steps"] == 2 * 3 * 2
    for (k, v0), v1 in zip(ac0.actor.state_dict().items(), ac1.actor.state_dict().values()):
        assert torch.allclose(v0, v1, atol=1e-6), k
    evals = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["updates"] for r in evals if "eval_return_mean" in r] == [0, 2]
    # Its policy reads the stage-1 encoder, which `evaluate agent` finds through the recorded real: world model.
    assert cli.main(["evaluate", "agent", "--policy", str(tmp_path / "r"), "--episodes", "2", "--max-steps", "5"]) == 0
    assert json.loads((tmp_path / "r" / "eval_real.json").read_text())["lengths"] == [5, 5]


@pytest.mark.parametrize("flag, value", [("--sampling-steps", "2"), ("--temperature", "0.5"),
                                         ("--sampling-shift", "3"), ("--episode-steps", "15"),
                                         ("--dtype", "bfloat16")])
def test_real_game_refuses_world_model_settings(tiny_stage1_store, tmp_path, capsys, flag, value):
    argv = ["train-agent", "--world-model", f"real:{tiny_stage1_store}", "--steps", "1", "--out", str(tmp_path / "x"),
            flag, value]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert flag in err and "real game" in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_clipped_loss_has_the_reinforce_gradient_before_the_policy_moves():
    torch.manual_seed(0)
    ac = ActorCritic(AgentConfig(obs_dim=2, num_actions=3, hidden=16, gamma=0.9, entropy_coef=1e-2))
    env = EpisodeEnv([3, 5, 4, 7], ["term", "trunc", "term", "trunc"])
    obs, _ = env.reset()
    rollout, _ = collect_rollout(env, lambda x: torch.randint(0, 3, (x.shape[0],)), obs, 6, 1, np.zeros(4))
    rollout.traj.rewards = torch.randn_like(rollout.traj.rewards)  # rewards of both signs
    grads = []
    for which in ("reinforce", "clipped"):
        ac.normalizer.low.zero_(), ac.normalizer.high.zero_()
        ac.zero_grad()
        if which == "reinforce":
            loss, _ = rollout_loss(ac, rollout)
        else:
            loss, m = clipped_loss(ac, rollout, rollout_targets(ac, rollout), torch.arange(4), clip=0.2)
            assert float(m["clip_fraction"]) == 0.0
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in [*ac.actor.parameters(), *ac.critic.parameters()]]))
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)


def test_clipped_epochs_train_and_resume_bit_exact(tmp_path, capsys):
    bundle = make_tiny_bundle(tmp_path / "bundle")
    kw = dict(world_model=str(bundle), init="scratch", eval_every=2, epochs=2, minibatches=2, **TINY)
    assert main(Args(out=str(tmp_path / "full"), steps=4, **kw)) == 0
    assert main(Args(out=str(tmp_path / "split"), steps=2, **kw)) == 0
    assert main(Args(out=str(tmp_path / "split"), steps=4, resume=True, **kw)) == 0
    a, b = load_agent(tmp_path / "full")[0], load_agent(tmp_path / "split")[0]
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k
    recs = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert any("clip_fraction" in r for r in recs)
    for flag, value, field in (("--minibatches", "5", "--minibatches"), ("--clip", "0", "--clip"),
                               ("--epochs", "0", "--epochs")):
        assert cli.main(["train-agent", "--world-model", str(bundle), "--steps", "1", "--num-envs", "4",
                         "--out", str(tmp_path / "bad"), flag, value]) == 2
        assert field in capsys.readouterr().err and not (tmp_path / "bad").exists()
