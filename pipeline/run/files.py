"""File helpers: write-then-rename (an interrupted run never leaves a half-written file or folder), content
hashes and sizes in words."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to a temp file beside `path`, fsync it, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    """Atomically write `data` as indented JSON."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


@contextmanager
def exclusive_lock(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `path` (a small file, kept) for the block; when another process holds it, a
    one-line PipelineError naming `what` and the holder. The kernel drops the lock if the holder dies."""
    from pipeline.errors import PipelineError

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise PipelineError(
                f"{what} is being written by another qpipe run ({holder}); wait for it, or pass --output elsewhere"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        yield


DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # no space left, file size limit, quota exceeded
WRAPPED_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how Rust-backed libraries (safetensors) quote an errno


def disk_full(exc: BaseException | None) -> bool:
    """Whether `exc`, or an exception it was raised from, is a write that found no space: an OSError with one of
    DISK_FULL, or a library error quoting one (safetensors: "I/O error: No space left on device (os error 28)")."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            return True
        if any(int(code) in DISK_FULL for code in WRAPPED_OS_ERROR.findall(str(exc))):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def remove_stale_temps(run_dir: Path) -> list[str]:
    """Delete what atomic writes of a killed run left behind (`.NAME.*.tmp` files and folders, in the run folder,
    reports/ and model/), so a resumed run finishes without them; call it holding the run's lock. Returns their
    names, relative to `run_dir`."""
    removed = []
    for folder in (run_dir, run_dir / "reports", run_dir / "model"):
        for stale in folder.glob(".*.tmp"):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale)
            else:
                stale.unlink()
            removed.append(str(stale.relative_to(run_dir)))
    return removed


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temp folder beside `final`; on success it replaces `final`, on failure it is removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_directory(tmp, final)


def replace_directory(src: Path, final: Path) -> None:
    """Move `src` to `final`, replacing an existing `final` only once `src` is in place."""
    if not final.exists():
        os.replace(src, final)
        return
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
    os.replace(src, final)
    shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: Path) -> str:
    """Streamed in 1 MiB blocks, so a multi-GB shard never sits in memory."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_files(paths: Sequence[Path]) -> list[str]:
    """`sha256_file` of each path, side by side on up to 8 threads (hashlib releases the GIL on large blocks), so a
    sharded checkpoint takes about as long as its largest shard when there are cores for each."""
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(paths), os.cpu_count() or 1))) as pool:
        return list(pool.map(sha256_file, paths))


def format_bytes(num: float) -> str:
    """A byte count in binary units, e.g. "33.22 KiB" (whole bytes below 1 KiB)."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    power = 0
    while num >= 1024 and power < len(units) - 1:
        num /= 1024
        power += 1
    return f"{num:.0f} B" if power == 0 else f"{num:.2f} {units[power]}"
