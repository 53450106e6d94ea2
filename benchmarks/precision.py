"""Mixed precision against float32, ours and Keras's: `python -m benchmarks.precision`.

In one run on this machine: the study's four variants over `--seeds` with `--precision
float32` and `bfloat16` (training seconds per epoch, test accuracy per seed), and Keras 3 on
JAX with its `float32` and `mixed_bfloat16` policies (`--peer`, one seed each, fit seconds).
Each configuration runs in a fresh process. Writes JSON with the machine.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path


def ours(precision: str, seeds: tuple[int, ...], epochs: int) -> dict:
    from mnist_jax import fit, placement
    from mnist_jax.config import VARIANTS, TrainConfig
    from mnist_jax.data import load_mnist

    splits = fit.prepare(load_mnist(), 0.3)
    config = TrainConfig(epochs=epochs, dtype=precision)
    stack = fit.train_stack(splits, list(VARIANTS.values()), seeds, config, progress=False)
    test = fit.evaluate_models(stack, splits.test_images, splits.test_labels)
    n_models = len(seeds) * len(VARIANTS)
    return {"stack": "mnist_jax", "precision": precision, "epochs": epochs,
            "seeds": list(seeds), "models": n_models, "placement": placement.resolve(config),
            "compile_seconds": stack.compile_seconds, "train_seconds": stack.train_seconds,
            "seconds_per_model_epoch": stack.train_seconds / (n_models * epochs),
            "test_accuracy": {name: test["accuracy"][:, v].tolist()
                              for v, name in enumerate(VARIANTS)}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--peer", action="store_true", help="also Keras 3 on JAX")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--inner", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    seeds = tuple(int(s) for s in args.seeds.split(","))
    if args.inner:
        print(json.dumps(ours(args.inner, seeds, args.epochs)))
        return
    from mnist_jax import runtime

    records = []
    runs = [[sys.executable, "-m", "benchmarks.precision", "--inner", p, "--seeds", args.seeds,
             "--epochs", str(args.epochs)] for p in ("float32", "bfloat16")]
    if args.peer:
        runs += [[sys.executable, "-m", "benchmarks.peers.keras_peer", "--backend", "jax",
                  "--epochs", str(args.epochs), "--precision", p]
                 for p in ("float32", "mixed_bfloat16")]
    for cmd in runs:
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        for line in done.stdout.strip().splitlines():
            records.append(json.loads(line))
            print(line, flush=True)
    if args.out:
        args.out.write_text(json.dumps({"environment": runtime.environment(),
                                        "cpu": runtime.cpu(), "records": records},
                                       indent=1) + "\n")


if __name__ == "__main__":
    main()
