"""The whole study, this tree against another revision, side by side in one run:
`python -m benchmarks.ab REV [--rounds 3] [--epochs 20] [--out ab.json]`.

Each round runs `mnist-jax experiment` of both versions with a cold compilation cache, then
with a warm one, in alternating order (a shared machine drifts; alternation spreads the drift
over both). Every run is a fresh process; the other revision is a temporary `git worktree`
put first on PYTHONPATH (checked: each run imports the version it names). Records the wall
time of each process, its compile and train seconds (metrics.json) and the rest, the
medians per version and cache, and the machine. A ratio from one run, never a threshold.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("wall_s", "compile_s", "train_s", "rest_s")


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                          check=True).stdout.strip()


def _package_root(tree: Path) -> Path:
    """Where a revision keeps the package: the repository root, or src/ before the move."""
    return tree / "src" if (tree / "src" / "mnist_jax").is_dir() else tree


def _imported_from(env: dict) -> str:
    """Where `import mnist_jax` resolves with this environment (run from the code's own
    directory: the working directory comes first on sys.path, before PYTHONPATH)."""
    return subprocess.run([sys.executable, "-c", "import mnist_jax; print(mnist_jax.__file__)"],
                          env=env, cwd=env["PYTHONPATH"], capture_output=True, text=True,
                          check=True).stdout.strip()


def run_study(src: Path, cache: Path, out: Path, epochs: int, data_dir: str | None) -> dict:
    """One `mnist-jax experiment` process of the code in `src`: its seconds."""
    env = {**os.environ, "PYTHONPATH": str(src), "MNIST_JAX_COMPILATION_CACHE": str(cache)}
    module = _imported_from(env)
    if not Path(module).resolve().is_relative_to(src.resolve()):
        raise RuntimeError(f"PYTHONPATH={src} imported mnist_jax from {module}")
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    data = ["--data-dir", str(Path(data_dir).resolve())] if data_dir else []
    subprocess.run([sys.executable, "-m", "mnist_jax.cli", "experiment", "--out",
                    str(out.resolve()), "--epochs", str(epochs), "--quiet", *data], env=env,
                   cwd=src, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    timing = json.loads((out / "metrics.json").read_text())["timing"]
    return {"module": module, "wall_s": wall, "compile_s": timing["compile_seconds"],
            "train_s": timing["train_seconds"],
            "rest_s": wall - timing["compile_seconds"] - timing["train_seconds"],
            "parts_seconds": timing["parts_seconds"]}


def compare(revision: str, rounds: int, epochs: int, data_dir: str | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="mnist-jax-ab-") as tmp:
        tmp = Path(tmp)
        tree = tmp / "other"
        _git("worktree", "add", "--detach", str(tree), revision)
        try:
            versions = {revision: _package_root(tree), "this tree": ROOT}
            rows = []
            for r in range(rounds):
                order = list(versions) if r % 2 == 0 else list(reversed(versions))
                for cache_state in ("cold", "warm"):
                    for name in order:
                        cache = tmp / f"cache-{list(versions).index(name)}"
                        if cache_state == "cold":
                            shutil.rmtree(cache, ignore_errors=True)
                        row = {"round": r, "cache": cache_state, "version": name,
                               **run_study(versions[name], cache, tmp / "run", epochs, data_dir)}
                        rows.append(row)
                        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v
                                          for k, v in row.items() if k != "parts_seconds"}),
                              flush=True)
        finally:
            _git("worktree", "remove", "--force", str(tree))
    medians = {f"{cache}/{name}": {k: statistics.median(
        row[k] for row in rows if row["cache"] == cache and row["version"] == name)
        for k in KEYS} for cache in ("cold", "warm") for name in versions}
    return {"revision": _git("rev-parse", revision), "this_tree": _git("rev-parse", "HEAD"),
            "this_tree_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
            "epochs": epochs, "rounds": rounds, "rows": rows, "medians": medians}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("revision", help="the git revision to compare this tree with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--data-dir", default=None, help="as mnist-jax --data-dir")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    result = compare(args.revision, args.rounds, args.epochs, args.data_dir)
    from mnist_jax import runtime

    result = {"environment": runtime.environment(), **result}
    print(json.dumps(result["medians"], indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
