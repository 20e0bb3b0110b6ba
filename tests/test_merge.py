"""`ditwm merge-stores`: rows, episode offsets that keep each source's held-out split, provenance, bad input."""
import json

import numpy as np
import pytest

from trainers import cli as ditwm
from trainers.collect import Args, main as collect
from trainers.data import HELDOUT_EVERY, EpisodeStore, heldout_mask
from trainers.merge import next_offset


@pytest.fixture(scope="module")
def two_stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    a, b = root / "a", root / "b"
    assert collect(Args(steps=240, out=str(a), num_envs=12, chunk_rows=64)) == 0  # episodes 0..11
    assert collect(Args(steps=90, out=str(b), num_envs=3, agent="track", seed=1, chunk_rows=64)) == 0
    return a, b


def episode_offsets(max_episode):
    offsets = [0]
    for m in max_episode[:-1]:
        offsets.append(next_offset(offsets[-1], m))
    return offsets


def test_episode_offsets_are_multiples_of_the_heldout_period():
    assert episode_offsets([11, 2, -1, 0]) == [0, 20, 30, 30]
    assert all(o % HELDOUT_EVERY == 0 for o in episode_offsets([3, 9, 10]))


def test_merge_keeps_rows_splits_and_provenance(two_stores, tmp_path, capsys):
    a, b = two_stores
    out = tmp_path / "mix"
    assert ditwm.main(["merge-stores", "--sources", str(a), str(b), "--out", str(out)]) == 0
    assert "from 2 stores" in capsys.readouterr().out
    rows = [m["rows"] for m in EpisodeStore(out).read_meta()["merged_from"]]
    assert rows == [len(EpisodeStore(p).load()["step"]) for p in (a, b)]
    da, db, dm = (EpisodeStore(p).load() for p in (a, b, out))
    assert len(dm["step"]) == len(da["step"]) + len(db["step"])
    meta = EpisodeStore(out).read_meta()
    assert [m["episode_offset"] for m in meta["merged_from"]] == [0, 20]
    assert meta["merged_from"][1]["collector"]["agent"] == "track" and meta["game"] == "Pong"
    first = dm["episode"] < 20
    for k in da:
        np.testing.assert_array_equal(dm[k][first], da[k])
    np.testing.assert_array_equal(dm["episode"][~first] - 20, db["episode"])
    np.testing.assert_array_equal(dm["obs"][~first], db["obs"])
    np.testing.assert_array_equal(heldout_mask(dm["episode"][~first]), heldout_mask(db["episode"]))
    assert not list(tmp_path.glob(".*merging"))


def test_a_merged_store_merges_again_with_nested_provenance(two_stores, tmp_path):
    a, b = two_stores
    assert ditwm.main(["merge-stores", "--sources", str(a), str(b), "--out", str(tmp_path / "ab")]) == 0
    assert ditwm.main(["merge-stores", "--sources", str(tmp_path / "ab"), str(b), "--out", str(tmp_path / "abb")]) == 0
    meta = EpisodeStore(tmp_path / "abb").read_meta()
    outer = meta["merged_from"]
    assert [m["store"] for m in outer] == [str(tmp_path / "ab"), str(b)] and "merged_from" not in outer[1]
    assert [m["store"] for m in outer[0]["merged_from"]] == [str(a), str(b)]
    dab, dabb = (EpisodeStore(tmp_path / p).load() for p in ("ab", "abb"))
    assert len(dabb["step"]) == len(dab["step"]) + len(EpisodeStore(b).load()["step"])
    assert len(np.unique(dabb["episode"])) == len(np.unique(dab["episode"])) + 3


def test_merge_refuses_other_games_and_non_stores(two_stores, tmp_path, capsys):
    a, b = two_stores
    other = tmp_path / "other"
    other.mkdir()
    meta = json.loads((b / "meta.json").read_text())
    (other / "meta.json").write_text(json.dumps({**meta, "action_meanings": ["NOOP", "FIRE"]}))
    out = tmp_path / "mix"
    for sources, words in (([str(a), str(other)], "action_meanings"), ([str(a), str(tmp_path)], "meta.json"),
                           ([str(a)], "at least 2")):
        assert ditwm.main(["merge-stores", "--sources", *sources, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert "--sources" in err and words in err and len(err.splitlines()) == 1
        assert not out.exists() and not list(tmp_path.glob(".*merging"))
