"""Stage 2 (`ditwm pretrain`): tiny runs on a tiny real-Pong stage-1 store — bundle, resume, SIGTERM, DDP, args."""
import json
import os
import re
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

import dit_envs  # noqa: F401  (registers DiTWM/*)
from trainers.checkpoint import load_checkpoint
from trainers.common import ArgError
from trainers.pretrain import Args, main

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(preset="tiny", batch=8, warmup=2, log_every=2, eval_every=5, checkpoint_every=4, start_contexts=8,
            eval_windows=8, eval_horizon=8, threads=1)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def store(tiny_stage1_store) -> Path:
    return tiny_stage1_store


def flags(**kw) -> list[str]:
    out = []
    for k, v in kw.items():
        out += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return out


def run(store, out, steps, **kw):
    return main(Args(data=str(store), out=str(out), steps=steps, **{**TINY, **kw}))


def test_tiny_run_writes_a_bundle_that_steps_as_an_env(store, tmp_path, capsys):
    assert run(store, tmp_path / "o", 10) == 0
    printed = capsys.readouterr().out
    assert "steps/s" in printed and "bundle" in printed
    recs = [json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if "flow" in r]
    assert train and all(k in train[-1] for k in ("reward", "term", "lr", "grad_norm", "steps_per_s"))
    assert any("eval/mse@1" in r for r in recs)
    card = (tmp_path / "o" / "bundle" / "README.md").read_text()
    assert "training steps | 10" in card and "train_rows" in card
    envs = gym.make_vec("DiTWM/Pong-v0", num_envs=3, checkpoint=str(tmp_path / "o" / "bundle"))
    obs, _ = envs.reset(seed=0)
    for _ in range(3):
        obs, reward, term, trunc, _ = envs.step(envs.action_space.sample())
    assert obs.shape == (3, 3, 64, 64) and obs.dtype == np.uint8 and reward.shape == (3,)
    envs.close()
    _, meta = load_checkpoint(tmp_path / "o")
    assert meta["step"] == 10 and meta["world_size"] == 1


def test_bf16_precision_autocasts_the_forward_passes_and_resumes(store, tmp_path):
    # bf16 on CPU: the same seed and steps as fp32 but other weights (the forwards ran in bfloat16), still a
    # finite, loadable run that resumes
    assert run(store, tmp_path / "fp32", 4, precision="fp32") == 0
    assert run(store, tmp_path / "bf16", 4, precision="bf16") == 0
    assert run(store, tmp_path / "split", 2, precision="bf16") == 0
    assert run(store, tmp_path / "split", 4, precision="bf16", resume=True) == 0
    a, _ = load_checkpoint(tmp_path / "fp32")
    b, meta = load_checkpoint(tmp_path / "bf16")
    c, _ = load_checkpoint(tmp_path / "split")
    assert meta["step"] == 4 and a.keys() == b.keys() == c.keys()
    assert all(torch.equal(b[k], c[k]) for k in b)  # resumed bf16 == uninterrupted bf16
    assert all(torch.isfinite(v).all() for v in b.values() if v.is_floating_point())
    assert all(v.dtype == a[k].dtype for k, v in b.items())  # parameters and optimiser state stay float32
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("net."))


def test_autocast_for_picks_bfloat16_only_when_asked_or_on_cuda():
    from trainers.common import autocast_for

    x = torch.randn(4, 8)
    w = torch.randn(8, 3)
    with autocast_for(torch.device("cpu"), "bf16"):
        assert (x @ w).dtype == torch.bfloat16
    for precision in ("fp32", "auto"):
        with autocast_for(torch.device("cpu"), precision):
            assert (x @ w).dtype == torch.float32
    with pytest.raises(ValueError, match="precision.*'fp16'"):
        autocast_for(torch.device("cpu"), "fp16")


def test_unknown_precision_is_refused_by_the_cli(store, tmp_path, capsys):
    from trainers import cli

    argv = ["pretrain", "--data", str(store), "--out", str(tmp_path / "x"), "--steps", "5", "--precision", "fp16"]
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2 and "--precision" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(ArgError, match="precision.*'fp16'"):  # from Python, before anything is written
        run(store, tmp_path / "x", 5, precision="fp16")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("prioritised", [False, True, "event"])
def test_resume_in_new_process_is_bit_exact(store, tmp_path, prioritised):
    kw = dict(lr_decay_steps=12, rollout_steps=3)  # the multi-step term too: it draws from the same RNG streams
    if prioritised is True:  # error priorities refreshed at steps 4, 8, the run split at 6: they must be checkpointed
        kw.update(priority_fraction=0.5, priority_alpha=2.0, priority_every=4)
    elif prioritised == "event":  # reward-event windows: recomputed from the data on resume, checkpointed too
        kw.update(event_fraction=0.5, event_horizon=4)
    assert run(store, tmp_path / "full", 12, **kw) == 0
    cmd = [sys.executable, "-m", "trainers.cli", "pretrain", "--data", str(store), "--out", str(tmp_path / "split"),
           *flags(steps=6, **TINY, **kw)]
    first = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert run(store, tmp_path / "split", 12, resume=True, **kw) == 0
    a, ma = load_checkpoint(tmp_path / "full")
    b, mb = load_checkpoint(tmp_path / "split")
    assert ma["step"] == mb["step"] == 12 and ma["samplers"] == mb["samplers"]
    assert a.keys() == b.keys()
    assert ("windows.priority" in a) == bool(prioritised)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_pixel_term_and_priorities_are_logged(store, tmp_path):
    out = tmp_path / "px"
    assert run(store, out, 6, pixel_weight=10.0, priority_fraction=0.5, priority_every=2, log_every=1) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["pixel"] > 0 for r in rows if "flow" in r)
    refreshes = [r for r in rows if "priority_mean_error" in r]
    assert [r["step"] for r in refreshes] == [2, 4] and all(0 < r["priority_top1pct_mass"] <= 1 for r in refreshes)
    assert (out / "bundle" / "config.json").is_file()


def _rewrite_chunks(src: Path, dst: Path, edit) -> Path:
    """A copy of store ``src`` at ``dst`` (latents dropped, so they are re-encoded) with ``edit(cols)`` applied to the
    columns of every chunk."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("latents"))
    for chunk in (dst / "chunks").glob("*.npz"):
        with np.load(chunk, allow_pickle=False) as z:
            cols = {k: z[k] for k in z.files}
        edit(cols)
        np.savez_compressed(chunk, **cols)
    return dst


def test_event_draw_oversamples_windows_near_reward_events(store, tmp_path, capsys):
    from trainers.data import EpisodeStore

    reward = EpisodeStore(store).load()["reward"]
    assert (reward != 0).any(), "the tiny store needs a reward event for this test"
    assert run(store, tmp_path / "ev", 2, event_fraction=0.5, event_horizon=4) == 0
    m = re.search(r"50% of each batch from the (\d+) of (\d+) windows", capsys.readouterr().out)
    assert m and 0 < int(m[1]) < int(m[2])


def test_event_draw_on_a_store_without_rewards_exits_2_and_leaves_no_output(store, tmp_path, capsys):
    from trainers import cli

    quiet = _rewrite_chunks(store, tmp_path / "quiet", lambda cols: cols["reward"].fill(0.0))
    out = tmp_path / "o"
    argv = ["pretrain", "--data", str(quiet), "--stage1", str(store / "stage1"), "--out", str(out), "--steps", "2",
            *flags(**TINY), "--event-fraction", "0.5"]
    assert cli.main(argv) == 2
    assert "--event-fraction" in capsys.readouterr().err and not out.exists()


def _paint_returns(cols: dict) -> None:
    """Every frame becomes an empty field with a one-pixel ball whose column peaks on the agent's side at steps
    10, 30, 50, … of each episode (a return of the ball every 20 steps)."""
    field = cols["obs"][:1].copy()
    field[:] = np.array([144, 72, 17], np.uint8)[:, None, None]
    cols["obs"] = np.repeat(field, len(cols["obs"]), axis=0)
    col = 50 - 3 * np.abs(cols["step"] % 20 - 10)
    cols["obs"][np.arange(len(col)), :, 30, col] = 236


def test_return_draw_oversamples_windows_near_returns_of_the_ball(store, tmp_path, capsys):
    painted = _rewrite_chunks(store, tmp_path / "painted", _paint_returns)
    out = tmp_path / "ret"
    assert main(Args(data=str(painted), stage1=str(store / "stage1"), out=str(out), steps=2,
                     **{**TINY, "return_fraction": 0.25, "event_fraction": 0.25})) == 0
    m = re.search(r"50% of each batch from the (\d+) of (\d+) windows", capsys.readouterr().out)
    assert m and 0 < int(m[1]) < int(m[2])
    assert json.loads((out / "bundle" / "config.json").read_text())["game"] == "Pong"


def test_return_draw_without_returns_or_on_another_game_exits_2_and_leaves_no_output(store, tmp_path, capsys):
    from trainers import cli

    def still(cols):  # no ball anywhere: no return to draw
        cols["obs"][:] = np.array([144, 72, 17], np.uint8)[None, :, None, None]

    quiet = _rewrite_chunks(store, tmp_path / "quiet", still)
    other = tmp_path / "other"
    shutil.copytree(store, other)
    meta = json.loads((other / "meta.json").read_text())
    (other / "meta.json").write_text(json.dumps({**meta, "game": "Breakout"}))
    for data, said in ((quiet, "returns of the ball"), (other, "Breakout")):
        out = tmp_path / f"o_{data.name}"
        argv = ["pretrain", "--data", str(data), "--stage1", str(store / "stage1"), "--out", str(out),
                "--steps", "2", *flags(**TINY), "--return-fraction", "0.5"]
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert "--return-fraction" in err and said in err and not out.exists()


def test_sigterm_writes_checkpoint_and_exits_143(store, tmp_path):
    out = tmp_path / "t"
    cmd = [sys.executable, "-m", "trainers.pretrain", "--data", str(store), "--out", str(out),
           *flags(**{**TINY, "log_every": 1, "checkpoint_every": 100000}, steps=100000)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or os.path.getsize(out / "metrics.jsonl") == 0:
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else "timeout"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    _, meta = load_checkpoint(out)
    assert 0 < meta["step"] < 100000
    assert not (out / "bundle").exists()
    assert run(store, out, meta["step"] + 2, resume=True) == 0
    assert (out / "bundle" / "config.json").is_file()


def test_ddp_two_cpu_processes_keep_identical_weights(store, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "trainers.pretrain", "--data", str(store), "--out", str(out),
           *flags(**{**TINY, "checkpoint_every": 3}, steps=6)]
    res = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    # save_state raises unless every parameter is bit-identical on both ranks (checked at steps 3 and 6)
    tensors, meta = load_checkpoint(out)
    assert meta["world_size"] == 2 and meta["step"] == 6 and len(meta["samplers"]) == 2
    assert not torch.equal(tensors["rng.gen.0"], tensors["rng.gen.1"])  # each rank draws its own noise
    assert meta["samplers"][0] != meta["samplers"][1]  # ... and its own windows
    assert res.stdout.count("pretrain: bundle") == 1  # rank 0 alone reports and writes
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps_logged = [r["step"] for r in recs if "flow" in r]
    assert steps_logged == [2, 4, 6]
    assert (out / "bundle" / "config.json").is_file()


def _replicas_worker(rank: int, port: int, differ: bool, results) -> None:
    import torch.distributed as dist

    from trainers.distributed import Dist, replicas_equal

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2)
    if differ and rank == 1:
        with torch.no_grad():
            m.bias[0] += 1e-7
    results[rank] = replicas_equal(Dist(rank, 2, rank, torch.device("cpu")), m)
    dist.destroy_process_group()


@pytest.mark.parametrize("differ", [False, True])
def test_replicas_equal_detects_any_difference(differ):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_replicas_worker, args=(port, differ, results), nprocs=2)
    assert dict(results) == {0: not differ, 1: not differ}


@pytest.mark.parametrize("extra, field", [
    (["--steps", "0"], "--steps"),
    (["--seq-len", "9"], "--seq-len"),
    (["--rollout-steps", "1"], "--rollout-steps"),
    (["--priority-fraction", "1.5"], "--priority-fraction"),
    (["--priority-every", "0"], "--priority-every"),
    (["--priority-alpha", "-1"], "--priority-alpha"),
    (["--event-fraction", "1.5"], "--event-fraction"),
    (["--event-fraction", "0.5", "--priority-fraction", "0.5"], "--event-fraction"),
    (["--event-horizon", "-1"], "--event-horizon"),
    (["--return-fraction", "1.5"], "--return-fraction"),
    (["--return-fraction", "0.5", "--priority-fraction", "0.5"], "--return-fraction"),
    (["--return-fraction", "0.6", "--event-fraction", "0.6"], "--return-fraction"),
    (["--clean-context", "1.5"], "--clean-context"),
    (["--stage1", "/nonexistent"], "--stage1"),
    (["--rollout-steps", "100000"], "--data"),
    (["--init", "/nonexistent"], "--init"),
    (["--latent-motion-weight", "-1"], "--latent-motion-weight"),
    (["--latent-motion-threshold", "0"], "--latent-motion-threshold"),
    (["--depth", "-1"], "--depth"),
    (["--t-mean", "nan"], "--t-mean"),
    (["--t-std", "0"], "--t-std"),
])
def test_bad_arguments_exit_2_and_write_nothing(store, tmp_path, capsys, extra, field):
    from trainers import cli

    before = sorted(p.name for p in store.iterdir())
    argv = ["pretrain", "--data", str(store), "--out", str(tmp_path / "x"), "--steps", "5", *extra]
    assert cli.main(argv) == 2
    assert field in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert sorted(p.name for p in store.iterdir()) == before


def test_init_fine_tunes_from_an_earlier_run(store, tmp_path, capsys):
    from trainers import cli

    assert run(store, tmp_path / "base", 6) == 0
    base, _ = load_checkpoint(tmp_path / "base")
    # A vanishing learning rate: the fine-tuned weights and their EMA stay the base run's EMA weights.
    assert run(store, tmp_path / "ft", 3, init=str(tmp_path / "base"), lr=1e-12, weight_decay=0.0) == 0
    assert f"from {tmp_path / 'base'}" in capsys.readouterr().out
    ft, meta = load_checkpoint(tmp_path / "ft")
    assert meta["step"] == 3 and meta["args"]["init"] == str(tmp_path / "base")
    assert torch.equal(ft["latent_mean"], base["latent_mean"]) and torch.equal(ft["latent_std"], base["latent_std"])
    ema_keys = [k for k in base if k.startswith("ema.")]
    assert ema_keys
    for k in ema_keys:
        assert torch.allclose(ft["net." + k[4:]], base[k], atol=1e-6), k
        assert torch.allclose(ft[k], base[k], atol=1e-6), k
    # Another preset or a shorter K than the --init run's is refused before anything is written.
    for extra, field in ((["--preset", "S"], "--preset"), (["--context-len", "3"], "--context-len")):
        argv = ["pretrain", "--data", str(store), "--out", str(tmp_path / "bad"), "--steps", "2",
                "--init", str(tmp_path / "base"), *flags(**{**TINY, "preset": "tiny"}), *extra]
        assert cli.main(argv) == 2
        assert field in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_init_grows_the_context(store, tmp_path, capsys):
    from trainers.pretrain_state import init_weights

    assert run(store, tmp_path / "base", 4) == 0
    base, base_meta = load_checkpoint(tmp_path / "base")
    k = base_meta["context_len"]
    assert run(store, tmp_path / "k2", 2, init=str(tmp_path / "base"), context_len=k + 2, lr=1e-12,
               weight_decay=0.0) == 0
    ft, meta = load_checkpoint(tmp_path / "k2")
    assert meta["context_len"] == k + 2 and meta["configs"]["dit"]["context_len"] == k + 2
    pos = base["ema.dit.pos_embed"]  # (K+1, D): aligned at the end, the two new older positions start at pos[0]
    assert torch.allclose(ft["ema.dit.pos_embed"], torch.cat([pos[:1], pos[:1], pos]), atol=1e-6)
    for key in (x for x in base if x.startswith("ema.") and x != "ema.dit.pos_embed"):
        assert torch.allclose(ft[key], base[key], atol=1e-6), key
    assert json.loads((tmp_path / "k2" / "bundle" / "config.json").read_text())["context_len"] == k + 2
    # Without --context-len the --init run's K is the default (here the grown one), and a grown run resumes.
    assert run(store, tmp_path / "k2b", 2, init=str(tmp_path / "k2")) == 0
    assert load_checkpoint(tmp_path / "k2b")[1]["context_len"] == k + 2
    assert run(store, tmp_path / "k2", 4, init=str(tmp_path / "base"), context_len=k + 2, resume=True) == 0
    assert load_checkpoint(tmp_path / "k2")[1]["step"] == 4
    envs = gym.make_vec("DiTWM/Pong-v0", num_envs=2, checkpoint=str(tmp_path / "k2" / "bundle"))
    envs.reset(seed=0)
    obs = envs.step(envs.action_space.sample())[0]
    assert obs.shape == (2, 3, 64, 64)
    envs.close()
    with pytest.raises(ValueError, match="context_len: expected >= "):
        init_weights(base, base_meta, k - 1)
    streaming = {**base_meta, "configs": {**base_meta["configs"],
                                          "dit": {**base_meta["configs"]["dit"], "streaming": True}}}
    with pytest.raises(ValueError, match="streaming"):
        init_weights(base, streaming, k + 1)
    assert init_weights(base, base_meta, k)["dit.pos_embed"] is base["ema.dit.pos_embed"]


def test_depth_overrides_the_preset_and_must_match_on_resume_and_init(store, tmp_path, capsys):
    from trainers import cli

    assert run(store, tmp_path / "d3", 4, depth=3) == 0
    ck, meta = load_checkpoint(tmp_path / "d3")
    assert meta["configs"]["dit"]["depth"] == 3 and "ema.dit.blocks.2.mlp.0.weight" in ck
    assert "ema.dit.blocks.3.mlp.0.weight" not in ck
    assert json.loads((tmp_path / "d3" / "bundle" / "config.json").read_text())["configs"]["dit"]["depth"] == 3
    assert "tiny depth 3" in (tmp_path / "d3" / "bundle" / "README.md").read_text()
    envs = gym.make_vec("DiTWM/Pong-v0", num_envs=2, checkpoint=str(tmp_path / "d3" / "bundle"))
    envs.reset(seed=0)
    assert envs.step(envs.action_space.sample())[0].shape == (2, 3, 64, 64)
    envs.close()
    assert run(store, tmp_path / "d3", 6, depth=3, resume=True) == 0
    assert load_checkpoint(tmp_path / "d3")[1]["step"] == 6
    assert run(store, tmp_path / "d2", 2, depth=2) == 0  # tiny's own depth: spelled or not, the same network
    assert run(store, tmp_path / "d2", 4, resume=True) == 0 and load_checkpoint(tmp_path / "d2")[1]["step"] == 4
    capsys.readouterr()
    for extra, field in ((["--resume", "--out", str(tmp_path / "d3"), "--steps", "8"], "--depth"),
                         (["--init", str(tmp_path / "d3"), "--out", str(tmp_path / "bad"), "--steps", "2"], "--init")):
        assert cli.main(["pretrain", "--data", str(store), *flags(**TINY), *extra]) == 2
        assert field in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "d3")[1]["step"] == 6 and not (tmp_path / "bad").exists()


def test_bad_store_and_non_empty_out(tmp_path, capsys):
    from trainers import cli

    assert cli.main(["pretrain", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "x"), "--steps", "5"]) == 2
    assert "--data" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    assert cli.main(["pretrain", "--data", str(tmp_path), "--out", str(tmp_path / "full"), "--steps", "5"]) == 2
    assert "--out" in capsys.readouterr().err


def test_latent_cache_is_reused_and_invalidated(store, tmp_path):
    from trainers.autoencoder import load_autoencoder
    from trainers.data import EpisodeStore
    from trainers.latents import latent_path, load_or_encode

    s = tmp_path / "store"
    shutil.copytree(store, s, ignore=shutil.ignore_patterns("latents"))
    ae = load_autoencoder(s / "stage1")
    ds, reused = load_or_encode(s, ae, "a" * 64)
    assert not reused and ds.path == latent_path(s, "a" * 64) and ds.path.is_file()
    data = EpisodeStore(s).load()
    assert np.array_equal(ds.episode, data["episode"]) and np.array_equal(ds.action, data["action"])
    assert ds.z.dtype == np.float16
    with torch.no_grad():
        z = ae.encode(torch.from_numpy(data["obs"][:50])).numpy()
    assert np.abs(ds.z[:50].astype(np.float32) - z).max() < 2e-3
    mtime = ds.path.stat().st_mtime_ns
    again, reused = load_or_encode(s, ae, "a" * 64)
    assert reused and ds.path.stat().st_mtime_ns == mtime and np.array_equal(again.z, ds.z)
    other, reused = load_or_encode(s, ae, "b" * 64)  # another encoder: its own file
    assert not reused and other.path != ds.path
    st = EpisodeStore(s)  # the store grows: the cache is stale
    row = {k: v[-1:] for k, v in data.items()}
    st.add(**{**row, "episode": row["episode"] + 100})
    st.flush()
    grown, reused = load_or_encode(s, ae, "a" * 64)
    assert not reused and len(grown) == len(ds) + 1
    ds.path.write_bytes(b"garbage")  # a corrupt cache file is rebuilt
    fixed, reused = load_or_encode(s, ae, "a" * 64)
    assert not reused and len(fixed) == len(grown)


def test_training_time_flags_reach_the_objective(store, tmp_path):
    assert run(store, tmp_path / "o", 2, t_mean=-0.5, t_std=0.8) == 0
    obj = load_checkpoint(tmp_path / "o")[1]["objective"]
    assert (obj["t_mean"], obj["t_std"]) == (-0.5, 0.8)
    assert '"t_mean": -0.5' in (tmp_path / "o" / "bundle" / "README.md").read_text()  # the model card's objective
