"""The measurements. Each function adds records to a Results; none asserts a threshold."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.harness import (
    Results,
    Yardstick,
    compile_timed,
    square_matmul,
    time_calls,
    time_epochs,
    timed,
)
from mnist_jax import fit, optim, placement, programs
from mnist_jax.config import VARIANTS, TrainConfig
from mnist_jax.model import train_flops_per_sample
from mnist_jax.steps import Batch, EpochData, train_step

ROOT = Path(__file__).resolve().parents[1]


def matmul_peak(results: Results, sizes: tuple[int, ...], repeats: int) -> tuple[float, int]:
    """float32 GFLOP/s of n x n x n matmuls, the best over `sizes`: the yardstick for FLOP
    utilisation. One size can miss the peak by a third (on a 2-core Skylake: 164 GFLOP/s at
    1024, 116 at 4096, where the operands no longer fit the caches), which would flatter every
    utilisation figure. Returns (GFLOP/s, n) of the best."""
    best = (0.0, 0)
    for n in sizes:
        matmul, compile_s = square_matmul(n)
        t = time_calls(matmul, repeats)
        gflops = 2 * n**3 / t["min_s"] / 1e9
        results.add("matmul_peak", n=n, dtype="float32", gflop_per_s=gflops,
                    precision=jax.config.jax_default_matmul_precision or "default",
                    compile_s=compile_s, **t)
        best = max(best, (gflops, n))
    return best


def _train_only(splits: fit.Splits) -> EpochData:
    """The training rows alone on the device: an epoch without validation."""
    return jax.device_put(EpochData(splits.train_images, splits.train_labels,
                                    n_train=len(splits.train_images), n_val=0))


def _epoch_program(variants, seeds, config: TrainConfig, data: EpochData):
    """A fresh stack and its epoch (with its validation, if `data` has some), compiled as
    `fit` compiles it (timed apart)."""
    stack = fit.new_stack(variants, seeds, config, 60000)
    runner, compile_s = timed(programs.runner, stack.model, config, stack.state, stack.keys,
                              data)
    return stack, runner.epoch, compile_s


def _utilisation(gflops: float, peak: float, yardstick: Yardstick | None) -> dict[str, float]:
    """FLOP utilisation against the run's peak and, with a yardstick, against the best matmul
    timed between this measurement's own repeats (the machine's speed at that moment)."""
    out = {"gflop_per_s": gflops, "flop_utilisation": gflops / peak}
    if yardstick is not None:
        window = yardstick.close()
        out |= {"peak_in_window_gflop_per_s": window, "flop_utilisation_in_window": gflops / window}
    return out


def epoch(results: Results, splits: fit.Splits, peak: float, repeats: int,
          batch_sizes=(128,), variants=("baseline",), rngs=("hash",),
          yardstick: Yardstick | None = None) -> None:
    """A whole compiled training epoch: samples/s, and achieved FLOP/s against the peak."""
    data = _train_only(splits)
    n = len(splits.train_images)
    flops = train_flops_per_sample() * n
    for batch in batch_sizes:
        for name in variants:
            for rng in rngs if VARIANTS[name].dropout else ("hash",):
                config = TrainConfig(batch_size=batch, dropout_rng=rng)
                stack, run, compile_s = _epoch_program([VARIANTS[name]], (0,), config, data)
                t = time_epochs(run, stack.state, repeats,
                                yardstick and yardstick.window().sample)
                steps = -(-n // batch)
                results.add("epoch", variant=name, dropout_rng=rng, batch=batch,
                            samples_per_s=n / t["min_s"], ms_per_step=1e3 * t["min_s"] / steps,
                            **_utilisation(flops / t["min_s"] / 1e9, peak, yardstick),
                            compile_s=compile_s, **t)


def optimizer_cost(results: Results, splits: fit.Splits, peak: float, repeats: int,
                   yardstick: Yardstick | None = None) -> None:
    """The baseline epoch at batch 128 with the study's Adam (Keras's), with optax's Adam, and,
    as a yardstick, with plain SGD in its place (same model, weights and program otherwise):
    Adam's update streams the weights, both moments and the gradient through memory, SGD only
    the weights and the gradient. The difference is the optimizer's share of the step, the part
    of the gap to the matmul peak that no matmul tuning closes; Keras's against optax's Adam is
    the cost of following Keras. The study's Adam is timed again here, beside the others, so
    the ratios come from one stretch of time. SGD is a diagnostic, never the study's optimizer.
    """
    data = _train_only(splits)
    n = len(splits.train_images)
    config = TrainConfig()
    stack = fit.new_stack([VARIANTS["baseline"]], (0,), config)
    sgd = optax.inject_hyperparams(optax.sgd)(learning_rate=config.learning_rate)
    optax_adam = optim.for_config(dataclasses.replace(config, optimizer="adam"))
    static = dict(model=stack.model, batch_size=config.batch_size, batch_sharding=None)
    adam_s = None
    for name, tx in (("keras-adam", optim.for_config(config)), ("adam", optax_adam), ("sgd", sgd)):
        state = stack.state.replace(opt_state=jax.vmap(jax.vmap(tx.init))(stack.state.params))
        compiled, compile_s = timed(programs.compile_epoch, state, stack.keys, data, jnp.int32(0),
                                    tx=tx, **static)
        t = time_epochs(lambda state, epoch, compiled=compiled: compiled(
            state, stack.keys, data, epoch), state, repeats,
            yardstick and yardstick.window().sample)
        adam_s = adam_s or t["min_s"]
        results.add("optimizer_cost", optimizer=name, batch=config.batch_size,
                    samples_per_s=n / t["min_s"], ratio_to_study=t["min_s"] / adam_s,
                    **_utilisation(train_flops_per_sample() * n / t["min_s"] / 1e9, peak,
                                   yardstick),
                    compile_s=compile_s, **t)


def step(results: Results, splits: fit.Splits, repeats: int, steps_per_call: int = 50) -> None:
    """One jitted train step dispatched from Python per batch (as a hand-written loop would):
    ms/step at batch 128 for each variant and dropout generator."""
    batch = jax.device_put(Batch(splits.train_images[:128], splits.train_labels[:128],
                                 np.ones(128, np.float32)))
    for name, rng in (("baseline", "hash"), ("l2", "hash"), ("dropout", "hash"),
                      ("dropout", "threefry"), ("l2_dropout", "hash")):
        config = TrainConfig(dropout_rng=rng)
        stack = fit.new_stack([VARIANTS[name]], (0,), config)
        state = [jax.tree.map(lambda a: a[0, 0], stack.state)]
        step = functools.partial(train_step, model=stack.model, tx=optim.for_config(config))
        jitted = jax.jit(step,
                         donate_argnums=0)
        key = jax.random.key(0)
        compiled, compile_s = compile_timed(jitted, state[0], batch, key)

        def call(compiled=compiled, state=state, key=key):
            for i in range(steps_per_call):
                state[0], metrics = compiled(state[0], batch, jax.random.fold_in(key, i))
            return metrics

        t = time_calls(call, repeats)
        results.add("train_step", variant=name, dropout_rng=rng, batch=128,
                    ms_per_step=1e3 * t["min_s"] / steps_per_call,
                    samples_per_s=128 * steps_per_call / t["min_s"], compile_s=compile_s, **t)


def regularisation_costs(results: Results) -> None:
    """Dropout and L2 relative to the baseline epoch, from the epoch records of this run."""
    base = results.find("epoch", variant="baseline", batch=128)
    if not base:
        return
    for record in results.find("epoch", batch=128):
        if record["variant"] != "baseline":
            results.add("cost_vs_baseline", variant=record["variant"],
                        dropout_rng=record["dropout_rng"],
                        ratio=record["min_s"] / base[0]["min_s"])


def stacks(results: Results, splits: fit.Splits, peak: float, sizes, repeats: int,
           placements=("stack", "sequential", "concurrent"),
           yardstick: Yardstick | None = None) -> None:
    """N models trained together, per placement: one vmapped program ('stack'), the
    single-model program once per model ('sequential'), or those programs several at once
    from host threads ('concurrent', the CPU default). Models 1..N are the study's variants
    (then seeds), training epochs only, timed as `fit` runs them (slicing and merging the
    stack included); FLOP utilisation counts every model's matmuls."""
    data = _train_only(splits)
    n = len(splits.train_images)
    names = list(VARIANTS)
    for size in sizes:
        variants = [VARIANTS[names[i % len(names)]] for i in range(min(size, len(names)))]
        seeds = tuple(range(-(-size // len(variants))))
        models = len(variants) * len(seeds)
        for where in placements if models > 1 else ("sequential",):
            stack, run, compile_s = _epoch_program(variants, seeds,
                                                   TrainConfig(placement=where), data)
            t = time_epochs(run, stack.state, repeats, yardstick and yardstick.window().sample)
            samples_per_s = models * n / t["min_s"]
            gflops = samples_per_s * train_flops_per_sample() / 1e9
            results.add("stack", placement=where, models=models,
                        workers=placement.workers(models) if where == "concurrent" else 1,
                        compile_s=compile_s, samples_per_s=samples_per_s,
                        samples_per_s_per_model=samples_per_s / models,
                        **_utilisation(gflops, peak, yardstick), **t)


def _run(cmd: list[str], env: dict[str, str] | None = None, timeout: int = 3600,
         ) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=ROOT)
    return done, time.perf_counter() - t0


def study(results: Results, data_dir: str | None, epochs: int) -> dict | None:
    """The four-variant study as a user runs it, twice: a cold and a warm compilation cache.
    Returns the cold run's record, the one peers are compared with (they compile from cold)."""
    first = None
    with tempfile.TemporaryDirectory(prefix="mnist_jax-bench-") as tmp:
        env = {"MNIST_JAX_COMPILATION_CACHE": str(Path(tmp) / "xla-cache")}
        for run in ("cold_cache", "warm_cache"):
            out = Path(tmp) / run
            cmd = [sys.executable, "-m", "mnist_jax.cli", "experiment", "--quiet", "--out",
                   str(out), "--epochs", str(epochs)]
            if data_dir:
                cmd += ["--data-dir", data_dir]
            done, wall = _run(cmd, env)
            if done.returncode != 0:
                results.add("study", run=run, error=done.stderr[-2000:])
                return None
            metrics = json.loads((out / "metrics.json").read_text())
            timing = metrics["timing"]
            record = results.add(
                "study", run=run, epochs=epochs, process_wall_s=wall,
                compile_s=timing["compile_seconds"], train_s=timing["train_seconds"],
                fit_equivalent_s=timing["compile_seconds"] + timing["train_seconds"],
                process_seconds=timing.get("process_seconds"),
                parts_seconds=timing.get("parts_seconds"),
                placement=metrics["timing"].get("placement"),
                test_accuracy={n: v["test"]["accuracy"] for n, v in metrics["variants"].items()})
            first = first or record
    return first


PEERS = {
    "keras-jax": (("keras",), ["-m", "benchmarks.peers.keras_peer", "--backend", "jax"]),
    "keras-tensorflow": (("keras", "tensorflow"),
                         ["-m", "benchmarks.peers.keras_peer", "--backend", "tensorflow"]),
    "torch-eager": (("torch",), ["-m", "benchmarks.peers.torch_peer"]),
    "torch-compile": (("torch",), ["-m", "benchmarks.peers.torch_peer", "--compile"]),
}


def peers(results: Results, ours: dict | None, data_dir: str | None, epochs: int,
          only: tuple[str, ...] | None = None, after_each=None) -> None:
    """The same recipe in the other stacks that are installed, as ratios to mnist_jax.
    `after_each()`, if given, runs after each peer (to save what was measured so far)."""
    for name, (modules, args) in PEERS.items():
        if only and name not in only:
            continue
        _peer(results, name, modules, args, ours, data_dir, epochs)
        if after_each is not None:
            after_each()


def _peer(results: Results, name: str, modules: tuple[str, ...], args: list[str],
          ours: dict | None, data_dir: str | None, epochs: int) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        results.add("peer", stack=name, skipped=f"not installed: {', '.join(missing)} "
                                                "(pip install -e '.[peers]')")
        return
    cmd = [sys.executable, *args, "--epochs", str(epochs)]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    done, wall = _run(cmd, {"TF_CPP_MIN_LOG_LEVEL": "2"})
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        results.add("peer", stack=name, error=done.stderr[-2000:])
        return
    fit_s = sum(r["fit_seconds"] + r["evaluate_seconds"] for r in lines)
    ratio = fit_s / ours["fit_equivalent_s"] if ours else None
    # The whole processes too (start-up, data, evaluation, our figures and report included),
    # against ours with a cold compilation cache, as the peer compiles from cold.
    process_ratio = wall / ours["process_wall_s"] if ours else None
    results.add("peer", stack=name, epochs=epochs, fit_s=fit_s, process_wall_s=wall,
                ratio_to_mnist_jax=ratio, process_ratio_to_mnist_jax=process_ratio,
                test_accuracy={r["variant"]: r["test_accuracy"] for r in lines},
                versions={k: v for r in lines[:1] for k, v in r.items()
                          if k in ("keras", "torch", "threads", "device")})


def scaling(results: Results, devices: int, repeats: int) -> None:
    """Data parallelism over 1..`devices` host devices (a subprocess each: the device count is
    fixed when JAX starts). On 2 cores expect no speed-up: the shape of the curve matters."""
    for parallel in sorted({1, 2, devices} & set(range(1, devices + 1))):
        cmd = [sys.executable, "-m", "benchmarks.scaling", "--devices", str(devices),
               "--data-parallel", str(parallel), "--repeats", str(repeats)]
        done, _ = _run(cmd)
        if done.returncode != 0:
            results.add("data_parallel", data_parallel=parallel, error=done.stderr[-2000:])
            continue
        record = json.loads(done.stdout.strip().splitlines()[-1])
        results.add("data_parallel", **record)
