"""What a change meant to keep behaviour must keep: every number and figure of the study, the
five-seed study, a 3x3 sweep and the Keras trajectory replays, as one JSON file.

    python -m benchmarks.fingerprint --out /tmp/before        # on the old code
    python -m benchmarks.fingerprint --out /tmp/after         # on the new code, same CPU
    python -m benchmarks.fingerprint --compare /tmp/before /tmp/after

Timings are dropped; the recorded configs are kept apart (their keys may be renamed), so the
comparison reads histories, test metrics, selections, comparisons and figure bytes only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

RUNS = {
    "study": ["experiment"],
    "seeds": ["experiment", "--seeds", "0-4"],
    "sweep": ["sweep", "--l2", "0,1e-4,1e-3", "--dropout", "0,0.2,0.45", "--epochs", "3",
              "--seeds", "0-1"],
}
# Not results: when and where a run was made, how long it took, and its recorded settings
# (compared apart: their keys may be renamed), and where MNIST came from (the first run
# fetches it, later ones read the cache).
DROPPED = {"timing", "created", "environment", "source", "config"}


def _numbers(tree):
    """`tree` without what is not a result (DROPPED, and any key that names seconds)."""
    if isinstance(tree, dict):
        return {k: _numbers(v) for k, v in tree.items()
                if k not in DROPPED and "seconds" not in k}
    if isinstance(tree, list):
        return [_numbers(v) for v in tree]
    return tree


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fingerprint_run(out: Path) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    files = sorted(p for p in out.rglob("*") if p.is_file() and (
        p.suffix in (".png", ".csv") and "checkpoints" not in p.parts))
    return {"numbers": _numbers(metrics), "config": metrics.get("config"),
            "files": {str(p.relative_to(out)): _digest(p) for p in files}}


def replays() -> dict:
    """Our Keras-Adam steps on Keras's recorded batches (tests/test_fidelity.py): the losses
    as float32 reprs and a digest of the weights after them."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import numpy as np

    import test_fidelity as tf
    from mnist_jax import preprocessing
    from mnist_jax.data import load_mnist

    recording = dict(np.load(tf.RECORDING))
    mnist = load_mnist(None)
    x = preprocessing.scale(preprocessing.flatten(mnist.train_images))[:42000]
    y = preprocessing.one_hot(mnist.train_labels)[:42000]
    out = {}
    for run in tf.RUNS:
        for optimizer in ("keras-adam", "adam"):
            losses, weights = tf.replay(recording, (x, y), run, optimizer)
            h = hashlib.sha256()
            for w in weights:
                h.update(np.ascontiguousarray(w).tobytes())
            out[f"{run}/{optimizer}"] = {"losses": [repr(np.float32(v)) for v in losses],
                                         "weights_sha256": h.hexdigest()}
    return out


def make(out: Path, which: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    import mnist_jax

    print(f"code: {Path(mnist_jax.__file__).parent}", flush=True)
    result = {}
    for name in which:
        run_dir = out / name
        # `-m` from the working directory, which Python puts first on sys.path: the code of
        # this tree, also where another tree's package is installed (editable) in the venv.
        cmd = [sys.executable, "-m", "mnist_jax.cli", *RUNS[name], "--out", str(run_dir),
               "--overwrite", "--quiet"]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, "PYTHONHASHSEED": "0"})
        result[name] = fingerprint_run(run_dir)
    print("+ replays", flush=True)
    result["replays"] = replays()
    (out / "fingerprint.json").write_text(json.dumps(result, indent=1, sort_keys=True))
    print(f"wrote {out / 'fingerprint.json'}")


def compare(a: Path, b: Path) -> int:
    fa = json.loads((a / "fingerprint.json").read_text())
    fb = json.loads((b / "fingerprint.json").read_text())
    bad = 0
    for name in sorted(set(fa) | set(fb)):
        x, y = fa.get(name), fb.get(name)
        if x is None or y is None:
            print(f"{name}: only in {'after' if x is None else 'before'}")
            continue
        parts = ("numbers", "files") if name != "replays" else (None,)
        for part in parts:
            xs, ys = (x, y) if part is None else (x[part], y[part])
            if part == "numbers":  # recorded before a key joined DROPPED, maybe
                xs, ys = _numbers(xs), _numbers(ys)
            same = xs == ys
            bad += not same
            print(f"{name}{'' if part is None else ' ' + part}: "
                  f"{'identical' if same else 'DIFFERENT'}")
            if not same and isinstance(xs, dict):
                for k in sorted(set(xs) | set(ys)):
                    if xs.get(k) != ys.get(k):
                        print(f"   differs: {k}")
    return 1 if bad else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--runs", default=",".join(RUNS), help="which of " + ", ".join(RUNS))
    p.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = p.parse_args()
    if args.compare:
        return compare(*args.compare)
    make(args.out, args.runs.split(","))
    return 0


if __name__ == "__main__":
    sys.exit(main())
