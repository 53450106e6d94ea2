"""Data parallelism on the four forced CPU devices of this test session, and over two real
processes joined by jax.distributed."""

import json
import re
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnist_jax import fit, optim, placement, programs, stacks
from mnist_jax.config import VARIANTS, TrainConfig
from mnist_jax.errors import ConfigError

from conftest import cli_env
from test_cli import run_cli, run_main


@pytest.fixture(scope="module")
def small(splits):
    return fit.Splits(splits.train_images[:2000], splits.train_labels[:2000],
                      splits.val_images[:1000], splits.val_labels[:1000],
                      splits.test_images[:1000], splits.test_labels[:1000])


def train(small, devices, variants=("dropout",), seeds=(0,), placement="auto", epochs=2):
    config = TrainConfig(epochs=epochs, data_parallel=devices, eval_batch_size=1000,
                         placement=placement)
    stack = fit.new_stack([VARIANTS[v] for v in variants], seeds, config, n_train=3000)
    return fit.fit(stack, small, progress=False)


def test_four_devices_give_the_single_device_history(small):
    assert jax.device_count() == 4
    one, four = train(small, 1), train(small, 4)
    for key, values in one.histories["dropout"][0].items():
        np.testing.assert_allclose(four.histories["dropout"][0][key], values, rtol=1e-5)
    # Adam amplifies float32 rounding where a gradient is tiny: atol is 1% of one lr step.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 placement.to_host(four.state.params), placement.to_host(one.state.params))
    test = fit.evaluate_models(four, small.test_images, small.test_labels)
    np.testing.assert_allclose(test["accuracy"],
                               fit.evaluate_models(one, small.test_images,
                                                   small.test_labels)["accuracy"], rtol=1e-6)


def test_a_vmapped_stack_on_four_devices_gives_its_single_device_history(small):
    """The accelerators' placement: seeds x variants in one vmapped step, its batch split over
    the devices (each model's copy of its seed's batch keeps the split). Compared over one
    epoch (16 steps): all four models then agree to 3e-7. Summed in another order, the
    gradients differ in the last bits, which Adam can amplify: in epoch 2 one of the four
    (baseline, seed 1) forks by 4e-3 in a weight, deterministically, the others stay at 3e-7
    (measured with Keras's Adam). A wrong split or reduction shows from the first step."""
    variants, seeds = ("baseline", "l2_dropout"), (0, 1)
    one = train(small, 1, variants, seeds, placement="stack", epochs=1)
    four = train(small, 4, variants, seeds, placement="stack", epochs=1)
    for name in variants:
        for s in range(len(seeds)):
            for key, values in one.histories[name][s].items():
                np.testing.assert_allclose(four.histories[name][s][key], values, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 placement.to_host(four.state.params), placement.to_host(one.state.params))


def test_the_batch_really_is_split_over_the_devices(small):
    stack = train(small, 4, variants=("baseline", "l2"), seeds=(0, 1))
    kernel = stack.state.params["hidden_1"]["kernel"]
    assert len(kernel.sharding.device_set) == 4 and kernel.sharding.is_fully_replicated
    mesh = placement.data_mesh(4)
    data = stacks.epoch_data(small, mesh)
    assert len(data.images.sharding.device_set) == 4
    sharding = placement.batch_sharding(mesh)
    hlo = programs.train_epoch_jit.lower(
        stack.state, stack.keys, data, jnp.int32(0), model=stack.model,
        tx=optim.for_config(stack.config), batch_size=128,
        batch_sharding=sharding).compile().as_text()
    evaluation = programs.evaluate_rows_jit.lower(
        stack.state, data.images, data.labels, np.int32(0), np.int32(1000),
        model=stack.model, batch_size=1000, batch_sharding=sharding).compile().as_text()
    # The per-device programs compute the hidden activations of a quarter of each batch: 32
    # of 128 training images, 250 of each 1000-image evaluation chunk; the gradients are
    # summed by an all-reduce.
    rows = set(re.findall(r"f32\[(?:\d+,)*(\d+),256\]", hlo))
    assert "32" in rows and "128" not in rows, rows
    rows = set(re.findall(r"f32\[(?:\d+,)*(\d+),256\]", evaluation))
    assert "250" in rows and "1000" not in rows, rows
    assert "all-reduce" in hlo


def test_data_parallel_must_divide_the_batch():
    with pytest.raises(ConfigError, match="multiples of --data-parallel 3"):
        TrainConfig(data_parallel=3).validate()
    with pytest.raises(ConfigError, match="this run sees 4 device"):
        placement.resolve_devices(5)
    assert placement.resolve_devices("all") == 4
    with pytest.raises(ConfigError, match="concurrent .* --data-parallel 2 .* sequential or stack"):
        TrainConfig(data_parallel=2, placement="concurrent").validate()


def test_cli_reports_global_and_per_device_batch(mnist, tmp_path, capsys):
    out = tmp_path / "run"
    assert len(jax.devices()) == 4  # this process's forced host devices
    run_main(capsys, "train", "--variant", "baseline", "--epochs", 1, "--data-parallel", "all",
             "--out", out, "--data-dir", mnist.cache_dir, "--quiet", "--no-compilation-cache")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["parallel"] == {"devices": 4, "processes": 1, "global_batch": 128,
                                   "per_device_batch": 32}
    assert metrics["variants"]["baseline"]["test"]["accuracy"] > 0.95


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_processes(args: list[str], out) -> None:
    """`mnist-jax ARGS --out OUT` as two processes of two devices each, joined through
    jax.distributed on loopback; both must succeed."""
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "mnist_jax.cli", *args, "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=cli_env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                    JAX_PROCESS_ID=str(i),
                    XLA_FLAGS="--xla_force_host_platform_device_count=2"))
        for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]


@pytest.mark.slow
def test_two_processes_match_one(mnist, tmp_path):
    """Two processes of two devices each, joined through jax.distributed on loopback, train
    exactly what one process does on four devices."""
    args = ["train", "--variant", "dropout", "--epochs", "2", "--data-dir",
            str(mnist.cache_dir), "--quiet", "--no-compilation-cache", "--data-parallel", "all"]
    run_cli(*args, "--out", tmp_path / "single",
            XLA_FLAGS="--xla_force_host_platform_device_count=4")
    two_processes(args, tmp_path / "multi")
    single, multi = (json.loads((tmp_path / d / "metrics.json").read_text())
                     for d in ("single", "multi"))
    assert multi["parallel"] == {"devices": 4, "processes": 2, "global_batch": 128,
                                 "per_device_batch": 32}
    assert single["parallel"]["processes"] == 1
    for key, values in single["variants"]["dropout"]["history"].items():
        np.testing.assert_allclose(multi["variants"]["dropout"]["history"][key], values,
                                   rtol=1e-5)
    # After two epochs the test set sees float noise of gloo's all-reduce against XLA's
    # in-process one (other summation order), amplified by training: measured 5.6e-5 in the
    # loss and one digit of 10,000 changing sides. Each process training on its own half
    # would miss by percents.
    test, ref = multi["variants"]["dropout"]["test"], single["variants"]["dropout"]["test"]
    assert test["loss"] == pytest.approx(ref["loss"], rel=2e-4)
    assert abs(test["accuracy"] - ref["accuracy"]) <= 2.01e-4


@pytest.mark.slow
def test_a_sweep_split_over_two_processes_matches_one(mnist, tmp_path):
    """A sweep's models split over 2 processes x 2 devices (jax.distributed on loopback) give
    each model's history as one process with four devices does."""
    args = ["sweep", "--l2", "0,1e-4", "--dropout", "0,0.2", "--no-originals", "--epochs", "1",
            "--chunk", "4", "--model-parallel", "all", "--data-dir", str(mnist.cache_dir),
            "--quiet", "--no-compilation-cache"]
    run_cli(*args, "--out", tmp_path / "single",
            XLA_FLAGS="--xla_force_host_platform_device_count=4")
    two_processes(args, tmp_path / "multi")
    single, multi = (json.loads((tmp_path / d / "metrics.json").read_text())
                     for d in ("single", "multi"))
    assert single["config"]["train"]["model_parallel"] == 4
    assert multi["config"]["train"]["model_parallel"] == 4
    assert list(multi["configurations"]) == list(single["configurations"])
    for name, c in single["configurations"].items():
        for run, ref in zip(multi["configurations"][name]["runs"], c["runs"], strict=True):
            for key, values in ref["history"].items():
                assert run["history"][key] == pytest.approx(values, rel=1e-6), (name, key)
            assert run["test"] == pytest.approx(ref["test"], rel=1e-6)
