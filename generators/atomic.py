"""Writes that readers never see half done: one file (temp file + rename) and one directory (build aside, then
swap it in). The one place for both, used by every module that writes."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path


def write_atomic(path: Path, write: Callable[[str], object], *, durable: bool = False, suffix: str = ".tmp") -> None:
    """Call ``write(tmp)`` on a 0600 temp file beside ``path``, then rename it over ``path``. ``durable``: fsync
    the file first (for records that must survive a power cut, e.g. the privacy ledger). On failure the temp file
    is removed and ``path`` is untouched. ``suffix``: of the temp file (writers that pick a format by suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        if durable:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Mapping) -> None:
    """JSON through :func:`write_atomic` (the file is 0600)."""
    write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2)))


def publish_directory(work: Path, out: Path, *, mtime: float | None = None) -> None:
    """Put the finished directory ``work`` at ``out``: a rename when ``out`` does not exist, else the old one is
    moved aside, the new one renamed in, and the old one deleted (readers see the old or the new, never a mix).

    ``mtime`` (seconds since the epoch): first give every file and folder of ``work`` this one access and
    modification time, so a released directory shows no order in which its files were written.
    """
    if mtime is not None:
        for folder, _, files in os.walk(work, topdown=False):
            for name in files:
                os.utime(os.path.join(folder, name), (mtime, mtime), follow_symlinks=False)
            os.utime(folder, (mtime, mtime))
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        os.rename(work, out)
        return
    old = out.parent / f".{out.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    os.rename(out, old)
    os.rename(work, out)
    shutil.rmtree(old, ignore_errors=True)
