"""Process-level JAX settings the CLI and benchmarks opt into, and the environment record."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any

import jax

PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "orbax-checkpoint", "matplotlib",
            "mnist_jax")


def default_compilation_cache() -> Path:
    """`$MNIST_JAX_COMPILATION_CACHE` if set, else `~/.cache/mnist_jax/jax-compilation-cache`."""
    env = os.environ.get("MNIST_JAX_COMPILATION_CACHE")
    return Path(env).expanduser() if env else (
        Path.home() / ".cache" / "mnist_jax" / "jax-compilation-cache")


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path:
    """Turns on JAX's persistent compilation cache for this process, caching every program,
    so a second run takes its compiled programs from disk. Returns the directory."""
    directory = Path(path) if path is not None else default_compilation_cache()
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


def environment() -> dict[str, Any]:
    """Python, package versions and devices, recorded with every result."""
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    device = jax.devices()[0]
    return {"python": platform.python_version(), "platform": platform.platform(),
            "versions": versions,
            "device": {"platform": device.platform, "kind": device.device_kind,
                       "count": jax.device_count(), "processes": jax.process_count()}}
