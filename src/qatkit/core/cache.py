"""qatkit's cache (~/.cache/qatkit or $QATKIT_CACHE): keys, locks, and what every key depends on."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

from qatkit.core.env import package_versions


def cache_root() -> Path:
    return Path(os.environ.get("QATKIT_CACHE", Path.home() / ".cache" / "qatkit"))


def cache_key(parts: object, length: int = 20) -> str:
    """A short stable hash of JSON-serializable `parts` (dict keys sorted)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:length]


def cache_lock(entry: Path):
    """Held while a cache entry is checked and computed: a concurrent run on this machine waits, then reuses it."""
    from filelock import FileLock

    entry.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(f"{entry}.lock")


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def source_digest(root: Path) -> str:
    """Hash of the Python sources under `root` (their paths and contents)."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:20]


@functools.cache
def code_fingerprint() -> dict:
    """What cached results depend on beyond their settings: qatkit's own code and the libraries' versions.

    Part of every cache key, so a result computed by other code (an edit, an upgrade) is computed again
    instead of reused: a stale baseline would silently shift every figure compared against it. Computed once
    per process (every cache key of a run uses it).
    """
    import qatkit

    return {"qatkit_source": source_digest(Path(qatkit.__file__).parent), **package_versions()}
