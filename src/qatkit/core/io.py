"""Files that are either complete or absent: atomic JSON writes, directories published with a DONE marker, JSONL."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qatkit.core.errors import RecipeError

DONE = "DONE"  # written into a directory before it is renamed into place: present means complete


def is_done(path: Path) -> bool:
    return (path / DONE).exists()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(path)


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; once written it is flushed to disk and renamed over `path`.
    A process killed while writing leaves `path` as it was."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, data: object, indent: int | None = 2) -> None:
    """Write JSON to `path` whole or not at all (see `atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=indent, default=str) + "\n")


def read_json(path: Path) -> dict | list | None:
    """The file's JSON, or None when it does not exist."""
    return json.loads(path.read_text()) if path.exists() else None


def publish_dir(tmp: Path, target: Path, *, durable: bool = False) -> None:
    """Mark the finished directory `tmp` DONE and rename it to `target` (replacing an older one).

    `durable` flushes every file to disk first, so a power loss cannot leave a DONE directory with empty files.
    """
    if durable:
        fsync_tree(tmp)
    (tmp / DONE).touch()
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    if durable:
        fsync_dir(target.parent)


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary directory to fill; on success it becomes `target` with DONE inside (see `publish_dir`).
    On failure the temporary directory is removed and `target` is untouched."""
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_dir(tmp, target)


def numbered_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, value) for each non-blank line; a malformed line is a RecipeError naming the file and line."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    raise RecipeError(f"{path}:{n}: malformed JSON line ({e.msg})") from None


def read_jsonl(path: Path) -> list[dict]:
    return [row for _, row in numbered_jsonl(path)]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
