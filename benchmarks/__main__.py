"""`python -m benchmarks`: every measurement on whatever `jax.devices()` offers, written to
`<out>/results.json` (one record per measurement) and `<out>/benchmarks.png`.

    python -m benchmarks                 # the full run (about 10 minutes on 2 CPU cores)
    python -m benchmarks --quick         # a smoke run of every code path (about a minute)
    python -m benchmarks --peers         # add Keras (JAX, TensorFlow) and PyTorch, if installed
"""

from __future__ import annotations

import argparse
import datetime
import os
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None,
                        help="directory (default bench-results/<backend>-<timestamp>)")
    parser.add_argument("--quick", action="store_true",
                        help="few repeats, small sweeps, a 2-epoch study: checks the code runs")
    parser.add_argument("--peers", action="store_true",
                        help="also time Keras 3 (JAX and TensorFlow backends) and PyTorch")
    parser.add_argument("--only-peers", default=None,
                        help="comma-separated subset of keras-jax,keras-tensorflow,"
                             "torch-eager,torch-compile")
    parser.add_argument("--skip", default="",
                        help="comma-separated parts to leave out: step,epoch,sweep,stacks,"
                             "study,scaling")
    parser.add_argument("--data-dir", default=None, help="as mnist-jax --data-dir")
    args = parser.parse_args(argv)
    # The study and the peers run in child processes on the same device: JAX's default of
    # taking 75% of an accelerator's memory at start would leave them too little. Allocate as
    # needed instead (no effect on CPU).
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

    import jax

    from benchmarks import plot, suite
    from benchmarks.harness import Results, Yardstick
    from mnist_jax import files, fit, runtime
    from mnist_jax.data import load_mnist

    runtime.enable_compilation_cache(os.environ.get("MNIST_JAX_COMPILATION_CACHE"))
    backend = jax.default_backend()
    out = args.out or Path("bench-results") / (
        f"{backend}-{datetime.datetime.now().strftime('%Y%m%dT%H%M%S')}")
    skip = set(filter(None, args.skip.split(",")))
    quick = args.quick
    repeats = 2 if quick else 5
    accelerator = backend != "cpu"

    results = Results()

    def save() -> None:
        """results.json so far, after each part: a run cut short keeps what it measured."""
        out.mkdir(parents=True, exist_ok=True)
        files.write_json(out / "results.json", results.to_json())

    splits = fit.prepare(load_mnist(args.data_dir))
    peak_sizes = (1024, 2048) if quick else (1024, 2048, 4096) + ((8192,) if accelerator else ())
    peak, peak_n = suite.matmul_peak(results, peak_sizes, repeats)
    yardstick = Yardstick(peak_n)
    if "step" not in skip:
        suite.step(results, splits, repeats)
        save()
    if "epoch" not in skip:
        suite.epoch(results, splits, peak, repeats,
                    variants=("baseline", "l2", "dropout", "l2_dropout"),
                    rngs=("hash", "threefry"), yardstick=yardstick)
        suite.regularisation_costs(results)
        suite.optimizer_cost(results, splits, peak, repeats, yardstick=yardstick)
        save()
    if "sweep" not in skip:
        sizes = (128, 1024) if quick else (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
        suite.epoch(results, splits, peak, max(2, repeats - 2), batch_sizes=sizes,
                    yardstick=yardstick)
        save()
    if "stacks" not in skip:
        stack_repeats = max(2, repeats - 2)
        if quick or not accelerator:
            suite.stacks(results, splits, peak, (1, 2) if quick else (1, 2, 4, 8),
                         stack_repeats, yardstick=yardstick)
        else:  # up to where the vmapped stack saturates the device; N single runs up to 16
            suite.stacks(results, splits, peak, (1, 4, 16), stack_repeats, yardstick=yardstick)
            suite.stacks(results, splits, peak, (64, 256, 1024), stack_repeats,
                         placements=("stack",), yardstick=yardstick)
        save()
    ours = None
    if "study" not in skip:
        ours = suite.study(results, args.data_dir, 2 if quick else 20)
        save()
    if args.peers or args.only_peers:
        only = tuple(args.only_peers.split(",")) if args.only_peers else None
        suite.peers(results, ours, args.data_dir, 2 if quick else 20, only, after_each=save)
    if "scaling" not in skip and not accelerator:
        suite.scaling(results, 4, repeats=2)
    save()
    plot.save(results, out / "benchmarks.png")
    print(f"wrote {out / 'results.json'} and {out / 'benchmarks.png'}")


if __name__ == "__main__":
    main()
