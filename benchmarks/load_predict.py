"""A kept model used as a user uses it: `python -m benchmarks.load_predict --run DIR`.

Each measurement is a fresh process, as a user's script or command is: `mnist-jax predict
--run DIR digit.png` (the command, from process start to exit), and `load_run(DIR)` then
`predict` of one image from Python (imports included). Repeated, alternating; one JSON
record per measurement, with the machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PYTHON = """
import numpy as np
from mnist_jax import load_run
run = load_run({run!r})
print(run.predict(np.load({digit!r})[None])[0])
"""


ROOT = Path(__file__).parents[1]


def timed(cmd: list[str]) -> float:
    """Seconds of one fresh process, run from this tree (whose code `-m` then imports, not
    another tree's installed in the venv)."""
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished run directory")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default: stdout)")
    args = parser.parse_args()
    from PIL import Image

    from benchmarks.harness import provenance
    from mnist_jax import load_mnist, runtime

    digit = load_mnist().test_images[0]  # a 7
    with tempfile.TemporaryDirectory() as tmp:
        png, npy = Path(tmp) / "digit.png", Path(tmp) / "digit.npy"
        Image.fromarray(255 - digit.repeat(5, 0).repeat(5, 1)).save(png)  # black on white
        import numpy as np

        np.save(npy, digit)
        commands = {
            "cli_predict_png": [sys.executable, "-m", "mnist_jax.cli", "predict", "--run",
                                str(args.run.resolve()), str(png)],
            "python_load_run_predict": [sys.executable, "-c",
                                        PYTHON.format(run=str(args.run.resolve()),
                                                      digit=str(npy))],
        }
        for cmd in commands.values():  # once each first: the OS's file cache, not ours
            timed(cmd)
        times = {name: [] for name in commands}
        for _ in range(args.repeats):
            for name, cmd in commands.items():
                times[name].append(timed(cmd))
    record = {"benchmark": "load_predict", "cpu": runtime.cpu(),
              "environment": {**runtime.environment(), **provenance()}, "run": str(args.run),
              "seconds": {name: {"min": min(t), "median": sorted(t)[len(t) // 2], "all": t}
                          for name, t in times.items()}}
    text = json.dumps(record, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
