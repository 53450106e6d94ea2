"""One data-parallel measurement in a fresh process, since the number of host devices is fixed
when JAX starts: `python -m benchmarks.scaling --devices 4 --data-parallel 2`.

Prints one JSON line: the epoch's samples/s with each batch of 128 split over the devices.
"""

import argparse
import json
import os


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=4, help="host devices to create (CPU)")
    parser.add_argument("--data-parallel", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")
    import jax

    from benchmarks.harness import time_epochs, timed
    from mnist_jax import fit, placement, programs, stacks
    from mnist_jax.config import VARIANTS, TrainConfig
    from mnist_jax.data import load_mnist

    splits = fit.prepare(load_mnist(args.data_dir))
    config = TrainConfig(data_parallel=args.data_parallel)
    stack = fit.new_stack([VARIANTS["dropout"]], (0,), config)
    mesh = placement.data_mesh(args.data_parallel)
    data = stacks.epoch_data(splits, mesh)
    state = placement.put(stack.state, mesh)
    keys = placement.put(stack.keys, mesh)
    runner, compile_s = timed(programs.runner, stack.model, config, state, keys, data)
    run = runner.epoch
    t = time_epochs(run, state, args.repeats)
    n = len(splits.train_images) + len(splits.val_images)
    print(json.dumps({"devices": jax.device_count(), "data_parallel": args.data_parallel,
                      "global_batch": config.batch_size,
                      "per_device_batch": config.batch_size // args.data_parallel,
                      "samples_per_s": n / t["min_s"], "compile_s": compile_s,
                      "note": "epoch with validation; samples = train + validation",
                      **{k: v for k, v in t.items() if k != "times_s"}}))


if __name__ == "__main__":
    main()
