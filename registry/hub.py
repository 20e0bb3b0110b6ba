"""Hugging Face Hub sources (``hf://org/repo[/subfolder]@<commit>``), sha256 pins, download and upload.

Downloads go through the real :func:`huggingface_hub.snapshot_download`, so they land in (and are served from)
the Hub's own cache (``HF_HUB_CACHE``, default ``~/.cache/huggingface/hub``) and honour ``HF_HUB_OFFLINE=1``.
``huggingface_hub`` is imported inside the functions that need it, so ``import registry`` stays cheap.

This module only moves and verifies files; parsing a bundle is ``dit_envs``' job.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

HF_PREFIX = "hf://"
COMMIT_RE = re.compile(r"[0-9a-f]{40}")  # the form huggingface_hub itself treats as an immutable commit
SHA256_RE = re.compile(r"[0-9a-f]{64}")
# Hub ids: a namespace and a name of letters, digits, '-', '_', '.', not starting/ending with '-' or '.'.
_REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
REPO_ID_RE = re.compile(rf"{_REPO_PART}/{_REPO_PART}")
DEFAULT_COMMIT_MESSAGE = "Upload DiT-WM checkpoint bundle"


class IntegrityError(ValueError):
    """A pinned file's sha256 differs from its pin. ``filename``, ``expected`` and ``actual`` name the mismatch."""

    def __init__(self, filename: str, expected: str, actual: str, directory: str | os.PathLike = "") -> None:
        where = f" in {directory}" if directory else ""
        super().__init__(
            f"sha256 of {filename!r}{where}: expected {expected}, got {actual}. The file is corrupted or was "
            f"changed, or the pin is wrong; for a Hub source remove the cached revision "
            f"(`hf cache rm <commit>`) and resolve again."
        )
        self.filename, self.expected, self.actual = filename, expected, actual


# ---------------------------------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class HubSource:
    """A parsed ``hf://`` source.

    Attributes:
        repo_id: ``"org/name"`` of a Hub model repo.
        subfolder: path inside the repo holding the bundle, ``""`` for the repo root.
        revision: the text after ``@`` (a commit sha when pinned), ``None`` when absent.
    """

    repo_id: str
    subfolder: str = ""
    revision: str | None = None

    @property
    def pinned(self) -> bool:
        """True when ``revision`` is a full 40-hex commit sha (immutable)."""
        return self.revision is not None and COMMIT_RE.fullmatch(self.revision) is not None

    def __str__(self) -> str:
        sub = f"/{self.subfolder}" if self.subfolder else ""
        rev = f"@{self.revision}" if self.revision is not None else ""
        return f"{HF_PREFIX}{self.repo_id}{sub}{rev}"


def check_repo_id(repo_id: str, field: str = "repo_id") -> str:
    """Check ``repo_id`` is a Hub repo id ``"org/name"`` and return it.

    Raises:
        ValueError: not a string of the form ``org/name`` (message names ``field``).
    """
    if not isinstance(repo_id, str) or not REPO_ID_RE.fullmatch(repo_id) or ".." in repo_id or "--" in repo_id:
        raise ValueError(f"{field}: expected a Hub repo id 'org/name' (letters, digits, '-', '_', '.'), "
                         f"got {repo_id!r}")
    return repo_id


def parse_hf_source(source: str) -> HubSource:
    """Parse ``hf://org/repo[/subfolder][@revision]`` into a :class:`HubSource` (syntax only, no pin rule).

    Raises:
        ValueError: not an ``hf://`` string, a bad repo id, an empty ``@`` revision or a bad subfolder.
    """
    if not isinstance(source, str) or not source.startswith(HF_PREFIX):
        raise ValueError(f"source: expected 'hf://org/name[/subfolder]@<commit>', got {source!r}")
    path, at, revision = source[len(HF_PREFIX):].partition("@")  # repo ids and folders never contain '@'
    if at and not revision.strip():
        raise ValueError(f"source: revision: expected text after '@' (a 40-hex commit), got an empty one "
                         f"in {source!r}")
    parts = path.rstrip("/").split("/")
    if len(parts) < 2:
        raise ValueError(f"source: expected 'hf://org/name[/subfolder]@<commit>', got {source!r}")
    repo_id = check_repo_id("/".join(parts[:2]), field="source")
    sub = parts[2:]
    if any(p in ("", ".", "..") for p in sub):
        raise ValueError(f"source: subfolder: expected a plain relative path, got {'/'.join(sub)!r} in {source!r}")
    return HubSource(repo_id, "/".join(sub), revision if at else None)


def require_pinned(src: HubSource, allow_unpinned: bool = False) -> None:
    """Refuse a Hub source whose revision is not a 40-hex commit, unless ``allow_unpinned``.

    Raises:
        ValueError: the revision is a branch/tag or missing and ``allow_unpinned`` is False.
    """
    if src.pinned or allow_unpinned:
        return
    got = repr(src.revision) if src.revision is not None else "none (no '@<revision>', i.e. the 'main' branch)"
    raise ValueError(
        f"{src}: revision: expected a 40-hex commit sha (hf://{src.repo_id}@<commit>), got {got}. A branch or tag "
        f"can move to different weights; pin the commit, or pass allow_unpinned=True to accept that."
    )


# ---------------------------------------------------------------------------------------------------- integrity
def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of one file, read in ``chunk_size`` chunks (symlinks are followed)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def sha256_dir(path: str | os.PathLike) -> dict[str, str]:
    """sha256 pins for every file under a directory, for ``register(..., sha256=...)``.

    Keys are POSIX paths relative to ``path`` (``"config.json"``, ``"sub/x.safetensors"``), sorted. Hidden files
    and directories (``.git``, ``.cache``, ``.gitattributes``) are skipped. Symlinks to files (as in a Hub
    snapshot) are followed.

    Raises:
        NotADirectoryError: ``path`` is not a directory.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise NotADirectoryError(f"path: expected a directory, got {str(root)!r}")
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            full = Path(dirpath) / name
            if name.startswith(".") or not full.is_file():
                continue
            out[full.relative_to(root).as_posix()] = sha256_file(full)
    return dict(sorted(out.items()))


def check_pins(pins: Mapping[str, str] | None, field: str = "sha256") -> dict[str, str] | None:
    """Validate sha256 pins (relative POSIX filename -> 64-hex digest); return a lower-cased copy or None.

    Raises:
        ValueError: not a mapping, a filename that is absolute, empty or contains ``..``, or a bad digest.
    """
    if pins is None:
        return None
    if not isinstance(pins, Mapping):
        raise ValueError(f"{field}: expected a dict of filename -> sha256 hex, got {type(pins).__name__}")
    out = {}
    for name, digest in pins.items():
        if (not isinstance(name, str) or name.startswith("/") or "\\" in name
                or any(p in ("", ".", "..") for p in name.split("/"))):
            raise ValueError(f"{field}: expected relative POSIX filenames, got {name!r}")
        if not isinstance(digest, str) or not SHA256_RE.fullmatch(digest.lower()):
            raise ValueError(f"{field}[{name!r}]: expected a 64-character hex sha256, got {digest!r}")
        out[name] = digest.lower()
    return out


def verify_sha256(directory: str | os.PathLike, pins: Mapping[str, str] | None) -> None:
    """Check every pinned file under ``directory`` against its sha256 pin (files not pinned are not checked).

    Raises:
        FileNotFoundError: a pinned file is missing (names it).
        IntegrityError: a pinned file's digest differs (names the file, expected and actual digest).
        ValueError: malformed pins.
    """
    pins = check_pins(pins)
    if not pins:
        return
    directory = Path(directory)
    for name, expected in sorted(pins.items()):
        path = directory / name
        if not path.is_file():
            raise FileNotFoundError(f"sha256 pin: expected pinned file {name!r} in {directory}, but it is missing")
        actual = sha256_file(path)
        if actual != expected:
            raise IntegrityError(name, expected, actual, directory)


# ---------------------------------------------------------------------------------------------------- download
def download(source: str | HubSource, *, allow_unpinned: bool = False,
             cache_dir: str | os.PathLike | None = None, token: str | bool | None = None) -> Path:
    """Fetch a Hub bundle with :func:`huggingface_hub.snapshot_download` and return its local directory.

    Files are stored in the Hub cache (``cache_dir`` or ``HF_HUB_CACHE``); a pinned commit already cached is
    served without any network call, and with ``HF_HUB_OFFLINE=1`` only the cache is used (a branch then
    resolves through the cache's ``refs/<branch>``). For a ``subfolder`` source only that folder is fetched.

    Args:
        source: ``hf://org/repo[/subfolder]@<commit>`` or a parsed :class:`HubSource`.
        allow_unpinned: accept a branch/tag or missing revision.
        cache_dir: Hub cache directory; default ``huggingface_hub``'s (``HF_HUB_CACHE``).
        token: Hub token for private repos; default the environment's/login's.

    Returns:
        The snapshot directory (or its subfolder): ``<cache>/models--org--repo/snapshots/<commit>[/subfolder]``.

    Raises:
        ValueError: bad syntax, or unpinned without ``allow_unpinned``.
        FileNotFoundError: not cached while offline / unreachable, or the subfolder is absent from the snapshot.
    """
    src = parse_hf_source(source) if isinstance(source, str) else source
    require_pinned(src, allow_unpinned)
    from huggingface_hub import constants as hf_constants, snapshot_download  # deferred: cheap `import registry`

    try:
        from huggingface_hub.errors import IncompleteSnapshotError as incomplete  # huggingface_hub >= 2
    except ImportError:
        incomplete = ()
    kw = dict(repo_type="model", revision=src.revision, cache_dir=cache_dir, token=token,
              allow_patterns=[f"{src.subfolder}/*"] if src.subfolder else None)
    try:
        snap = snapshot_download(src.repo_id, **kw)
    except FileNotFoundError as e:  # huggingface_hub's LocalEntryNotFoundError and subclasses
        detail: Exception = e
        try:  # a cache-only look names the missing files when the commit's tree listing is cached
            snapshot_download(src.repo_id, local_files_only=True, **kw)
        except FileNotFoundError as e2:
            detail = e2 if isinstance(e2, incomplete) else e
        raise FileNotFoundError(
            f"{src}: expected it in the Hugging Face cache or on the Hub, but it could not be fetched "
            f"(offline mode: {hf_constants.HF_HUB_OFFLINE}): {detail}"
        ) from e
    out = Path(snap) / src.subfolder if src.subfolder else Path(snap)
    if not out.is_dir():
        raise FileNotFoundError(f"{src}: subfolder: expected {src.subfolder!r} in the snapshot {snap}, "
                                f"but it is not there")
    return out


# ---------------------------------------------------------------------------------------------------- upload
def check_bundle_dir(checkpoint_dir: str | os.PathLike, field: str = "checkpoint_dir") -> Path:
    """Check ``checkpoint_dir`` is a directory holding ``config.json``; return it (``~`` expanded).

    Raises:
        FileNotFoundError: the directory or its ``config.json`` is missing (message names ``field``).
        NotADirectoryError: the path is a file.
    """
    p = Path(checkpoint_dir).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{field}: expected an existing bundle directory, got missing path {str(p)!r}")
    if not p.is_dir():
        raise NotADirectoryError(f"{field}: expected a bundle directory, got a file {str(p)!r}")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{field}: expected a bundle directory containing config.json, "
                                f"got {str(p)!r} without it")
    return p


def catalog_line(repo_id: str, commit_sha: str, pins: Mapping[str, str]) -> str:
    """One printable, copy-pasteable ``register(...)`` line for a pushed bundle (fill in the id and game)."""
    source = f"{HF_PREFIX}{repo_id}@{commit_sha}"
    return (f'register("DiTWM/<Game>-v<k>", "{source}", game="<Game>", '
            f"sha256={json.dumps(dict(sorted(pins.items())))})")


def push(checkpoint_dir: str | os.PathLike, repo_id: str, *, token: str | None = None, private: bool = False,
         revision: str = "main", commit_message: str = DEFAULT_COMMIT_MESSAGE, api: Any = None
         ) -> tuple[str, str]:
    """Upload a bundle directory to a Hub model repo and return its commit sha and a pinned catalog line.

    Calls ``api.create_repo(repo_id, exist_ok=True, ...)``, ``api.create_branch`` when ``revision`` is not
    ``"main"``, then ``api.upload_folder(...)`` (hidden files are not uploaded). The sha256 pins are computed
    from the local files before the upload.

    Args:
        checkpoint_dir: bundle directory (must contain ``config.json``).
        repo_id: ``"org/name"``; created if missing.
        token: Hub token; default ``HF_TOKEN`` or the ``hf auth login`` token.
        private: create the repo as private (no effect on an existing repo).
        revision: branch to commit to.
        commit_message: the commit's message.
        api: an object with ``HfApi``'s ``create_repo``/``create_branch``/``upload_folder``; default
            ``huggingface_hub.HfApi(token=token)`` (tests pass a fake).

    Returns:
        ``(commit_sha, line)``: the 40-hex commit and a ``register("DiTWM/<Game>-v<k>", "hf://repo@sha",
        game=..., sha256={...})`` line to paste into the catalog.

    Raises:
        FileNotFoundError / NotADirectoryError: bad ``checkpoint_dir`` (before any network call).
        ValueError: bad ``repo_id``, bad ``revision``, or the Hub returned no commit sha.
    """
    folder = check_bundle_dir(checkpoint_dir)
    check_repo_id(repo_id)
    if not isinstance(revision, str) or not revision.strip() or COMMIT_RE.fullmatch(revision):
        raise ValueError(f"revision: expected a branch name to commit to, got {revision!r}")
    pins = sha256_dir(folder)
    if api is None:
        from huggingface_hub import HfApi  # deferred: keeps `import registry` cheap

        api = HfApi(token=token)
    api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
    if revision != "main":
        api.create_branch(repo_id, branch=revision, token=token, repo_type="model", exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), path_in_repo=None, commit_message=commit_message,
        token=token, repo_type="model", revision=revision, ignore_patterns=[".*", "*/.*"],
    )
    sha = getattr(info, "oid", None)
    if not isinstance(sha, str) or not COMMIT_RE.fullmatch(sha):
        raise ValueError(f"upload_folder: expected a commit with a 40-hex oid, got {sha!r}")
    return sha, catalog_line(repo_id, sha, pins)
