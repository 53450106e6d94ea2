"""Sweeps against Keras Tuner: `python -m benchmarks.sweeps [--peer] [--out FILE]`.

The same 16-configuration grid (L2 0, 1e-5, 1e-4, 1e-3 on both hidden kernels x dropout 0,
0.2, 0.3, 0.45 after both), 3 epochs, one seed, validation on the last 30%: `mnist-jax sweep`'s
engine (compiling included, no persistent cache) and, with `--peer`, Keras Tuner's GridSearch
with Keras 3 on JAX, each in a fresh process, one after the other. With `--models`, the
configurations x epochs per second of one stack of 16..1024 models (for accelerators). Writes
one JSON record per measurement, with the machine.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GRID = {"l2": (0.0, 1e-5, 1e-4, 1e-3), "dropout": (0.0, 0.2, 0.3, 0.45)}


def ours(epochs: int, models: int | None = None) -> dict:
    """One sweep in this process: wall seconds from the config to the chosen configuration."""
    import jax

    from mnist_jax import fit, placement, runtime, sweep
    from mnist_jax.config import TrainConfig
    from mnist_jax.data import load_mnist

    splits = fit.prepare(load_mnist(), 0.3)
    l2, dropout = GRID["l2"], GRID["dropout"]
    if models:  # a bigger grid: more L2 values, log-spaced
        import numpy as np

        l2 = tuple(float(x) for x in np.concatenate([[0.0], np.logspace(-6, -2, models // 4 - 1)]))
    config = sweep.SweepConfig(l2=l2, dropout=dropout, originals=False,
                               train=TrainConfig(epochs=epochs,
                                                 model_parallel=jax.device_count()
                                                 if jax.default_backend() != "cpu" else 1))
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        results = sweep.run_sweep(config, splits, Path(out), progress=False,
                                  echo=lambda _: None)
        seconds = time.perf_counter() - t0
    metrics = sweep.assemble(config, results)
    chosen = metrics["selection"]
    n = len(results)
    return {"stack": "mnist_jax", "configurations": n, "epochs": epochs,
            "wall_seconds": seconds, "configuration_epochs_per_second": n * epochs / seconds,
            "placement": placement.resolve(config.train), "best": chosen["configuration"],
            "best_final_val_accuracy": chosen["value"], "device": runtime.environment()["device"],
            "final_val_accuracy": {
                f"l2={r['variant']['l2']:g} dropout={r['variant']['dropout']:g}":
                    metrics["configurations"][name]["stats"]["val_accuracy"]["mean"]
                for name, r in results.items()}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--peer", action="store_true", help="also run Keras Tuner")
    parser.add_argument("--models", default="", help="e.g. 16,64,256,1024: stacks of that many")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        print(json.dumps(ours(args.epochs, int(args.models) if args.models else None)))
        return
    from mnist_jax import runtime

    records = []
    runs = [[sys.executable, "-m", "benchmarks.sweeps", "--inner", "--epochs", str(args.epochs)]]
    if args.peer:
        runs.append([sys.executable, "-m", "benchmarks.peers.keras_tuner_peer", "--epochs",
                     str(args.epochs)])
    for n in filter(None, args.models.split(",")):
        runs.append(runs[0] + ["--models", n])
    for cmd in runs:
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        records.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(records[-1]), flush=True)
    env = runtime.environment()
    if args.peer:
        ratio = records[1]["wall_seconds"] / records[0]["wall_seconds"]
        a, b = records[0]["final_val_accuracy"], records[1]["final_val_accuracy"]
        diff = [a[k] - b[k] for k in a]  # the same configuration, ours minus Keras's
        from mnist_jax.stats import mean_ci95

        mean, half = mean_ci95(diff)
        records.append({"ratio_keras_tuner_to_mnist_jax": ratio,
                        "val_accuracy_difference_per_configuration": {
                            "mean": mean, "ci95_half_width": half, "n": len(diff)}})
        print(f"per configuration, ours minus Keras: {mean:+.4f} +- {half:.4f}", flush=True)
        print(f"mnist_jax {records[0]['wall_seconds']:.1f} s, Keras Tuner "
              f"{records[1]['wall_seconds']:.1f} s: {ratio:.2f}x", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"environment": env, "cpu": runtime.cpu(),
                                        "records": records}, indent=1) + "\n")


if __name__ == "__main__":
    main()
