"""What Keras's Adam and Keras's loss change over whole runs: the study (4 variants, 20 epochs)
over seeds with each optimizer and loss form, beside Keras 3 itself (`[peers]` extra).

    python -m benchmarks.fidelity --seeds 0-4 --keras-seeds 0-4 --out docs/fidelity.json

mnist_jax arms run in this process as one stack per arm; each Keras arm is one
`benchmarks.peers.keras_peer` process per seed (Keras on JAX; `--output logits` computes what
Keras on TensorFlow computes). Prints a Markdown table of test accuracy and loss per variant
(mean ± sd over seeds) and writes every run's numbers to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ARMS = {  # name: (optimizer, loss)
    "mnist_jax keras-adam, logits": ("keras-adam", "logits"),
    "mnist_jax adam (optax), logits": ("adam", "logits"),
    "mnist_jax keras-adam, clipped": ("keras-adam", "clipped"),
}
KERAS_ARMS = {"Keras 3 on JAX, logits output": "logits",
              "Keras 3 on JAX, softmax output (clipped)": "softmax"}


def run_ours(seeds, optimizer: str, loss: str, data_dir) -> dict:
    from mnist_jax import fit
    from mnist_jax.config import VARIANTS, TrainConfig
    from mnist_jax.data import load_mnist

    splits = fit.prepare(load_mnist(data_dir), 0.3)
    config = TrainConfig(optimizer=optimizer, loss=loss)
    t0 = time.perf_counter()
    stack = fit.train_stack(splits, list(VARIANTS.values()), seeds, config, progress=False)
    test = fit.evaluate_models(stack, splits.test_images, splits.test_labels)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "variants": {
        name: {"test_accuracy": test["accuracy"][:, v].tolist(),
               "test_loss": test["loss"][:, v].tolist(),
               "val_accuracy": [h["val_accuracy"][-1] for h in stack.histories[name]]}
        for v, name in enumerate(stack.histories)}}


def run_keras(seeds, output: str, data_dir) -> dict:
    runs: dict[str, dict[str, list[float]]] = {}
    t0 = time.perf_counter()
    for seed in seeds:
        cmd = [sys.executable, "-m", "benchmarks.peers.keras_peer", "--backend", "jax",
               "--seed", str(seed), "--output", output]
        if data_dir:
            cmd += ["--data-dir", str(data_dir)]
        env = {**os.environ, "KERAS_BACKEND": "jax"}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
        for line in done.stdout.splitlines():
            record = json.loads(line)
            arm = runs.setdefault(record["variant"], {"test_accuracy": [], "test_loss": [],
                                                      "val_accuracy": []})
            for key in arm:
                arm[key].append(record[key])
        print(f"  keras {output} seed {seed} done", file=sys.stderr, flush=True)
    return {"seconds": time.perf_counter() - t0, "variants": runs}


def table(results: dict) -> str:
    variants = ("baseline", "l2", "dropout", "l2_dropout")
    lines = ["| stack (n seeds) | " + " | ".join(variants) + " |",
             "|---|" + "---|" * len(variants)]
    for metric, fmt, scale in (("test_accuracy", ".2f", 100), ("test_loss", ".4f", 1)):
        for name, arm in results.items():
            cells = []
            for v in variants:
                x = np.asarray(arm["variants"][v][metric]) * scale
                cells.append(f"{x.mean():{fmt}} ± {x.std(ddof=1):{fmt}}")
            n = len(arm["variants"][variants[0]][metric])
            lines.append(f"| {metric.replace('_', ' ')}: {name} ({n}) | " + " | ".join(cells)
                         + " |")
    return "\n".join(lines)


def parse_range(text: str) -> list[int]:
    from mnist_jax.config import parse_seeds

    return list(parse_seeds(text)) if text else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0-4")
    parser.add_argument("--keras-seeds", default="0-4", help="'' for none")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=Path, default=Path("docs/fidelity.json"))
    args = parser.parse_args()
    from mnist_jax import runtime

    seeds, keras_seeds = parse_range(args.seeds), parse_range(args.keras_seeds)
    results = {}
    for name, (optimizer, loss) in ARMS.items():
        results[name] = run_ours(seeds, optimizer, loss, args.data_dir)
        print(f"  {name}: {results[name]['seconds']:.0f} s", file=sys.stderr, flush=True)
    if keras_seeds:
        for name, output in KERAS_ARMS.items():
            results[name] = run_keras(keras_seeds, output, args.data_dir)
    record = {"environment": runtime.environment(), "seeds": seeds,
              "keras_seeds": keras_seeds, "arms": results}
    try:
        import importlib.metadata

        record["environment"]["versions"]["keras"] = importlib.metadata.version("keras")
    except importlib.metadata.PackageNotFoundError:
        pass
    from mnist_jax import files

    files.write_json(args.out, record)
    print(table(results))


if __name__ == "__main__":
    main()
