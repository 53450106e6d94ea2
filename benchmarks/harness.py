"""Measuring as JAX's benchmarking guide says: inputs on the device first, compilation timed
apart (`lower(...).compile()`), a warm-up call, `block_until_ready` at both ends, several
repeats reported as min and median; one JSON record per measurement."""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from mnist_jax import runtime


def timed(fn: Callable[..., Any], *args, **kwargs) -> tuple[Any, float]:
    """`fn(*args, **kwargs)` and the seconds it took (for compilation, timed apart)."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def compile_timed(jitted, *args, **static) -> tuple[Any, float]:
    """The compiled executable and the seconds `lower(...).compile()` took."""
    return timed(lambda: jitted.lower(*args, **static).compile())


def time_calls(call: Callable[[], Any], repeats: int, warmup: int = 1,
               between: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Wall seconds of `call()` (which returns arrays to wait for), after `warmup` calls.
    `between()`, if given, runs before each repeat and after the last, untimed."""
    for _ in range(warmup):
        jax.block_until_ready(call())
    times = []
    for _ in range(repeats):
        if between is not None:
            between()
        t0 = time.perf_counter()  # the previous call was waited for: the device is idle
        jax.block_until_ready(call())
        times.append(time.perf_counter() - t0)
    if between is not None:
        between()
    return {"min_s": min(times), "median_s": statistics.median(times), "repeats": repeats,
            "times_s": times}


def time_epochs(run: Callable[[Any, jax.Array], tuple[Any, Any]], state: Any,
                repeats: int, between: Callable[[], Any] | None = None) -> dict[str, Any]:
    """`time_calls` of whole epochs, `run(state, epoch) -> (state, metrics)` as `fit` runs
    them, carrying the state from one epoch to the next (a copy: an epoch donates it)."""
    carry, epoch = [jax.tree.map(jnp.copy, state)], [0]

    def call():
        carry[0], metrics = run(carry[0], jnp.int32(epoch[0]))
        epoch[0] += 1
        return metrics

    return time_calls(call, repeats, between=between)


def square_matmul(n: int) -> tuple[Callable[[], jax.Array], float]:
    """A compiled n x n x n float32 matmul on operands already on the device, as a call of no
    arguments, and the seconds its compilation took (2 n**3 FLOPs a call)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    compiled, compile_s = compile_timed(jax.jit(jnp.matmul), a, b)
    return functools.partial(compiled, a, b), compile_s


class Yardstick:
    """The peak matmul, timed again between the repeats of a measurement.

    On a shared machine (a cloud VM whose neighbours come and go) the speed drifts by tens of
    percent within minutes; a utilisation against a peak taken minutes earlier then mixes the
    code's efficiency with the machine's mood. `window()` opens a window, `sample` (passed as
    `between`) times one matmul, and `close()` returns the best GFLOP/s seen in the window.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self._matmul, _ = square_matmul(n)
        jax.block_until_ready(self._matmul())
        self._best = 0.0

    def window(self) -> Yardstick:
        self._best = 0.0
        return self

    def sample(self) -> None:
        t0 = time.perf_counter()
        jax.block_until_ready(self._matmul())
        self._best = max(self._best, 2 * self.n**3 / (time.perf_counter() - t0) / 1e9)

    def close(self) -> float:
        return self._best


def device() -> dict[str, Any]:
    d = jax.devices()[0]
    return {"backend": d.platform, "device_kind": d.device_kind,
            "device_count": jax.device_count()}


def provenance() -> dict[str, Any]:
    """When, and which code: the date and the git commit of this tree (with `+dirty` when it
    has changes), so that a table row can say what it measured."""
    import datetime
    import subprocess
    from pathlib import Path

    root = Path(__file__).parents[1]

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or None
    if commit and git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    return {"date": datetime.date.today().isoformat(), "commit": commit}


class Results:
    """Records of one benchmark run, each tagged with the device it ran on."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.environment = {**runtime.environment(), **provenance()}

    def add(self, name: str, **fields: Any) -> dict[str, Any]:
        record = {"name": name, **device(), **fields}
        self.records.append(record)
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in fields.items()
                 if k != "times_s"}
        print(f"{name}: {shown}", flush=True)
        return record

    def find(self, name: str, **match: Any) -> list[dict[str, Any]]:
        return [r for r in self.records if r["name"] == name
                and all(r.get(k) == v for k, v in match.items())]

    def to_json(self) -> dict[str, Any]:
        return {"environment": self.environment, "records": self.records}
