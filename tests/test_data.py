"""Episode store: round trip, crash safety, corruption skip, sampler boundaries and seeding."""
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest

from trainers.data import FIELDS, EpisodeStore, SequenceSampler, segments


def fake_rows(n_rows, episode, start_step=0, seed=0):
    rng = np.random.default_rng(seed)
    steps = np.arange(start_step, start_step + n_rows)
    return dict(obs=rng.integers(0, 256, (n_rows, 3, 64, 64), dtype=np.uint8),
                action=np.where(steps == 0, -1, rng.integers(0, 6, n_rows)),
                reward=rng.choice([-1.0, 0.0, 1.0], n_rows).astype(np.float32),
                terminated=np.zeros(n_rows, bool), truncated=np.zeros(n_rows, bool),
                episode=np.full(n_rows, episode), step=steps)


def test_round_trip(tmp_path):
    store = EpisodeStore(tmp_path, chunk_rows=7)
    store.write_meta(game="Pong")
    a, b = fake_rows(10, episode=0, seed=1), fake_rows(5, episode=1, seed=2)
    for i in range(10):  # interleave two episodes row by row, as parallel envs do
        store.add(**{k: v[i:i + 1] for k, v in a.items()})
        if i < 5:
            store.add(**{k: v[i:i + 1] for k, v in b.items()})
    store.flush()
    assert len(store.chunk_paths()) == 3  # 7 + 7 + 1 rows
    data = EpisodeStore(tmp_path).load()
    for k in FIELDS:
        np.testing.assert_array_equal(data[k], np.concatenate([a[k], b[k]]))
        assert data[k].dtype == FIELDS[k][0]
    assert EpisodeStore(tmp_path).read_meta()["game"] == "Pong"


def test_add_rejects_bad_rows(tmp_path):
    store = EpisodeStore(tmp_path)
    rows = fake_rows(2, episode=0)
    with pytest.raises(ValueError, match="obs"):
        store.add(**{**rows, "obs": rows["obs"][:, :, :32]})
    with pytest.raises(ValueError, match="rows"):
        store.add(**{k: v for k, v in rows.items() if k != "reward"})
    with pytest.raises(ValueError, match="action"):
        store.add(**{**rows, "action": rows["action"].astype(np.float32)})


def three_chunks(root, episode: int) -> tuple[EpisodeStore, dict]:
    """A store of one 12-row episode in three chunks of 4 rows, and the rows written."""
    store = EpisodeStore(root, chunk_rows=4)
    store.write_meta(game="Pong")
    rows = fake_rows(12, episode=episode)
    for i in range(0, 12, 4):
        store.add(**{k: v[i:i + 4] for k, v in rows.items()})
    return store, rows


def test_read_columns_maps_rows_to_chunks_and_skips_bad_chunks(tmp_path):
    store, rows = three_chunks(tmp_path, episode=3)
    cols = store.read_columns(("step", "reward"))
    np.testing.assert_array_equal(cols["step"], np.arange(12))
    np.testing.assert_array_equal(cols["reward"], rows["reward"])
    np.testing.assert_array_equal(cols["chunk"], np.repeat([0, 1, 2], 4))
    np.testing.assert_array_equal(cols["row"], np.tile(np.arange(4), 3))
    assert cols["step"].dtype == np.int64 and cols["reward"].dtype == np.float32
    bad = store.chunk_paths()[1]
    bad.write_bytes(b"not a zip at all")
    with pytest.warns(UserWarning, match="chunk-00000001.npz"):
        cols = store.read_columns(("step",))
    np.testing.assert_array_equal(cols["step"], [0, 1, 2, 3, 8, 9, 10, 11])
    np.testing.assert_array_equal(cols["chunk"], [0] * 4 + [2] * 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(store.read_columns(("step",), warn=False)["step"]) == 8


def test_corrupted_chunk_is_skipped_with_warning(tmp_path):
    store, rows = three_chunks(tmp_path, episode=0)
    bad = store.chunk_paths()[1]
    raw = bad.read_bytes()
    bad.write_bytes(raw[: len(raw) // 2])  # truncated
    (tmp_path / "chunks" / "chunk-00000007.npz").write_bytes(b"not a zip at all")
    with pytest.warns(UserWarning, match="chunk-00000001.npz") as rec:
        data = EpisodeStore(tmp_path).load()
    assert any("chunk-00000007.npz" in str(w.message) for w in rec)
    np.testing.assert_array_equal(data["step"], [0, 1, 2, 3, 8, 9, 10, 11])
    starts, lengths = segments(data["episode"], data["step"])
    assert starts.tolist() == [0, 4] and lengths.tolist() == [4, 4]


WRITER = textwrap.dedent("""
    import sys, numpy as np
    sys.path.insert(0, {root!r})
    from trainers.data import EpisodeStore
    store = EpisodeStore(sys.argv[1], chunk_rows=64)
    store.write_meta(game="Pong")
    rng = np.random.default_rng(0)
    step = 0
    print("ready", flush=True)
    while True:
        store.add(obs=rng.integers(0, 256, (8, 3, 64, 64), dtype=np.uint8), action=np.zeros(8, np.int64),
                  reward=np.zeros(8, np.float32), terminated=np.zeros(8, bool), truncated=np.zeros(8, bool),
                  episode=np.arange(8), step=np.full(8, step))
        step += 1
""")


def test_sigkill_mid_write_leaves_only_readable_chunks(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-c", WRITER.format(root=root), str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    deadline = time.time() + 60
    while len(list((tmp_path / "chunks").glob("chunk-*.npz"))) < 5 and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any unreadable chunk would warn
        data = EpisodeStore(tmp_path).load()
    n_chunks = len(EpisodeStore(tmp_path).chunk_paths())
    assert n_chunks >= 5 and len(data["step"]) == 64 * n_chunks
    # every episode holds consecutive steps 0..k: nothing but whole chunks was kept
    for ep in range(8):
        np.testing.assert_array_equal(data["step"][data["episode"] == ep], np.arange(8 * n_chunks))
    EpisodeStore(tmp_path).write_meta(game="Pong")  # resume clears temp leftovers
    assert not list((tmp_path / "chunks").glob(".*.tmp"))


def test_sampler_never_crosses_episode_boundaries(tmp_path):
    store = EpisodeStore(tmp_path, chunk_rows=1000)
    store.write_meta(game="Pong")
    lengths = [3, 17, 5, 40, 8]
    for ep, n in enumerate(lengths):
        store.add(**fake_rows(n, episode=ep, seed=ep))
    store.flush()
    data = store.load()
    sampler = SequenceSampler(data, seq_len=8, seed=0)
    assert sampler.num_windows == sum(max(n - 7, 0) for n in lengths)
    seen = set()
    for _ in range(50):
        batch = sampler.sample(16)
        eps = data["episode"][batch.index]
        assert (eps == eps[:, :1]).all(), "a window crosses an episode boundary"
        assert (np.diff(data["step"][batch.index], axis=1) == 1).all()
        np.testing.assert_array_equal(batch.is_first, data["step"][batch.index] == 0)
        np.testing.assert_array_equal(batch.obs, data["obs"][batch.index])
        seen.update(batch.index[:, 0].tolist())
    assert len(seen) == sampler.num_windows  # every valid window is reachable


def test_sampler_seeded_and_resumable(tmp_path):
    store = EpisodeStore(tmp_path)
    store.add(**fake_rows(50, episode=0))
    store.flush()
    data = store.load()
    s1, s2 = SequenceSampler(data, 4, seed=3), SequenceSampler(data, 4, seed=3)
    np.testing.assert_array_equal(s1.sample(8).index, s2.sample(8).index)
    state = s1.state_dict()
    after = s1.sample(8).index
    s3 = SequenceSampler(data, 4, seed=99)
    s3.load_state_dict(state)
    np.testing.assert_array_equal(s3.sample(8).index, after)
    with pytest.raises(ValueError, match="seq_len"):
        SequenceSampler(data, 51)
