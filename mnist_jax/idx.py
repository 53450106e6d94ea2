"""The IDX format of the MNIST files and the canonical digests every source is checked against."""

from __future__ import annotations

import dataclasses
import hashlib
import struct

import numpy as np

from mnist_jax.errors import DataError


@dataclasses.dataclass(frozen=True)
class IdxFile:
    name: str
    shape: tuple[int, ...]
    nbytes: int
    sha256: str


TRAIN_IMAGES = IdxFile("train-images-idx3-ubyte", (60000, 28, 28), 47040016,
                       "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db")
TRAIN_LABELS = IdxFile("train-labels-idx1-ubyte", (60000,), 60008,
                       "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5")
TEST_IMAGES = IdxFile("t10k-images-idx3-ubyte", (10000, 28, 28), 7840016,
                      "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7")
TEST_LABELS = IdxFile("t10k-labels-idx1-ubyte", (10000,), 10008,
                      "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2")
IDX_FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

def encode_idx(array_u8: np.ndarray) -> bytes:
    """The IDX bytes of a uint8 array: magic (0, 0, 0x08, ndim), big-endian dims, raw data."""
    array_u8 = np.ascontiguousarray(array_u8)
    if array_u8.dtype != np.uint8:
        raise ValueError(f"IDX encoding here is for uint8 arrays, got {array_u8.dtype}")
    header = struct.pack(f">HBB{array_u8.ndim}I", 0, 0x08, array_u8.ndim, *array_u8.shape)
    return header + array_u8.tobytes()


def decode_idx(raw: bytes, spec: IdxFile) -> np.ndarray:
    """Parses one IDX file of unsigned bytes, checking its magic number, shape and length."""
    if len(raw) < 4:
        raise DataError(f"{spec.name}: {len(raw)} bytes is too short to be an IDX file")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or ndim != len(spec.shape):
        raise DataError(f"{spec.name}: wrong magic number {raw[:4].hex()} (expected "
                        f"0000080{len(spec.shape)}); this is not an MNIST IDX file")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{spec.name}: truncated header ({len(raw)} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if dims != spec.shape:
        raise DataError(f"{spec.name}: header says shape {dims}, MNIST has {spec.shape}")
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "has trailing bytes"
        raise DataError(f"{spec.name}: {what}: {len(raw)} bytes, expected {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def verify_idx(raw: bytes, spec: IdxFile, *, origin: str) -> None:
    """Raises DataError unless `raw` is exactly the canonical file (length and SHA-256)."""
    if len(raw) != spec.nbytes:
        raise DataError(f"{spec.name} from {origin}: {len(raw)} bytes, the canonical file has "
                        f"{spec.nbytes}; it is truncated or not MNIST")
    digest = hashlib.sha256(raw).hexdigest()
    if digest != spec.sha256:
        raise DataError(f"{spec.name} from {origin}: sha256 {digest} does not match the "
                        f"canonical {spec.sha256}; the file is corrupt or not MNIST")
