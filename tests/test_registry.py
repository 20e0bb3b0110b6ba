"""`registry`: catalog, sources, sha256 pins, offline Hub download, `ditwm push`. Hub tests run the real
`huggingface_hub.snapshot_download` on a cache laid out as huggingface_hub writes it, offline, sockets blocked."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import registry
from registry import catalog

REPO = "ditwm-test/tiny-pong"
COMMIT = "3f2a9c1e5b7d4f6a8c0e2b4d6f8a1c3e5b7d9f0a"
OTHER_COMMIT = "b" * 40
FILES = {  # a tiny fake bundle: known bytes, no real weights
    "config.json": b'{"format_version": 1, "game": "Pong"}\n',
    "README.md": b"# tiny test bundle\n",
    "autoencoder.safetensors": bytes(range(256)) * 4,
    "dynamics.safetensors": b"\x00\x01dynamics" * 100,
    "heads.safetensors": b"heads" * 10,
    "start_contexts.safetensors": b"\xff" * 333,
}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


PINS = {name: sha(data) for name, data in FILES.items()}


# ------------------------------------------------------------------------------------------------ fixtures
def write_bundle(path: Path, files: dict[str, bytes] = FILES) -> Path:
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return path


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def add_to_hub_cache(cache: Path, repo_id: str, commit: str, files: dict[str, bytes], *,
                     tree_cache: bool = True) -> Path:
    """Lay `files` out as huggingface_hub's cache does; return the snapshot directory.

    Blobs are named by their etag (sha256 for LFS files such as *.safetensors, the git blob sha1 otherwise);
    snapshot entries are relative symlinks to the blobs; refs/main holds the commit (no newline); the tree
    listing of the commit is cached in trees/<commit>.json as huggingface_hub 2.x writes it.
    """
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    tree = {}
    for rel, data in files.items():
        lfs = rel.endswith(".safetensors")
        etag = sha(data) if lfs else git_blob_sha1(data)
        blob = storage / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
        if lfs:
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{etag}\nsize {len(data)}\n".encode()
            tree[rel] = {"size": len(data), "blob_id": git_blob_sha1(pointer), "lfs_sha256": etag,
                         "lfs_size": len(data)}
        else:
            tree[rel] = {"size": len(data), "blob_id": etag}
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / "main").write_text(commit)
    if tree_cache:
        (storage / "trees").mkdir(exist_ok=True)
        (storage / "trees" / f"{commit}.json").write_text(
            json.dumps({"format_version": 1, "files": dict(sorted(tree.items()))}, indent=1))
    return snapshot


@pytest.fixture
def clean_catalog():
    saved = dict(catalog._CATALOG)
    yield
    for env_id in set(catalog._CATALOG) - set(saved):
        registry.unregister(env_id)  # through the API, so listeners (dit_envs' Gymnasium ids) follow
    assert catalog._CATALOG == saved


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty Hub cache in tmp, offline mode on, sockets blocked. Returns the cache directory."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub reads both variables once, at import, into `constants`; its code reads the constants.
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))

    def no_network(*args, **kwargs):
        raise AssertionError("a test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    return cache


@pytest.fixture(params=[True, False], ids=["tree-cache", "no-tree-cache"])
def hub_snapshot(request, offline_hub) -> Path:
    """The fake bundle cached at REPO@COMMIT (with and without the cached tree listing)."""
    return add_to_hub_cache(offline_hub, REPO, COMMIT, FILES, tree_cache=request.param)


# ------------------------------------------------------------------------------------------------ catalog
def test_import_is_one_way_and_cheap():
    code = ("import sys, registry; bad = [m for m in sys.modules if m.split('.')[0] in "
            "('dit_envs', 'trainers', 'huggingface_hub', 'torch')]; print(bad); sys.exit(bool(bad))")
    r = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_builtin_pong_entry_ships_pinned_and_a_missing_bundle_says_how_to_pass_checkpoint():
    e = registry.get("DiTWM/Pong-v0")
    assert (e.env_id, e.game, e.source, e.max_episode_steps) == ("DiTWM/Pong-v0", "Pong", "bundled:pong-v0", 1000)
    assert e.sha256 == registry.bundled_pins("pong-v0") == registry.sha256_dir(catalog.bundled_root() / "pong-v0")
    assert set(e.sha256) >= {"config.json", "dynamics.safetensors", "autoencoder.safetensors", "README.md"}
    assert registry.resolve(e) == catalog.bundled_root() / "pong-v0"
    with pytest.raises(FileNotFoundError) as ei:
        registry.resolve(catalog.CatalogEntry("DiTWM/Nope-v0", "Nope", "bundled:nope-v0"))
    msg = str(ei.value)
    assert "no bundled checkpoint 'nope-v0'" in msg and "checkpoint=" in msg and "DiTWM/Nope-v0" in msg


def test_pin_bundled_writes_pins_json_and_a_damaged_bundled_file_is_caught(tmp_path, monkeypatch):
    monkeypatch.setattr(catalog, "bundled_root", lambda: tmp_path)
    write_bundle(tmp_path / "pong-v0")
    write_bundle(tmp_path / "other-v1")
    assert registry.bundled_pins("pong-v0") is None  # no pins.json yet
    pins = registry.pin_bundled("pong-v0")
    registry.pin_bundled("other-v1")
    assert pins == PINS and registry.bundled_pins("pong-v0") == PINS and registry.bundled_pins("other-v1") == PINS
    assert registry.resolve("bundled:pong-v0", sha256=registry.bundled_pins("pong-v0")) == tmp_path / "pong-v0"
    (tmp_path / "pong-v0" / "config.json").write_text("{}")
    with pytest.raises(registry.IntegrityError, match="config.json"):
        registry.resolve("bundled:pong-v0", sha256=registry.bundled_pins("pong-v0"))
    (tmp_path / "pins.json").write_text("[1]")
    with pytest.raises(ValueError, match="pins.json"):
        registry.bundled_pins("pong-v0")
    with pytest.raises(FileNotFoundError, match="name"):
        registry.pin_bundled("missing-v0")


def test_bundled_source_resolves_to_package_data_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(catalog, "bundled_root", lambda: tmp_path)
    write_bundle(tmp_path / "pong-v0")
    assert registry.resolve("bundled:pong-v0", sha256=PINS) == tmp_path / "pong-v0"


def test_register_get_entries_and_listeners(clean_catalog, tmp_path):
    seen = []
    remove = registry.add_listener(on_register=lambda e: seen.append(("+", e.env_id)),
                                   on_unregister=lambda i: seen.append(("-", i)))
    e = registry.register("Test/Tiny-v3", tmp_path, game="Tiny", max_episode_steps=50, sha256=PINS)
    assert registry.get("Test/Tiny-v3") is e and (e.source, e.sha256, e.max_episode_steps) == (str(tmp_path), PINS, 50)
    ids = [x.env_id for x in registry.entries()]
    assert ids == sorted(ids) and "Test/Tiny-v3" in ids and "DiTWM/Pong-v0" in ids
    with pytest.raises(ValueError, match="'Test/Tiny-v3' is already registered.*overwrite=True"):
        registry.register("Test/Tiny-v3", "bundled:other", game="Tiny")
    e2 = registry.register("Test/Tiny-v3", "bundled:other", game="Tiny", overwrite=True)
    assert registry.get("Test/Tiny-v3") is e2 and registry.unregister("Test/Tiny-v3") is e2
    assert seen == [("+", "Test/Tiny-v3"), ("+", "Test/Tiny-v3"), ("-", "Test/Tiny-v3")]
    remove()
    registry.unregister(registry.register("Test/Tiny-v3", "bundled:x", game="Tiny").env_id)
    assert len(seen) == 3
    with pytest.raises(KeyError, match=r"expected a registered id \(.*DiTWM/Pong-v0.*\), got 'Test/Tiny-v3'"):
        registry.get("Test/Tiny-v3")


@pytest.mark.parametrize("env_id", ["Pong-v0", "DiTWM/Pong", "DiTWM/Pong-vx", "/Pong-v0", "A/B/C-v0", "", 3])
def test_register_rejects_bad_env_id(clean_catalog, env_id):
    with pytest.raises(ValueError, match="env_id: expected 'Namespace/Name-v<int>'"):
        registry.register(env_id, "bundled:x", game="X")


@pytest.mark.parametrize("source", ["", "hf://onlyorg", "hf://org/name@", "hf://org/../x@" + COMMIT,
                                    "hf://org/name//sub@" + COMMIT, "hf:org/name", "s3://bucket/x", "hf:///org/name",
                                    "bundled:", "bundled:../escape", "hf://-bad/name"])
def test_register_rejects_bad_source_syntax(clean_catalog, source):
    with pytest.raises(ValueError, match="source"):
        registry.register("Test/Bad-v0", source, game="X")
    assert "Test/Bad-v0" not in [e.env_id for e in registry.entries()]


@pytest.mark.parametrize("kw, field", [
    ({"game": ""}, "game"),
    ({"game": "X", "max_episode_steps": 0}, "max_episode_steps"),
    ({"game": "X", "max_episode_steps": True}, "max_episode_steps"),
    ({"game": "X", "sha256": {"config.json": "abc"}}, "sha256"),
    ({"game": "X", "sha256": {"../config.json": "a" * 64}}, "sha256"),
    ({"game": "X", "sha256": ["config.json"]}, "sha256"),
])
def test_register_rejects_bad_fields(clean_catalog, kw, field):
    with pytest.raises(ValueError, match=field):
        registry.register("Test/Bad-v0", "bundled:x", **kw)


def test_hf_source_parsing():
    s = registry.parse_hf_source(f"hf://org/name/sub/dir@{COMMIT}")
    assert (s.repo_id, s.subfolder, s.revision, s.pinned) == ("org/name", "sub/dir", COMMIT, True)
    assert str(s) == f"hf://org/name/sub/dir@{COMMIT}"
    assert registry.parse_hf_source("hf://org/name").revision is None
    assert not registry.parse_hf_source("hf://org/name@" + COMMIT.upper()).pinned  # HF commits are lowercase


# ------------------------------------------------------------------------------------------------ local + pins
def test_local_dir_source(tmp_path, monkeypatch):
    d = write_bundle(tmp_path / "bundle")
    assert registry.resolve(str(d)) == d.resolve()
    assert registry.resolve(d, sha256=PINS) == d.resolve()
    monkeypatch.setenv("HOME", str(tmp_path))
    assert registry.resolve("~/bundle") == d.resolve()
    with pytest.raises(FileNotFoundError, match="missing path"):
        registry.resolve(tmp_path / "nope")
    with pytest.raises(NotADirectoryError, match="got a file"):
        registry.resolve(d / "config.json")


def test_sha256_dir_matches_hashlib_and_skips_hidden(tmp_path):
    d = write_bundle(tmp_path / "b", {**FILES, "sub/extra.bin": b"x", ".gitattributes": b"*", ".cache/y": b"y"})
    pins = registry.sha256_dir(d)
    assert pins == {**PINS, "sub/extra.bin": sha(b"x")} and list(pins) == sorted(pins)
    assert registry.sha256_file(d / "config.json", chunk_size=3) == PINS["config.json"]


def test_flipped_byte_raises_integrity_error(tmp_path):
    d = write_bundle(tmp_path / "b")
    data = bytearray(FILES["dynamics.safetensors"])
    data[17] ^= 0x01
    (d / "dynamics.safetensors").write_bytes(bytes(data))
    with pytest.raises(registry.IntegrityError) as ei:
        registry.resolve(d, sha256=PINS)
    e = ei.value
    assert isinstance(e, ValueError)
    assert (e.filename, e.expected, e.actual) == ("dynamics.safetensors", PINS["dynamics.safetensors"], sha(data))
    assert "dynamics.safetensors" in str(e) and e.expected in str(e) and e.actual in str(e)
    (d / "heads.safetensors").unlink()  # a pinned file missing
    with pytest.raises(FileNotFoundError, match="heads.safetensors"):
        registry.resolve(d, sha256={"heads.safetensors": PINS["heads.safetensors"]})


def test_entry_pins_and_caller_pins_both_checked(clean_catalog, tmp_path):
    d = write_bundle(tmp_path / "b")
    e = registry.register("Test/Pinned-v0", d, game="Pong", sha256=PINS)
    assert registry.resolve(e) == d.resolve()
    (d / "README.md").write_bytes(b"edited\n")
    with pytest.raises(registry.IntegrityError, match="README.md"):
        registry.resolve(e)
    e2 = registry.register("Test/Pinned-v0", d, game="Pong", sha256={"config.json": PINS["config.json"]},
                           overwrite=True)
    registry.resolve(e2)  # the caller's pins are checked on top of the entry's:
    with pytest.raises(registry.IntegrityError, match="README.md"):
        registry.resolve(e2, sha256={"README.md": PINS["README.md"]})


# ------------------------------------------------------------------------------------------------ Hub (offline)
def test_fixture_layout_is_the_hubs_own(hub_snapshot, offline_hub):
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache

    info = scan_cache_dir(offline_hub)  # strict about the layout (its default dir is bound at import: pass it)
    assert not info.warnings
    (repo,) = info.repos
    assert repo.repo_id == REPO and [r.commit_hash for r in repo.revisions] == [COMMIT]
    assert set(next(iter(repo.revisions)).refs) == {"main"}
    assert try_to_load_from_cache(REPO, "config.json", revision=COMMIT) == str(hub_snapshot / "config.json")


def test_hf_pinned_commit_resolves_offline(clean_catalog, hub_snapshot, tmp_path):
    path = registry.resolve(f"hf://{REPO}@{COMMIT}")
    assert path == hub_snapshot and path.name == COMMIT and path.parent.name == "snapshots"
    assert {p.name: p.read_bytes() for p in path.iterdir()} == FILES
    assert registry.resolve(f"hf://{REPO}@{COMMIT}", sha256=PINS) == hub_snapshot
    registry.register("Test/HubPong-v1", f"hf://{REPO}@{COMMIT}", game="Pong", sha256=PINS)
    assert registry.resolve(registry.get("Test/HubPong-v1")) == hub_snapshot
    snap = add_to_hub_cache(tmp_path / "elsewhere", REPO, OTHER_COMMIT, FILES)  # an explicit cache_dir
    assert registry.resolve(f"hf://{REPO}@{OTHER_COMMIT}", cache_dir=tmp_path / "elsewhere", sha256=PINS) == snap


def test_hf_flipped_byte_in_blob_raises_integrity_error(hub_snapshot):
    blob = (hub_snapshot / "autoencoder.safetensors").resolve()
    data = bytearray(blob.read_bytes())
    data[0] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(registry.IntegrityError, match="autoencoder.safetensors") as ei:
        registry.resolve(f"hf://{REPO}@{COMMIT}", sha256=PINS)
    assert ei.value.actual == sha(data) and ei.value.expected == PINS["autoencoder.safetensors"]


@pytest.mark.parametrize("suffix, shown", [("", "no '@<revision>'"), ("@main", "'main'"), ("@v1.0", "'v1.0'"),
                                           ("@" + COMMIT[:7], repr(COMMIT[:7]))])
def test_hf_unpinned_revision_refused(offline_hub, suffix, shown):
    with pytest.raises(ValueError) as ei:
        registry.resolve(f"hf://{REPO}{suffix}")
    msg = str(ei.value)
    assert "revision" in msg and "40-hex commit" in msg and shown in msg and "allow_unpinned" in msg


@pytest.mark.parametrize("suffix", ["", "@main"])
def test_hf_unpinned_allowed_resolves_through_refs_offline(hub_snapshot, suffix):
    assert registry.resolve(f"hf://{REPO}{suffix}", allow_unpinned=True, sha256=PINS) == hub_snapshot


def test_hf_unknown_branch_or_uncached_commit_not_found(hub_snapshot):
    with pytest.raises(FileNotFoundError, match=REPO):
        registry.resolve(f"hf://{REPO}@dev", allow_unpinned=True)
    with pytest.raises(FileNotFoundError, match=OTHER_COMMIT):
        registry.resolve(f"hf://{REPO}@{OTHER_COMMIT}")
    with pytest.raises(FileNotFoundError, match="ditwm-test/absent"):
        registry.resolve(f"hf://ditwm-test/absent@{COMMIT}")


def test_hf_missing_snapshot_file_is_caught(hub_snapshot):
    (hub_snapshot / "heads.safetensors").unlink()
    # With the cached tree listing huggingface_hub itself notices; without it, the pins do.
    with pytest.raises(FileNotFoundError, match="heads.safetensors"):
        registry.resolve(f"hf://{REPO}@{COMMIT}", sha256=PINS)


def test_hf_subfolder_source(offline_hub):
    files = {**{f"pong/{k}": v for k, v in FILES.items()}, "other/x.bin": b"other"}
    snap = add_to_hub_cache(offline_hub, REPO, COMMIT, files)
    assert registry.resolve(f"hf://{REPO}/pong@{COMMIT}", sha256=PINS) == snap / "pong"
    with pytest.raises(FileNotFoundError, match="subfolder"):
        registry.resolve(f"hf://{REPO}/absent@{COMMIT}")


# ------------------------------------------------------------------------------------------------ push
class FakeApi:
    """Stands in for huggingface_hub.HfApi: records (method, args, kwargs), upload_folder returns a commit."""

    def __init__(self, oid: str = COMMIT) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []
        self.oid = oid

    def __getattr__(self, name):  # create_repo, create_branch, upload_folder
        def call(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return SimpleNamespace(oid=self.oid) if name == "upload_folder" else None
        return call


def test_push_builds_the_right_calls(tmp_path):
    d = write_bundle(tmp_path / "bundle")
    api = FakeApi()
    commit, line = registry.push(d, "my-org/ditwm-pong", private=True, token="tok", api=api)
    assert commit == COMMIT
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"]
    _, args, kw = api.calls[0]
    assert args == ("my-org/ditwm-pong",) and kw["exist_ok"] is True and kw["private"] is True
    assert kw["token"] == "tok" and kw["repo_type"] == "model"
    _, _, kw = api.calls[1]
    assert kw["repo_id"] == "my-org/ditwm-pong" and Path(kw["folder_path"]) == d and kw["revision"] == "main"
    assert kw["repo_type"] == "model" and kw["commit_message"]
    assert f'"hf://my-org/ditwm-pong@{COMMIT}"' in line
    assert json.loads(line.split("sha256=", 1)[1].rstrip(")")) == PINS
    api = FakeApi()  # committing to another branch creates it first
    registry.push(d, "org/name", revision="exp", api=api)
    assert [c[0] for c in api.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert api.calls[1][2]["branch"] == "exp" and api.calls[2][2]["revision"] == "exp"


def test_push_rejects_bad_input_before_any_call(tmp_path):
    api = FakeApi()
    with pytest.raises(FileNotFoundError, match="checkpoint_dir"):
        registry.push(tmp_path / "nope", "org/name", api=api)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        registry.push(tmp_path / "empty", "org/name", api=api)
    with pytest.raises(ValueError, match="repo_id"):
        registry.push(write_bundle(tmp_path / "b"), "not-a-repo", api=api)
    assert api.calls == []
    with pytest.raises(ValueError, match="oid"):
        registry.push(tmp_path / "b", "org/name", api=FakeApi(oid="abc"))


@pytest.mark.parametrize("argv, flag", [
    (["--checkpoint", "{tmp}/missing", "--repo", "org/name"], "--checkpoint"),
    (["--checkpoint", "{tmp}/empty", "--repo", "org/name"], "--checkpoint"),
    (["--checkpoint", "{tmp}/bundle", "--repo", "justname"], "--repo"),
    (["--checkpoint", "{tmp}/bundle", "--repo", "a/b/c"], "--repo"),
    (["--checkpoint", "{tmp}/bundle", "--repo", "org/name", "--revision", COMMIT], "--revision"),
])
def test_push_cli_bad_args_exit_2(tmp_path, capsys, argv, flag):
    from trainers.push import cli

    (tmp_path / "empty").mkdir()
    write_bundle(tmp_path / "bundle")
    assert cli([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"ditwm push: error: {flag}: expected")


def test_push_cli_main_with_fake_api(tmp_path, capsys):
    from trainers.push import Args, main

    d = write_bundle(tmp_path / "bundle")
    api = FakeApi()
    assert main(Args(checkpoint=str(d), repo="org/name", private=True), api=api) == 0
    out = capsys.readouterr().out
    assert COMMIT in out and f"hf://org/name@{COMMIT}" in out and PINS["dynamics.safetensors"] in out
    assert api.calls[0][2]["private"] is True and api.calls[1][2]["token"] is None
