"""`ditwm iterate` and `pretrain --extra-data / --recent-fraction`: tiny rounds on a tiny real-Pong store."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from trainers import cli
from trainers.latents import load_or_encode
from trainers.merge import merge_stores
from trainers.pretrain import Args as PretrainArgs, main as pretrain
from trainers.pretrain_data import load_stores, stores_index
from trainers.train_agent import Args as AgentArgs, main as train_agent

TINY_PRE = dict(preset="tiny", batch=8, warmup=1, eval_every=0, start_contexts=8, eval_windows=8, eval_horizon=6,
                threads=1)
AGENT_ARGS = "--num-envs 4 --horizon 3 --eval-episodes 2 --eval-max-steps 10 --episode-steps 20"
PRE_ARGS = "--preset tiny --eval-every 0 --start-contexts 8 --eval-windows 8 --eval-horizon 6"


class _Main:  # a stand-in for the `d` of trainers.distributed (one process)
    is_main, enabled = True, False


@pytest.fixture(scope="module")
def store(tiny_stage1_store) -> Path:
    return tiny_stage1_store


@pytest.fixture(scope="module")
def start(store, tmp_path_factory) -> tuple[Path, Path]:
    """A tiny DiT pretrain OUT on the store, and a policy trained one update in its bundle."""
    root = tmp_path_factory.mktemp("iterate_start")
    assert pretrain(PretrainArgs(data=str(store), out=str(root / "dit"), steps=4, **TINY_PRE)) == 0
    assert train_agent(AgentArgs(world_model=str(root / "dit" / "bundle"), init="scratch", steps=1,
                                 out=str(root / "policy"), eval_every=0, num_envs=4, horizon=3, eval_episodes=1,
                                 eval_max_steps=10, episode_steps=20)) == 0
    return root / "dit", root / "policy"


def test_extra_data_trains_on_the_rows_merge_stores_would_write(store, tmp_path):
    """Several stores as one (episode ids shifted as merge-stores shifts them, each store its own latent cache) hold
    exactly the rows, latents and held-out split of the merged store, and the index agrees with the latents."""
    from trainers.autoencoder import load_autoencoder
    from dit_envs.io import sha256_file

    other = tmp_path / "other"
    shutil.copytree(store, other, ignore=shutil.ignore_patterns("latents", "stage1"))
    ae = load_autoencoder(store / "stage1")
    sha = sha256_file(store / "stage1" / "autoencoder.safetensors")
    ds, source = load_stores(_Main(), [str(store), str(other)], ae, sha, tmp_path / "o", "test")
    merge_stores([store, other], tmp_path / "merged")
    merged, _ = load_or_encode(tmp_path / "merged", ae, sha)
    for k in ("z", "episode", "step", "action", "reward", "terminated"):
        assert np.array_equal(getattr(ds, k), getattr(merged, k)), k
    n = len(ds) // 2
    assert source.tolist() == [0] * n + [1] * n
    episode, step, reward, src = stores_index([str(store), str(other)])
    assert np.array_equal(episode, ds.episode) and np.array_equal(step, ds.step) and np.array_equal(src, source)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """A second, smaller Pong store (random play, 2 games of 30 steps: episode 0 held out, 1 trains)."""
    out = tmp_path_factory.mktemp("small") / "store"
    assert cli.main(["collect", "--agent", "random", "--steps", "60", "--num-envs", "2", "--out", str(out)]) == 0
    return out


def test_recent_fraction_draws_from_the_last_store_only(store, small, tmp_path, capsys):
    """The recent share covers exactly the training windows of the last store (not of the first or of a copy)."""
    from trainers.data import heldout_mask, segments

    other = tmp_path / "other"
    shutil.copytree(store, other, ignore=shutil.ignore_patterns("latents", "stage1"))
    out = tmp_path / "o"
    assert pretrain(PretrainArgs(data=str(store), extra_data=[str(other), str(small)], stage1=str(store / "stage1"),
                                 out=str(out), steps=2, recent_fraction=0.5, **TINY_PRE)) == 0
    m = re.search(r"50% of each batch from the (\d+) of (\d+) windows", capsys.readouterr().out)
    episode, step, _, src = stores_index([str(store), str(other), str(small)])
    last = (src == 2) & ~heldout_mask(episode)
    _, lengths = segments(episode[last], step[last])
    assert m and int(m[1]) == int(np.maximum(lengths - 8 + 1, 0).sum()) > 0  # windows of 8 rows: K 4 + 4 rollout
    card = (out / "bundle" / "README.md").read_text()
    assert "/store + " in card and "/other + " in card


def test_biased_draw_skips_held_out_rows_before_the_last_store(store, tmp_path):
    """``recent`` is over all rows, the windows over the training rows only: a held-out episode in front of the
    last store must not shift which windows are recent."""
    from dit_envs.io import sha256_file
    from trainers.autoencoder import load_autoencoder
    from trainers.data import heldout_mask
    from trainers.latents import LatentWindows
    from trainers.pretrain_data import biased_draw

    other = tmp_path / "other"
    shutil.copytree(store, other, ignore=shutil.ignore_patterns("latents", "stage1"))
    sha = sha256_file(store / "stage1" / "autoencoder.safetensors")
    ds, source = load_stores(_Main(), [str(store), str(other)], load_autoencoder(store / "stage1"), sha, tmp_path,
                             "t")
    held = heldout_mask(ds.episode)
    held |= ds.episode == ds.episode[source == 1].min()  # the last store's first episode held out as well
    train = ds.select(~held)
    w = LatentWindows(train, 6, mean=torch.zeros(32), std=torch.ones(32), num_actions=6, seed=0,
                      device=torch.device("cpu"))
    starts = w.sampler.all_window_starts()
    args = PretrainArgs(data="", out="", steps=1, recent_fraction=0.5)
    probs, fraction = biased_draw(args, train, starts, first_target=4, length=6, train_mask=~held, returns=None,
                                  recent=source == 1)
    train_source = source[~held][starts]
    assert fraction == 0.5 and np.isclose(probs.sum(), 1.0)
    assert (probs[train_source == 0] == 0).all() and (probs[train_source == 1] > 0).all()


@pytest.mark.parametrize("extra, field", [
    (["--recent-fraction", "0.5"], "--recent-fraction"),  # without --extra-data
    (["--extra-data", "OTHER", "--recent-fraction", "1.5"], "--recent-fraction"),
    (["--extra-data", "OTHER", "--recent-fraction", "0.6", "--event-fraction", "0.6"], "--recent-fraction"),
    (["--extra-data", "OTHER", "--recent-fraction", "0.5", "--priority-fraction", "0.5"], "--recent-fraction"),
    (["--extra-data", "BREAKOUT"], "--extra-data"),
    (["--extra-data", "/nonexistent"], "--extra-data"),
    (["--extra-data", "TINY", "--recent-fraction", "0.5"], "--recent-fraction"),  # no window in the last store
])
def test_bad_extra_data_exits_2_and_writes_nothing(store, tmp_path, capsys, extra, field):
    other = tmp_path / "other"
    shutil.copytree(store, other, ignore=shutil.ignore_patterns("latents", "stage1"))
    breakout = tmp_path / "breakout"
    shutil.copytree(other, breakout)
    meta = json.loads((breakout / "meta.json").read_text())
    (breakout / "meta.json").write_text(json.dumps({**meta, "game": "Breakout"}))
    tiny = tmp_path / "tiny"
    assert cli.main(["collect", "--agent", "random", "--steps", "8", "--num-envs", "2", "--out", str(tiny)]) == 0
    names = {"OTHER": str(other), "BREAKOUT": str(breakout), "TINY": str(tiny)}
    extra = [names.get(e, e) for e in extra]
    argv = ["pretrain", "--data", str(store), "--out", str(tmp_path / "x"), "--steps", "2", *extra]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert field in err and not (tmp_path / "x").exists()
    assert not (other / "latents").exists() and not (tiny / "latents").exists()


def _iterate(store, start, out, rounds, *extra, agent_args=AGENT_ARGS):
    dit, policy = start
    return cli.main(["iterate", "--data", str(store), "--world-model", str(dit), "--policy", str(policy),
                     "--out", str(out), "--rounds", str(rounds), "--collect-steps", "40", "--collect-envs", "2",
                     "--model-steps", "2", "--model-warmup", "1", "--batch", "8", "--agent-steps", "1",
                     "--threads", "1", "--pretrain-args", PRE_ARGS, "--agent-args", agent_args, *extra])


def test_iterate_rounds_chain_and_resume(store, start, tmp_path, capsys):
    out = tmp_path / "it"
    assert _iterate(store, start, out, 2) == 0
    printed = capsys.readouterr().out
    log = json.loads((out / "iterate.json").read_text())
    assert [(p["round"], p["phase"], p["exit"]) for p in log["phases"]] == [
        (r, p, 0) for r in (1, 2) for p in ("collect", "pretrain", "train-agent")]
    assert [r["round"] for r in log["rounds"]] == [1, 2] and "iterate: best evaluation" in printed
    # round 2 fine-tunes round 1's DiT on both rounds' play and continues round 1's policy
    card = json.loads((out / "round_002" / "agent" / "agent.json").read_text())
    assert card["init"] == f"policy:{out / 'round_001' / 'agent'}"
    assert card["world_model"] == str(out / "round_002" / "dit" / "bundle")
    assert f"--init {out / 'round_001' / 'dit'}" in printed
    assert f"--extra-data {out / 'round_001' / 'data'} {out / 'round_002' / 'data'}" in printed
    # The collections are the rounds' policies' play: round 2's store was collected by round 1's policy.
    meta = json.loads((out / "round_002" / "data" / "meta.json").read_text())
    assert meta["collector"]["policy"] == str(out / "round_001" / "agent") and meta["collector"]["seed"] == 1
    # A rerun with more rounds runs only the new one; a phase left partial is resumed, not restarted.
    (out / "round_002" / "agent" / "agent.json").unlink()
    assert _iterate(store, start, out, 3) == 0
    printed = capsys.readouterr().out
    log = json.loads((out / "iterate.json").read_text())
    assert [(p["round"], p["phase"]) for p in log["phases"][6:]] == [
        (2, "train-agent"), (3, "collect"), (3, "pretrain"), (3, "train-agent")]
    assert re.search(r"round 2: ditwm train-agent .*--resume", printed)
    assert [r["round"] for r in log["rounds"]] == [1, 2, 3]
    no_eval = AGENT_ARGS.replace("--eval-episodes 2 ", "")  # a run that did not choose is not resumed choosing
    assert _iterate(store, start, out, 4, "--select-episodes", "2", agent_args=no_eval) == 2
    assert "--select-episodes" in capsys.readouterr().err and not (out / "round_004").exists()
    assert _iterate(store, start, out, 4, "--select-starts", "0:2", agent_args=no_eval) == 2
    assert "--select-starts" in capsys.readouterr().err and not (out / "round_004").exists()


@pytest.mark.parametrize("extra, field", [
    (["--rounds", "0"], "--rounds"),
    (["--recent-fraction", "2"], "--recent-fraction"),
    (["--pretrain-args", "--steps 5"], "--pretrain-args"),
    (["--agent-args", "--eval-every=3 --dtype float32"], "--agent-args"),
    (["--agent-args", "'unclosed"], "--agent-args"),
    (["--agent-args", "--eval-ev 3 --dtype float32"], "--agent-args"),  # an abbreviation of a flag the loop sets
    (["--pretrain-args", "--no-such-flag 1 --preset tiny"], "--pretrain-args"),
    (["--agent-args", "--num-envs many --dtype float32"], "--agent-args"),
    (["--policy", "/nonexistent"], "--policy"),
])
def test_iterate_bad_arguments_exit_2_and_write_nothing(store, start, tmp_path, capsys, extra, field):
    dit, policy = start
    argv = ["iterate", "--data", str(store), "--world-model", str(dit), "--policy", str(policy),
            "--out", str(tmp_path / "x"), "--rounds", "1", *extra]
    assert cli.main(argv) == 2
    assert field in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_iterate_selection_keeps_only_rounds_that_score_at_least_the_best(store, start, tmp_path, capsys, monkeypatch):
    """--select-episodes: the starting policy and every round's policy play the same real games (--select-seed); a
    round scoring below the best so far is dropped (the next round continues the best policy), its DiT is kept."""
    import trainers.policy
    import trainers.train_agent

    seeds = []

    def spy(real):
        def wrapped(encoder, actor, k, game, episodes, seed, **kw):
            seeds.append((episodes, seed))
            return real(encoder, actor, k, game, episodes, seed, **kw)
        return wrapped

    monkeypatch.setattr(trainers.policy, "evaluate_policy", spy(trainers.policy.evaluate_policy))
    monkeypatch.setattr(trainers.train_agent, "evaluate_policy", spy(trainers.train_agent.evaluate_policy))
    out, sel = tmp_path / "it", ["--select-episodes", "2", "--select-seed", "77", "--collect-greedy"]
    kw = dict(agent_args=AGENT_ARGS.replace("--eval-episodes 2 ", ""))
    assert _iterate(store, start, out, 1, *sel, **kw) == 0
    assert seeds == [(2, 77), (2, 77)]  # the starting policy, then round 1's, on the same games
    start_mean = json.loads((out / "start_eval.json").read_text())["mean"]
    assert json.loads((out / "round_001" / "data" / "meta.json").read_text())["collector"]["greedy"] is True
    log = json.loads((out / "iterate.json").read_text())
    assert log["rounds"][0]["kept"] is log["rounds"][0]["best"] is True and log["select"]["continue_from"] == "best"
    assert log["rounds"][0]["select_steps"] == 2 * 10 + 2 * 10
    # Round 1 scoring below the start (its evaluation rewritten) is dropped on the rerun: round 2 goes on from the
    # starting policy and from round 1's DiT.
    metrics = out / "round_001" / "agent" / "metrics.jsonl"
    recs = [json.loads(line) for line in metrics.read_text().splitlines()]
    metrics.write_text("".join(json.dumps({**r, "eval_return_mean": start_mean - 1} if "eval_return_mean" in r else r)
                               + "\n" for r in recs))
    (out / "iterate.json").write_text(json.dumps({**log, "rounds": []}))
    capsys.readouterr()
    assert _iterate(store, start, out, 2, *sel, **kw) == 0
    printed = capsys.readouterr().out
    log = json.loads((out / "iterate.json").read_text())
    assert [r["kept"] for r in log["rounds"]] == [False, True] and "round 1: real return" in printed
    card = json.loads((out / "round_002" / "agent" / "agent.json").read_text())
    assert card["init"] == f"policy:{start[1]}" and f"--init {out / 'round_001' / 'dit'}" in printed
    assert "best evaluation" in printed and "round 2" in printed.splitlines()[-1]
    assert _iterate(store, start, out, 3, "--select-episodes", "3", **kw) == 2  # resumed on other games
    assert "--select-episodes" in capsys.readouterr().err and not (out / "round_003").exists()
    assert _iterate(store, start, out, 3, *sel, "--continue-from", "last", **kw) == 2  # another rule on resume
    assert "--continue-from" in capsys.readouterr().err and not (out / "round_003").exists()
    assert _iterate(store, start, out, 3, **kw) == 2  # resumed without choosing
    assert "--select-episodes" in capsys.readouterr().err and not (out / "round_003").exists()
    # --continue-from last: a round below the best still passes its policy on; the best is the one reported
    walk = tmp_path / "walk"
    shutil.copytree(out, walk)
    walk_select = {**log["select"], "continue_from": "last"}
    (walk / "iterate.json").write_text(json.dumps({**log, "rounds": [], "select": walk_select}))
    shutil.rmtree(walk / "round_002")
    assert _iterate(store, start, walk, 2, *sel, "--continue-from", "last", **kw) == 0
    printed = capsys.readouterr().out
    rounds = json.loads((walk / "iterate.json").read_text())["rounds"]
    assert [(r["best"], r["kept"]) for r in rounds] == [(False, True), (True, True)]
    assert [r["updates"] for r in rounds] == [1, 2]
    card = json.loads((walk / "round_002" / "agent" / "agent.json").read_text())
    assert card["init"] == f"policy:{walk / 'round_001' / 'agent'}" and "in round 2" in printed.splitlines()[-1]
    # the loop sets the evaluation games itself when selecting
    assert _iterate(store, start, tmp_path / "x", 1, *sel, agent_args="--eval-seed 3") == 2
    assert "--agent-args" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_iterate_selection_on_fixed_starts(store, start, tmp_path, capsys, monkeypatch):
    """--select-starts: the starting policy and every round's policy play one game per listed start."""
    import trainers.policy
    import trainers.train_agent

    calls = []

    def spy(real):
        def wrapped(*a, **kw):
            calls.append(kw.get("starts"))
            return real(*a, **kw)
        return wrapped

    monkeypatch.setattr(trainers.policy, "evaluate_policy", spy(trainers.policy.evaluate_policy))
    monkeypatch.setattr(trainers.train_agent, "evaluate_policy", spy(trainers.train_agent.evaluate_policy))
    out, kw = tmp_path / "it", dict(agent_args=AGENT_ARGS.replace("--eval-episodes 2 ", ""))
    assert _iterate(store, start, out, 1, "--select-starts", "3:5", **kw) == 0
    assert calls == [[3, 4], [3, 4]]
    recs = [json.loads(line) for line in (out / "round_001" / "agent" / "metrics.jsonl").read_text().splitlines()]
    assert [len(r["eval_returns"]) for r in recs if "eval_return_mean" in r] == [2]  # one return per start
    assert json.loads((out / "start_eval.json").read_text())["starts"] == [3, 4]
    log = json.loads((out / "iterate.json").read_text())
    assert log["select"]["select_starts"] == "3:5" and log["rounds"][0]["select_steps"] == 2 * 10 + 2 * 10
    assert "score it again with `ditwm evaluate agent --starts all`" in capsys.readouterr().out
    assert _iterate(store, start, out, 2, "--select-starts", "all", **kw) == 2  # resumed on other starts
    assert "--select-starts" in capsys.readouterr().err and not (out / "round_002").exists()
    for extra in (["--select-starts", "all", "--select-episodes", "2"], ["--select-starts", "9"]):
        assert _iterate(store, start, tmp_path / "x", 1, *extra, **kw) == 2
        assert "--select-starts" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert _iterate(store, start, tmp_path / "x", 1, "--select-starts", "all", agent_args="--eval-starts all") == 2
    assert "--agent-args" in capsys.readouterr().err and not (tmp_path / "x").exists()
