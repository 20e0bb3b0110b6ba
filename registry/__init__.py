"""Catalog of DiT-WM world-model checkpoints and where to get them (bundled, Hugging Face Hub, local directory).

>>> import registry
>>> registry.get("DiTWM/Pong-v0").source
'bundled:pong-v0'

``registry`` only resolves a source to a verified local directory of files; ``dit_envs`` parses the bundle.
Imports are one-way: registry <- dit_envs <- trainers.
"""
from .catalog import (CatalogEntry, add_listener, bundled_pins, bundled_root, check_env_id, check_source, entries,
                      get, pin_bundled, register, resolve, unregister)
from .hub import (HubSource, IntegrityError, download, parse_hf_source, push, sha256_dir, sha256_file,
                  verify_sha256)

__all__ = [
    "CatalogEntry", "HubSource", "IntegrityError", "add_listener", "bundled_pins", "bundled_root", "check_env_id", "check_source",
    "download", "entries", "get", "parse_hf_source", "pin_bundled", "push", "register", "resolve", "sha256_dir", "sha256_file",
    "unregister", "verify_sha256",
]
