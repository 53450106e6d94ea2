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
            "cpu": cpu(), "versions": versions,
            "device": {"platform": device.platform, "kind": device.device_kind,
                       "count": jax.device_count(), "processes": jax.process_count()}}


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu() -> dict[str, Any]:
    """The host CPU: model name, cores this process may use, and the vector and matrix
    extensions that set XLA:CPU's speed (CPU timings mean little without them)."""
    model, flags, ids = platform.processor() or platform.machine(), set(), {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() in ("cpu family", "model"):  # names what a cloud hides
                    ids[key.strip()] = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:  # not Linux: the model from platform only
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    family = " ".join(f"{k} {v}" for k, v in ids.items())
    return {"model": model, "family": family, "cores": usable_cores(),
            "extensions": [x for x in wanted if x in flags]}


def bfloat16_note(dtype: str) -> str | None:
    """A line for a run asking for bfloat16 matmuls on a CPU without bfloat16 dot instructions
    (avx512_bf16, amx_bf16), where XLA converts them to float32 and float32 is likely faster;
    None where nothing needs saying (float32, an accelerator, a CPU with them, an unknown
    CPU)."""
    import jax

    if dtype != "bfloat16" or jax.default_backend() != "cpu":
        return None
    info = cpu()
    if not info["family"] or {"avx512_bf16", "amx_bf16"} & set(info["extensions"]):
        return None
    return (f"note: --dtype bfloat16 on this CPU ({info['model']}, no avx512_bf16 or amx_bf16 "
            "instructions) is likely slower than float32; see docs/benchmarks.md")


def process_seconds() -> float | None:
    """Seconds since this process started (Linux: /proc), or None where that is unknown."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time, ticks
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime - started
