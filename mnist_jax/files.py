"""Atomic file writes (a reader sees the old file or the new one, never half of either) with
the permissions the user's umask gives."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path`; on success it is fsynced and renamed over `path`.

    The temporary name keeps the suffix, so writers that infer the format from it
    (matplotlib's `savefig`) work. On any exception the temporary file is removed and
    `path` is untouched.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _new_file(path)
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if e.errno is not None:  # name the file the user knows, not the temporary one
            e.filename, e.filename2 = str(path), None
        raise
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def _new_file(path: Path) -> Path:
    """An empty file of a fresh name beside `path`, mode 0666 less the umask, as `open(..., 'w')`
    makes one (tempfile.mkstemp makes 0600: colleagues could not read a run, nor a shared
    cache)."""
    while True:
        tmp = path.parent / f".{path.stem}.{secrets.token_hex(4)}.tmp{path.suffix}"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` (UTF-8) to `path` atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes `obj` as indented JSON to `path` atomically; NaN and infinity are rejected."""
    write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")
