"""A run directory as files small enough to commit (`qatkit pack` / `qatkit unpack`), so that a run longer than one
machine's lease continues on a fresh machine from committed state with `--resume`.

Kept: every file of the run directory, finished stages and the unfinished one's work dir alike, except trainer
checkpoints older than the newest complete one (`--resume` continues from that one) and, once the fine-tune is
finished, the converted checkpoint unless asked to keep it (`--resume` converts the packed fine-tune again, in
seconds, to the same tensors; an unfinished eval then scores the new conversion again, its baselines kept). A file
whose bytes an earlier file already holds is stored once. The bytes are cut into parts of at most `part_bytes` (git
hosts refuse large files); `state.json` lists each file with its size and sha256, checked when unpacked.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path

from qatkit.core.cache import file_digest
from qatkit.core.errors import RecipeError
from qatkit.core.io import is_done, read_json, write_json_atomic
from qatkit.run.layout import LEARNED_SCALES, RunLayout, last_checkpoint

MANIFEST = "state.json"
PART = "part-{:03d}.bin"
PART_BYTES = 45 * 2**20


def _stale_checkpoints(run: Path) -> set[Path]:
    """Checkpoints that --resume would not continue from: all but the newest complete one of each folder."""
    stale = set()
    for ckpts in run.rglob("checkpoints"):
        found = [c for c in ckpts.glob("checkpoint-*") if c.is_dir()]
        needs = (LEARNED_SCALES,) if any((c / LEARNED_SCALES).exists() for c in found) else ()
        newest = last_checkpoint(ckpts, needs)
        stale |= {c for c in found if c != newest}
    return stale


def _run_layouts(run: Path) -> list[RunLayout]:
    """The run directories in `run`: itself, or each scheme's of a `bench recovery --out` folder."""
    candidates = [run, *run.iterdir()] if run.is_dir() else []
    return [RunLayout(d) for d in candidates if (d / "manifest.json").is_file()]


def _rebuilt_conversions(runs: list[RunLayout]) -> set[Path]:
    """Convert stages (finished or not) beside a finished fine-tune: `--resume` rebuilds them from it."""
    return {
        converted
        for layout in runs
        if is_done(layout.stage("finetune"))
        for converted in (layout.stage("convert"), layout.partial("convert"))
        if converted.is_dir()
    }


def _kept_files(run: Path, left_out: set[Path]) -> list[Path]:
    return sorted(
        p for p in run.rglob("*") if p.is_file() and not any(c in p.parents for c in left_out) and p.suffix != ".lock"
    )


def pack(run: Path, dest: Path, part_bytes: int = PART_BYTES, keep_converted: bool = False) -> dict:
    """Write `run`'s state into the empty or missing folder `dest`; returns the manifest, whose `left_out` lists
    the converted checkpoints left for `--resume` to rebuild."""
    runs = _run_layouts(run)
    if not runs:
        raise RecipeError(f"{run} is not a qatkit run directory (no manifest.json in it or its sub-folders)")
    if dest.exists() and any(dest.iterdir()):
        raise RecipeError(f"{dest} is not empty: pack into a new folder")
    dest.mkdir(parents=True, exist_ok=True)
    rebuilt = set() if keep_converted else _rebuilt_conversions(runs)
    files, first_with = [], {}
    parts = _PartWriter(dest, part_bytes)
    for path in _kept_files(run, _stale_checkpoints(run) | rebuilt):
        sha = file_digest(path)
        entry = {"path": path.relative_to(run).as_posix(), "bytes": path.stat().st_size, "sha256": sha}
        if sha in first_with:
            entry["same_as"] = first_with[sha]
        else:
            first_with[sha] = entry["path"]
            with open(path, "rb") as f:
                while chunk := f.read(2**20):
                    parts.write(chunk)
        files.append(entry)
    parts.close()
    left_out = sorted(c.relative_to(run).as_posix() for c in rebuilt)
    manifest = {"format": 1, "parts": parts.count, "files": files, "left_out": left_out}
    write_json_atomic(dest / MANIFEST, manifest)
    return manifest


def unpack(src: Path, run: Path) -> dict:
    """Rebuild the run directory packed into `src` at `run` (which must not exist); returns the manifest."""
    manifest = read_json(src / MANIFEST)
    if manifest is None:
        raise RecipeError(f"{src} holds no {MANIFEST}: not a folder written by `qatkit pack`")
    if run.exists():
        raise RecipeError(f"{run} exists: unpack into a new run directory")
    tmp = run.with_name(f".{run.name}.unpacking")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_files(manifest, _PartReader(src, manifest["parts"]), src, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.rename(run)
    return manifest


def _write_files(manifest: dict, stream: _PartReader, src: Path, tmp: Path) -> None:
    """Each file from the stream, hashed as it is written; a duplicate is a copy of the file already checked."""
    for entry in manifest["files"]:
        target = tmp / entry["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        if "same_as" in entry:
            shutil.copyfile(tmp / entry["same_as"], target)
            continue
        digest = hashlib.sha256()
        with open(target, "wb") as f:
            left = entry["bytes"]
            while left:
                chunk = stream.read(min(left, 2**20))
                if not chunk:
                    raise RecipeError(f"{src}: the parts end inside {entry['path']} (a part is missing or cut)")
                f.write(chunk)
                digest.update(chunk)
                left -= len(chunk)
        if digest.hexdigest() != entry["sha256"]:
            raise RecipeError(f"{src}: {entry['path']} does not match its sha256 (a part is damaged)")


class _PartWriter:
    def __init__(self, dest: Path, part_bytes: int):
        self.dest, self.part_bytes, self.count, self._file, self._left = dest, part_bytes, 0, None, 0

    def write(self, data: bytes) -> None:
        while data:
            if self._left == 0:
                self.close()
                self._file = open(self.dest / PART.format(self.count), "wb")  # noqa: SIM115 (closed in close())
                self.count += 1
                self._left = self.part_bytes
            n = min(self._left, len(data))
            self._file.write(data[:n])
            data, self._left = data[n:], self._left - n

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None


class _PartReader:
    """The parts read in order as one stream."""

    def __init__(self, src: Path, count: int):
        self._paths: Iterator[Path] = (src / PART.format(i) for i in range(count))
        self._file = None

    def read(self, n: int) -> bytes:
        while True:
            if self._file is None:
                path = next(self._paths, None)
                if path is None:
                    return b""
                if not path.is_file():
                    raise RecipeError(f"{path} is missing")
                self._file = open(path, "rb")  # noqa: SIM115 (closed when exhausted)
            chunk = self._file.read(n)
            if chunk:
                return chunk
            self._file.close()
            self._file = None
