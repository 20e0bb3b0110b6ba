"""The catalog: env ids (``DiTWM/<Game>-v<k>``) -> checkpoint sources, and :func:`resolve` of a source to files.

A source is one of

* ``bundled:<name>`` — package data shipped in ``registry/bundled/<name>/``;
* ``hf://org/repo[/subfolder]@<40-hex commit>`` — a Hugging Face Hub model repo, pinned to a commit, fetched into
  the Hub cache;
* a local directory (``str`` or ``Path``; ``~`` is expanded).

:func:`resolve` returns a local directory and checks the sha256 pins before anything reads the files. It never
parses a bundle (that is ``dit_envs``' job).
"""
from __future__ import annotations

import importlib.resources
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from . import hub

BUNDLED_PREFIX = "bundled:"
ENV_ID_RE = re.compile(r"(?P<namespace>[A-Za-z0-9_]+)/(?P<name>[A-Za-z0-9_.-]+?)-v(?P<version>\d+)")
_BUNDLED_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass(frozen=True)
class CatalogEntry:
    """One registered world-model environment.

    Attributes:
        env_id: ``"Namespace/Name-v<int>"``, e.g. ``"DiTWM/Pong-v0"``.
        game: the real game the model imitates, e.g. ``"Pong"``.
        source: ``bundled:<name>``, ``hf://org/repo[/subfolder]@<commit>`` or a local directory path.
        sha256: pins ``{filename relative to the resolved directory: hex sha256}`` checked on every resolve, or
            ``None``.
        max_episode_steps: imagination horizon (truncation) for the env.
        description: one line for listings.
    """

    env_id: str
    game: str
    source: str
    sha256: dict[str, str] | None = None
    max_episode_steps: int = 1000
    description: str = ""


_CATALOG: dict[str, CatalogEntry] = {}
_LISTENERS: list[tuple[Callable[[CatalogEntry], None] | None, Callable[[str], None] | None]] = []


def add_listener(*, on_register: Callable[[CatalogEntry], None] | None = None,
                 on_unregister: Callable[[str], None] | None = None) -> Callable[[], None]:
    """Call ``on_register(entry)`` after every :func:`register` and ``on_unregister(env_id)`` after every
    :func:`unregister` from now on (existing entries are not replayed). ``dit_envs`` uses this to keep
    Gymnasium's registry in step with the catalog.

    Returns:
        A function that removes this listener.
    """
    pair = (on_register, on_unregister)
    _LISTENERS.append(pair)
    return lambda: _LISTENERS.remove(pair) if pair in _LISTENERS else None


def check_env_id(env_id: str) -> str:
    """Check ``env_id`` has the form ``Namespace/Name-v<int>`` and return it.

    Raises:
        ValueError: it does not (names ``env_id`` and the value).
    """
    if not isinstance(env_id, str) or not ENV_ID_RE.fullmatch(env_id):
        raise ValueError(f"env_id: expected 'Namespace/Name-v<int>' (e.g. 'DiTWM/Pong-v0'), got {env_id!r}")
    return env_id


def check_source(source: str | os.PathLike) -> str:
    """Check the syntax of a source (nothing is fetched or opened) and return it as a string.

    Raises:
        ValueError: an empty string, a malformed ``bundled:``/``hf://`` source, or an unknown ``scheme://``.
        TypeError: not a ``str`` or ``os.PathLike``.
    """
    if isinstance(source, os.PathLike):
        return os.fspath(source)
    if not isinstance(source, str):
        raise TypeError(f"source: expected str or os.PathLike, got {type(source).__name__}")
    if not source.strip():
        raise ValueError("source: expected 'bundled:<name>', 'hf://org/name@<commit>' or a directory, got ''")
    if source.startswith(BUNDLED_PREFIX):
        name = source[len(BUNDLED_PREFIX):]
        if not _BUNDLED_NAME_RE.fullmatch(name):
            raise ValueError(f"source: expected 'bundled:<name>' with a plain directory name, got {source!r}")
    elif source.startswith("hf:"):
        hub.parse_hf_source(source)
    elif _SCHEME_RE.match(source):
        raise ValueError(f"source: expected 'bundled:<name>', 'hf://...' or a local directory, got unknown "
                         f"scheme in {source!r}")
    return source


def register(env_id: str, source: str | os.PathLike, *, game: str, sha256: Mapping[str, str] | None = None,
             max_episode_steps: int = 1000, description: str = "", overwrite: bool = False) -> CatalogEntry:
    """Add an env id -> checkpoint source mapping to the catalog.

    Only syntax is checked here; the source is fetched and verified by :func:`resolve`, and the Hub pin rule
    (a 40-hex commit) is enforced there too.

    Args:
        env_id: ``"Namespace/Name-v<int>"``.
        source: ``bundled:<name>``, ``hf://org/repo[/subfolder]@<commit>`` or a local directory.
        game: game name, e.g. ``"Pong"``.
        sha256: optional pins ``{filename: hex}`` (see :func:`registry.sha256_dir`).
        max_episode_steps: positive episode length limit.
        description: one line for listings.
        overwrite: replace an existing entry with the same id.

    Listeners added with :func:`add_listener` are called with the new entry.

    Returns:
        The new :class:`CatalogEntry`.

    Raises:
        ValueError: malformed ``env_id``/``source``/``game``/``sha256``/``max_episode_steps``, or ``env_id``
            already registered and not ``overwrite``.
    """
    check_env_id(env_id)
    src = check_source(source)
    if not isinstance(game, str) or not game.strip():
        raise ValueError(f"game: expected a non-empty game name, got {game!r}")
    if isinstance(max_episode_steps, bool) or not isinstance(max_episode_steps, int) or max_episode_steps < 1:
        raise ValueError(f"max_episode_steps: expected a positive int, got {max_episode_steps!r}")
    pins = hub.check_pins(sha256)
    if env_id in _CATALOG and not overwrite:
        raise ValueError(f"env_id: {env_id!r} is already registered (source {_CATALOG[env_id].source!r}); "
                         f"pass overwrite=True to replace it")
    entry = CatalogEntry(env_id, game, src, pins, max_episode_steps, description)
    _CATALOG[env_id] = entry
    for on_register, _ in list(_LISTENERS):
        if on_register is not None:
            on_register(entry)
    return entry


def unregister(env_id: str) -> CatalogEntry:
    """Remove ``env_id`` from the catalog (listeners are told) and return its entry.

    Raises:
        KeyError: ``env_id`` is not registered (lists the known ids).
    """
    entry = get(env_id)
    del _CATALOG[env_id]
    for _, on_unregister in list(_LISTENERS):
        if on_unregister is not None:
            on_unregister(env_id)
    return entry


def get(env_id: str) -> CatalogEntry:
    """Return the catalog entry of ``env_id``.

    Raises:
        KeyError: unknown id; the message lists the registered ids.
    """
    try:
        return _CATALOG[env_id]
    except (KeyError, TypeError):
        known = ", ".join(sorted(_CATALOG)) or "none"
        raise KeyError(f"env_id: expected a registered id ({known}), got {env_id!r}") from None


def entries() -> list[CatalogEntry]:
    """All registered entries, sorted by env id."""
    return [_CATALOG[k] for k in sorted(_CATALOG)]


def bundled_root() -> Path:
    """The directory holding bundled checkpoints, ``<registry package>/bundled``."""
    root = importlib.resources.files(__package__) / "bundled"
    return root if isinstance(root, Path) else Path(__file__).resolve().parent / "bundled"


PINS_FILE = "pins.json"
"""``registry/bundled/pins.json``: ``{bundle name: {file: sha256}}`` for every bundled checkpoint."""


def bundled_pins(name: str) -> dict[str, str] | None:
    """The sha256 pins of bundled checkpoint ``name`` from ``pins.json`` (None when it has none).

    Raises:
        ValueError: ``pins.json`` is not a JSON object of ``{name: {file: 64-hex}}``.
    """
    path = bundled_root() / PINS_FILE
    if not path.is_file():
        return None
    try:
        pins = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: expected JSON, got {e}") from None
    if not isinstance(pins, dict):
        raise ValueError(f"{path}: expected an object {{name: {{file: sha256}}}}, got {type(pins).__name__}")
    return hub.check_pins(pins.get(name), field=f"{PINS_FILE}[{name!r}]")


def pin_bundled(name: str) -> dict[str, str]:
    """Compute the pins of ``registry/bundled/<name>/`` and write them into ``pins.json`` (atomically; other
    bundles' pins are kept) — the release step after copying a bundle there. Returns the new pins.

    The catalog reads the pins when ``registry`` is imported: a running process keeps the old ones (re-register
    the id or restart). Every file is pinned, the model card too: edit a bundled file, then pin again.

    Raises:
        FileNotFoundError: no such bundled directory.
        ValueError: an existing ``pins.json`` that is not a JSON object.
    """
    root = bundled_root()
    if not (root / name).is_dir():
        raise FileNotFoundError(f"name: expected a directory {root / name}, found none")
    path = root / PINS_FILE
    pins = json.loads(path.read_text()) if path.is_file() else {}
    if not isinstance(pins, dict):
        raise ValueError(f"{path}: expected an object {{name: {{file: sha256}}}}, got {type(pins).__name__}")
    pins[name] = hub.sha256_dir(root / name)
    tmp = path.with_name(f".{PINS_FILE}.tmp")
    tmp.write_text(json.dumps(pins, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return pins[name]


def _resolve_bundled(name: str, env_id: str | None) -> Path:
    path = bundled_root() / name
    if path.is_dir():
        return path
    eid = env_id or "<env id>"
    raise FileNotFoundError(
        f"source: no bundled checkpoint {name!r} ships with this version of dit-wm yet (looked for {path}). "
        f"Pass a checkpoint explicitly: gym.make({eid!r}, checkpoint='path/to/bundle_dir') or "
        f"checkpoint='hf://org/name@<40-hex commit>'."
    )


def _resolve_local(source: str) -> Path:
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"source: expected an existing checkpoint directory, got missing path {str(path)!r}")
    if not path.is_dir():
        raise NotADirectoryError(f"source: expected a checkpoint directory, got a file {str(path)!r}")
    return path.resolve()


def resolve(source_or_entry: str | os.PathLike | CatalogEntry, *, allow_unpinned: bool = False,
            sha256: Mapping[str, str] | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """Turn a source (or a catalog entry) into a local directory of bundle files, verified against its pins.

    Every pin — the entry's ``sha256`` and the caller's ``sha256`` (both apply when both are given) — is checked
    before this returns, so nothing parses an unverified file.

    Args:
        source_or_entry: a :class:`CatalogEntry` (from :func:`get`) or a source string/path.
        allow_unpinned: accept an ``hf://`` source whose revision is a branch/tag or missing.
        sha256: extra pins ``{filename: hex}``.
        cache_dir: Hugging Face cache for ``hf://`` sources; default ``HF_HUB_CACHE``.

    Returns:
        An existing directory (for ``hf://``, the snapshot directory inside the Hub cache — do not write to it).

    Raises:
        ValueError: bad source syntax; an unpinned ``hf://`` source without ``allow_unpinned`` (names
            ``revision``); malformed pins.
        FileNotFoundError: missing local directory, no such bundled checkpoint, a Hub source not available
            (offline and not cached), or a pinned file missing.
        IntegrityError: a pinned file's sha256 differs.
    """
    entry = source_or_entry if isinstance(source_or_entry, CatalogEntry) else None
    source = check_source(entry.source if entry else source_or_entry)
    extra = hub.check_pins(sha256)
    if source.startswith(BUNDLED_PREFIX):
        path = _resolve_bundled(source[len(BUNDLED_PREFIX):], entry.env_id if entry else None)
    elif source.startswith(hub.HF_PREFIX):
        path = hub.download(source, allow_unpinned=allow_unpinned, cache_dir=cache_dir)
    else:
        path = _resolve_local(source)
    if entry is not None:
        hub.verify_sha256(path, entry.sha256)
    hub.verify_sha256(path, extra)
    return path


register(
    "DiTWM/Pong-v0", "bundled:pong-v0", game="Pong", max_episode_steps=1000, sha256=bundled_pins("pong-v0"),
    description="Pong world model: DiT dynamics in a frozen autoencoder's latent space.",
)
