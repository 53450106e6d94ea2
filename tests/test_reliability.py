"""Reliability: exact resume after SIGKILL and Ctrl-C, the divergence guard, validation of
every setting before any work, and writes that never leave half a file."""

import ast
import dataclasses
import errno
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from mnist_jax import checkpoint, files, fit, rundir
from mnist_jax.config import VARIANTS, TrainConfig
from mnist_jax.errors import MnistJaxError
from mnist_jax.experiment import ExperimentConfig
from mnist_jax.sweep import SweepConfig

from conftest import cli_env
from test_cli import run_cli, run_main

ARGS = ("train", "--variant", "dropout", "--epochs", 4, "--checkpoint-every", 0)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return {"MNIST_JAX_COMPILATION_CACHE": str(tmp_path_factory.mktemp("xla-cache"))}


@pytest.fixture(scope="module")
def reference(mnist, tmp_path_factory, env):
    """The same run, never interrupted."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run_cli(*ARGS, "--out", out, "--data-dir", mnist.cache_dir, "--quiet", **env)
    return out


def start(out, mnist, env):
    return subprocess.Popen([sys.executable, "-m", "mnist_jax.cli", *map(str, ARGS), "--out",
                             str(out), "--data-dir", str(mnist.cache_dir), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env(**env))


def wait_for_checkpoint(out, epoch, process, timeout=120):
    deadline = time.monotonic() + timeout
    while not (out / "checkpoints" / str(epoch)).is_dir():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)


def final_arrays(out):
    """The arrays of the newest checkpoint, restored as they were saved."""
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    restored = ocp.StandardCheckpointer().restore(
        (out / "checkpoints" / str(steps[-1]) / "arrays").absolute())
    return steps[-1], restored


def assert_same_run(out, reference):
    step, arrays = final_arrays(out)
    ref_step, ref_arrays = final_arrays(reference)
    assert step == ref_step == 4
    flat, ref_flat = (sorted(ocp.tree.to_flat_dict(a).items()) for a in (arrays, ref_arrays))
    assert [k for k, _ in flat] == [k for k, _ in ref_flat]
    for (key, a), (_, b) in zip(flat, ref_flat, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(key))
    metrics, ref = (json.loads((d / "metrics.json").read_text())["variants"]["dropout"]
                    for d in (out, reference))
    assert metrics["history"] == ref["history"]  # bitwise: floats compared exactly
    assert metrics["test"] == ref["test"]


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [0, 1, 3])
def test_sigkill_then_resume_is_bitwise_identical(mnist, tmp_path, env, reference, kill_after):
    out = tmp_path / "run"
    process = start(out, mnist, env)
    if kill_after:
        wait_for_checkpoint(out, kill_after, process)
    else:
        deadline = time.monotonic() + 120
        while not (out / "run.json").exists():  # killed before its first checkpoint
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "run.json never appeared"
            time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    done = run_cli("train", "--resume", out, "--data-dir", mnist.cache_dir, **env)
    assert "resuming after epoch" in done.stderr or "starting from epoch 1" in done.stderr
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    assert_same_run(out, reference)


@pytest.mark.slow
@pytest.mark.parametrize("signum, times", [(signal.SIGINT, 1), (signal.SIGTERM, 1),
                                           (signal.SIGTERM, 2)])
def test_stop_signals_checkpoint_explain_and_resume(mnist, tmp_path, env, reference, signum,
                                                    times):
    """Ctrl-C, and SIGTERM (what SLURM, Kubernetes and spot preemption send before SIGKILL):
    the first finishes the epoch in flight and checkpoints it, a second stops at once. Either
    way the exit code is 128 + the signal, run.json says so, and the resumed run ends bitwise
    equal to one never stopped."""
    out = tmp_path / "run"
    process = start(out, mnist, env)
    wait_for_checkpoint(out, 1, process)
    for _ in range(times):
        process.send_signal(signum)
        time.sleep(0.05)
    _, stderr = process.communicate(timeout=120)
    name = signal.Signals(signum).name
    if times == 1:
        assert process.returncode == 128 + signum, stderr
        assert f"{name}: stopped after epoch" in stderr
        assert f"resume with: mnist-jax train --resume {out}" in stderr  # the run's command
    else:
        # Signals that arrive while the main thread waits on the device are handled once (the
        # OS merges a pending signal's repeats), and one that arrives after the run has
        # stopped, its handler gone, ends the process by the default action: either way the
        # process ends at once, and what it wrote resumes.
        assert process.returncode in (128 + signum, -signum), stderr
    assert "Traceback" not in stderr
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "interrupted" and record["signal"] == name
    assert 1 <= record["epochs_done"] < 4
    assert (out / "checkpoints" / str(record["epochs_done"])).is_dir()
    run_cli("train", "--resume", out, "--data-dir", mnist.cache_dir, "--quiet", **env)
    assert_same_run(out, reference)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 5 MB tmpfs: room for one checkpoint of one trained model (3.2 MB: the weights and
    Adam's two moments), not two. Mounting needs root (CI and the development machines run
    as root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.mark.slow
def test_a_full_disk_stops_with_one_line_and_keeps_the_last_checkpoint(mnist, env, tiny_disk,
                                                                       reference):
    """A real full filesystem under a run: the second checkpoint does not fit."""
    out = tiny_disk / "run"
    done = run_cli(*ARGS, "--out", out, "--data-dir", mnist.cache_dir, "--quiet", check=False,
                   **env)
    assert done.returncode == 74, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"could not write checkpoint {out / 'checkpoints' / '2'}: No space left on device" \
        in lines[0]
    assert f"mnist-jax train --resume {out}" in lines[0]
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "failed" and record["epochs_done"] == 1
    # Space freed (the filesystem grown), the run resumes and ends as if never stopped.
    subprocess.run(["mount", "-o", "remount,size=64m", str(tiny_disk)], check=True)
    run_cli("train", "--resume", out, "--data-dir", mnist.cache_dir, "--quiet", **env)
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    assert_same_run(out, reference)


def test_one_writer_per_run_directory(mnist, tmp_path, capsys):
    """A second process on a run directory is refused, naming the holder; --overwrite does
    not delete a live run's files; a killed holder leaves no stale lock."""
    out = tmp_path / "run"
    common = ("--epochs", 1, "--out", out, "--data-dir", mnist.cache_dir, "--quiet",
              "--no-compilation-cache")
    run_main(capsys, "train", "--variant", "baseline", *common)
    before = (out / "metrics.json").read_bytes()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE,
                              text=True, env=cli_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        done = run_main(capsys, "train", "--variant", "l2", *common, "--overwrite", check=False)
        assert done.returncode == 2, done.stderr
        assert (f"--out {out} is in use by another run (pid {holder.pid} on "
                f"{socket.gethostname()}") in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
        assert (out / "metrics.json").read_bytes() == before
        done = run_main(capsys, "train", "--resume", out, "--no-compilation-cache",
                        check=False)
        assert done.returncode == 2 and "is in use by another run" in done.stderr
    finally:
        holder.kill()
        holder.communicate()
    run_main(capsys, "train", "--variant", "l2", *common, "--overwrite")
    assert list(json.loads((out / "metrics.json").read_text())["variants"]) == ["l2"]


HOLDER = """
import sys, time
from mnist_jax import rundir
with rundir.exclusive(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def no_space_for(monkeypatch, name):
    """Every write of a file called `name` fails as on a full disk."""
    real = files._new_file

    def new_file(path):
        if path.name == name:
            raise OSError(errno.ENOSPC, "No space left on device", str(path.parent / ".tmp"))
        return real(path)

    monkeypatch.setattr(files, "_new_file", new_file)


@pytest.mark.parametrize("name", ["report.md", "metrics.json", "comparison.png",
                                  "history_baseline.csv"])
def test_a_failed_result_write_names_the_file_and_the_cause(mnist, tmp_path, capsys,
                                                            monkeypatch, name):
    out = tmp_path / "run"
    no_space_for(monkeypatch, name)
    done = run_main(capsys, "train", "--variant", "baseline", "--epochs", 1, "--out", out,
                    "--data-dir", mnist.cache_dir, "--quiet", "--no-compilation-cache",
                    check=False)
    assert done.returncode == 74, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    target = out / "figures" / name if name.endswith(".png") else out / name
    assert lines[0].startswith(f"mnist-jax: error: could not write {target}: No space left")
    assert f"mnist-jax train --resume {out}" in lines[0]
    assert not target.exists() and not [p for p in out.rglob("*.tmp*")]
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "failed" and record["epochs_done"] == 1
    monkeypatch.undo()  # space again: the finished run writes its results on resume
    run_main(capsys, "train", "--resume", out, "--quiet", "--no-compilation-cache")
    assert target.exists() and json.loads((out / "run.json").read_text())["status"] == \
        "complete"


def test_a_failed_checkpoint_write_keeps_the_previous_one(mnist, tmp_path, capsys,
                                                          monkeypatch):
    """Orbax reports a full disk as tensorstore words it (a ValueError carrying the errno)."""
    out = tmp_path / "run"
    real = ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
        if step == 2:
            raise ValueError("RESOURCE_EXHAUSTED: Error writing \"x\": Failed to write 15566 "
                             "bytes to file 17: No space left on device [os_error_code='28']")
        return real(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    done = run_main(capsys, "train", "--variant", "baseline", "--epochs", 3, "--out", out,
                    "--data-dir", mnist.cache_dir, "--quiet", "--no-compilation-cache",
                    "--checkpoint-every", 0, check=False)
    assert done.returncode == 74, done.stderr
    assert (f"could not write checkpoint {out / 'checkpoints' / '2'}: No space left on device"
            in done.stderr) and "newest checkpoint is of epoch 1" in done.stderr
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "failed" and record["epochs_done"] == 1
    monkeypatch.undo()
    done = run_main(capsys, "train", "--resume", out, "--no-compilation-cache")
    assert "resuming after epoch 1 of 3" in done.stderr


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_get_the_umask_s_permissions(mnist, tmp_path, capsys, umask):
    """As plain open(..., 'w') would make them: 0644 under umask 022, 0640 under 027, for the
    results, the checkpoints and the MNIST cache alike (they were all 0600)."""
    from mnist_jax import data, idx

    old = os.umask(umask)
    try:
        out = tmp_path / "run"
        run_main(capsys, "train", "--variant", "baseline", "--epochs", 1, "--out", out,
                 "--data-dir", mnist.cache_dir, "--quiet", "--no-compilation-cache")
        raw = {spec.name: (mnist.cache_dir / spec.name).read_bytes() for spec in idx.IDX_FILES}
        data._write_cache(tmp_path / "cache", raw, "test")
    finally:
        os.umask(old)
    written = [p for p in [*out.rglob("*"), *(tmp_path / "cache").iterdir()] if p.is_file()]
    assert len(written) > 20
    modes = {p.relative_to(tmp_path).as_posix(): oct(p.stat().st_mode & 0o777)
             for p in written}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes


def test_divergence_exits_non_zero_and_keeps_nothing_bad(mnist, tmp_path, capsys):
    out = tmp_path / "run"
    done = run_main(capsys, "experiment", "--lr", "1e3", "--epochs", 2, "--out", out,
                    "--data-dir", mnist.cache_dir, "--no-compilation-cache", check=False)
    assert done.returncode == 3, done.stderr
    assert "diverged" in done.stderr and "epoch 1, step" in done.stderr
    assert "variant 'baseline'" in done.stderr and "Traceback" not in done.stderr
    assert json.loads((out / "run.json").read_text())["status"] == "diverged"
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.isdigit()]
    assert not (out / "metrics.json").exists()
    assert "--weight-decay" not in done.stderr  # no decay: only the learning rate to blame


def test_divergence_from_weight_decay_names_it(mnist, tmp_path, capsys):
    """weight_decay * lr = 10: each step multiplies every weight by -9."""
    done = run_main(capsys, "train", "--variant", "baseline", "--weight-decay", "1e4",
                    "--epochs", 1, "--out", tmp_path / "run", "--data-dir", mnist.cache_dir,
                    "--no-compilation-cache", check=False)
    assert done.returncode == 3, done.stderr
    assert "or the weight decay (--weight-decay 10000)" in done.stderr


def test_divergence_keeps_the_last_good_checkpoint(splits, tmp_path):
    small = fit.Splits(splits.train_images[:1000], splits.train_labels[:1000],
                       splits.val_images[:300], splits.val_labels[:300],
                       splits.test_images[:10], splits.test_labels[:10])
    stack = fit.new_stack([VARIANTS["l2"]], (0,), TrainConfig(epochs=3), n_train=1300)
    mgr = checkpoint.manager(tmp_path / "ckpt")
    saved = []

    def save(s):
        checkpoint.save(mgr, s)
        saved.append(s.epochs_done)
        # The learning rate is a traced value in the state: raise it after the first epoch.
        opt = s.state.opt_state
        hyper = {**opt.hyperparams, "learning_rate": opt.hyperparams["learning_rate"] * 1e6}
        s.state = s.state.replace(opt_state=opt._replace(hyperparams=hyper))

    with pytest.raises(fit.TrainingDiverged) as info:
        fit.fit(stack, small, progress=False, on_epoch_end=save)
    assert info.value.epoch == 2 and saved == [1]
    fresh = fit.new_stack([VARIANTS["l2"]], (0,), TrainConfig(epochs=3), n_train=1300)
    restored = checkpoint.restore(mgr, fresh)
    assert restored.epochs_done == 1 and len(restored.histories["l2"][0]["loss"]) == 1
    lr = restored.state.opt_state.hyperparams["learning_rate"][0, 0]
    assert lr == np.float32(1e-3)
    mgr.close()


# Every check a flag's value meets, each with a bad value of its own: (command, args, message).
# {file}: an existing file; {out}: the --out the other rows are given; {run}, {sweep}: the run
# directory of an experiment, of a sweep (their run.json alone); {garbled}: one whose run.json
# is not JSON; {unreadable}: a directory os.access calls unreadable (the tests run as root).
BAD_SETTINGS = [
    # argparse: the type of every flag that takes a number (cli._number)
    ("experiment", ("--epochs", "2.5"), "--epochs '2.5' must be an integer >= 1"),
    ("experiment", ("--batch-size", "x"), "--batch-size 'x' must be an integer >= 1"),
    ("experiment", ("--validation-split", "half"),
     "--validation-split 'half' must be a number in [0, 1)"),
    ("experiment", ("--eval-batch-size", "1.5"), "--eval-batch-size '1.5' must be an integer"),
    ("experiment", ("--l2", "x"), "--l2 'x' must be a finite number >= 0"),
    ("experiment", ("--dropout", "x"), "--dropout 'x' must be a number in [0, 1)"),
    ("experiment", ("--lr", "fast"), "--lr 'fast' must be a finite number >= 0"),
    ("experiment", ("--checkpoint-every", "x"), "--checkpoint-every 'x' must be a number of "
                                                "seconds >= 0"),
    ("train", ("--seed", "x"), "--seed 'x' must be an integer >= 0"),
    ("eda", ("--seed", "x"), "--seed 'x' must be an integer >= 0"),
    ("sweep", ("--samples", "x"), "--samples 'x' must be an integer >= 1"),
    ("sweep", ("--search-seed", "x"), "--search-seed 'x' must be an integer >= 0"),
    ("sweep", ("--chunk", "x"), "--chunk 'x' must be an integer >= 0"),
    # argparse: the choices (config's tables); an alias is named by its flag
    ("experiment", ("--optimizer", "sgd"), "--optimizer 'sgd' must be one of 'keras-adam', "
                                            "'adam'"),
    ("experiment", ("--loss", "mse"), "--loss 'mse' must be one of 'logits', 'clipped'"),
    ("experiment", ("--placement", "fast"), "--placement 'fast' must be one of 'auto', 'stack'"),
    ("experiment", ("--schedule", "fast"), "--placement 'fast' must be one of"),
    ("experiment", ("--dropout-rng", "x"), "--dropout-rng 'x' must be one of 'hash', "
                                            "'threefry'"),
    ("experiment", ("--dtype", "fp8"), "--dtype 'fp8' must be one of 'float32', 'bfloat16'"),
    ("experiment", ("--precision", "fp8"), "--dtype 'fp8' must be one of"),
    ("experiment", ("--matmul-precision", "low"), "--matmul-precision 'low' must be one of "
                                                  "'default', 'highest'"),
    ("sweep", ("--search", "bayes"), "--search 'bayes' must be one of 'grid', 'random', 'tpe'"),
    ("data", ("--source", "ftp"), "--source 'ftp' must be one of 'auto', 'cache'"),
    ("data", ("--verify", "half"), "--verify 'half' must be one of 'quick', 'full'"),
    # config.TrainConfig.validate
    ("experiment", ("--epochs", "0"), "--epochs 0 must be an integer >= 1"),
    ("experiment", ("--validation-split", "1.0"), "--validation-split 1.0 must lie in [0, 1)"),
    ("experiment", ("--validation-split", "-0.3"), "--validation-split -0.3 must lie in [0, 1)"),
    ("experiment", ("--validation-split", "1e-17"),  # 1 - 1e-17 == 1.0: no validation rows
     "--validation-split 1e-17 leaves no training or no validation samples out of 60000"),
    ("experiment", ("--validation-split", "0.99999"),
     "--validation-split 0.99999 leaves no training or no validation samples out of 60000"),
    ("experiment", ("--batch-size", "0"), "--batch-size 0 must be an integer between 1 and 42000"),
    ("experiment", ("--batch-size", "60000"),
     "--batch-size 60000 must be an integer between 1 and 42000"),
    ("experiment", ("--lr", "nan"), "--lr nan must be a finite number >= 0"),
    ("experiment", ("--lr", "-1"), "--lr -1.0 must be a finite number >= 0"),
    ("experiment", ("--eval-batch-size", "0"), "--eval-batch-size 0 must be an integer >= 1"),
    ("experiment", ("--data-parallel", "3"), "--batch-size 128 and --eval-batch-size 2000 must "
                                             "be multiples of --data-parallel 3"),
    ("experiment", ("--data-parallel", "4", "--eval-batch-size", "1002"),
     "--batch-size 128 and --eval-batch-size 1002 must be multiples of --data-parallel 4"),
    ("experiment", ("--placement", "concurrent", "--data-parallel", "2"),
     "--placement concurrent runs several programs at once, which cannot share devices with "
     "--data-parallel 2"),
    ("sweep", ("--model-parallel", "2", "--placement", "sequential"),
     "--model-parallel 2 shards one vmapped stack of models over devices: it needs "
     "--placement stack (or auto) and --data-parallel 1"),
    ("sweep", ("--model-parallel", "2", "--placement", "concurrent"),
     "--model-parallel 2 shards one vmapped stack of models over devices"),
    # config: check_regularisation, select_variants, parse_seeds
    ("experiment", ("--l2", "-0.001"), "--l2 -0.001 must be a finite number >= 0"),
    ("experiment", ("--l2", "inf"), "--l2 inf must be a finite number >= 0"),
    ("experiment", ("--dropout", "1.5"), "--dropout 1.5 must lie in [0, 1)"),
    ("experiment", ("--dropout", "-0.1"), "--dropout -0.1 must lie in [0, 1)"),
    ("experiment", ("--variants", "baseline,huge"), "unknown variant 'huge'; choose from baseline"),
    ("train", ("--variant", "huge"), "unknown variant 'huge'; choose from baseline"),
    ("experiment", ("--variants", "l2,l2"), "--variants lists a variant twice"),
    ("experiment", ("--variants", ","), "--variants is empty; name at least one of baseline"),
    ("experiment", ("--seeds", "0,x"), "--seeds '0,x' must be integers"),
    ("experiment", ("--seeds", "1,1"), "--seeds '1,1' must list distinct integers"),
    ("experiment", ("--seeds", "-1"), "--seeds '-1' must list distinct integers >= 0"),
    ("experiment", ("--seeds", "3-1"), "--seeds '3-1': the range 3-1 is reversed; write 1-3"),
    ("sweep", ("--seeds", "2-1"), "--seeds '2-1': the range 2-1 is reversed"),
    # cli: flags read together, the device counts, --checkpoint-every, resuming
    ("experiment", ("--l2", "0.01", "--variants", "baseline,dropout"),
     "--l2 0.01 changes nothing: no chosen variant (baseline, dropout) has an L2 penalty"),
    ("train", ("--variant", "baseline", "--dropout", "0.2"),
     "--dropout 0.2 changes nothing: no chosen variant (baseline) has dropout"),
    ("train", (), "--variant is required: baseline, l2, dropout or l2_dropout"),
    ("train", ("--variant", "baseline", "--seed", "-1"), "--seed -1 must be an integer >= 0"),
    ("eda", ("--seed", "-1"), "--seed -1 must be an integer >= 0"),
    ("eda", ("--out", "{file}"), "is a file; choose a directory"),
    ("experiment", ("--checkpoint-every", "-1"), "--checkpoint-every -1.0 must be a number of "
                                                 "seconds >= 0"),
    ("experiment", ("--checkpoint-every", "inf"), "--checkpoint-every inf must be a number of "
                                                  "seconds >= 0"),
    ("sweep", ("--checkpoint-every", "nan"), "--checkpoint-every nan must be a number of "),
    ("experiment", ("--data-parallel", "two"), "--data-parallel 'two' must be an integer or 'all'"),
    ("experiment", ("--data-parallel", "5"), "--data-parallel 5: this run sees 4 device(s)"),
    ("experiment", ("--data-parallel", "0"), "--data-parallel 0: this run sees 4 device(s)"),
    ("sweep", ("--model-parallel", "x"), "--model-parallel 'x' must be an integer or 'all'"),
    ("sweep", ("--model-parallel", "5"), "--model-parallel 5: this run sees 4 device(s)"),
    ("sweep", ("--model-parallel", "0"), "--model-parallel 0: this run sees 4 device(s)"),
    ("experiment", ("--hidden", "a"), "--hidden 'a' must be widths separated by commas"),
    ("experiment", ("--hidden", "256,0"), "--hidden 256,0 must be 1 to 8 widths, each an "
                                          "integer from 1 to 8192"),
    ("experiment", ("--hidden", "9000"), "--hidden 9000 must be 1 to 8 widths"),
    ("experiment", ("--hidden", ",".join(["8"] * 9)), "--hidden 8,8,8,8,8,8,8,8,8 must be 1 "
                                                      "to 8 widths"),
    ("experiment", ("--weight-decay", "x"), "--weight-decay 'x' must be a finite number >= 0"),
    ("experiment", ("--weight-decay", "-0.5"), "--weight-decay -0.5 must be a finite number "
                                               ">= 0 (each step removes"),
    ("experiment", ("--weight-decay", "0.01", "--lr", "0"),
     "--weight-decay 0.01 changes nothing with --lr 0"),
    ("experiment", ("--weight-decay-on", "kernels"),
     "--weight-decay-on kernels changes nothing without a --weight-decay above 0"),
    ("sweep", ("--weight-decay-on", "kernels"),
     "--weight-decay-on kernels changes nothing without a --weight-decay above 0"),
    ("experiment", ("--hidden", "256,256", "--hidden", "512,512"),
     "--hidden given 2 times (256,256 512,512): a run trains one architecture; compare "
     "several with mnist-jax sweep"),
    ("sweep", ("--hidden", "64", "--hidden", "32", "--hidden", "64"),
     "--hidden 64 --hidden 32 --hidden 64: an architecture is given twice"),
    ("sweep", ("--search", "tpe", "--hidden", "64", "--hidden", "32"),
     "--search tpe sweeps one architecture; use --search grid or random"),
    ("sweep", ("--hidden", "64", "--hidden", "32,0"), "--hidden 32,0 must be 1 to 8 widths"),
    ("sweep", ("--hidden", "64,64", "--hidden", "32", "--l2-layers", "hidden_2"),
     "--l2-layers hidden_2 (architecture 32): name one or more of hidden_1,output"),
    ("experiment", ("--weight-decay-on", "biases"),
     "--weight-decay-on 'biases' must be one of 'all', 'kernels'"),
    ("sweep", ("--weight-decay", "0,x"),
     "--weight-decay '0,x' must be numbers separated by commas"),
    ("sweep", ("--weight-decay", "0,-1"), "--weight-decay -1.0 must be a finite number >= 0"),
    ("sweep", ("--weight-decay", ","), "--weight-decay is empty; give at least one value"),
    ("sweep", ("--weight-decay", "0,0"), "--weight-decay 0,0 lists a value twice"),
    ("sweep", ("--search", "random", "--weight-decay", "0,1e-3"),
     "--weight-decay 0,0.001: --search random takes one weight decay; sweep it with --search "
     "grid"),
    ("sweep", ("--l2", "0,x"), "--l2 '0,x' must be numbers separated by commas"),
    ("sweep", ("--dropout", "0,x"), "--dropout '0,x' must be numbers separated by commas"),
    ("sweep", ("--lr", "x"), "--lr 'x' must be numbers separated by commas"),
    ("experiment", ("--resume", "{run}", "--epochs", "2"),
     "--epochs 2 differs from the resumed run's 20; leave it out when resuming"),
    ("sweep", ("--resume", "{sweep}", "--samples", "3"),
     "--samples 3 differs from the resumed sweep's 16; leave it out when resuming"),
    ("experiment", ("--resume", "{run}", "--out", "{out}"),
     "give either --out (a new run) or --resume DIR, not both"),
    # sweep.SweepConfig.validate
    ("sweep", ("--l2-layers", "hidden_3"), "--l2-layers hidden_3: name one or more of"),
    ("sweep", ("--l2-layers", ","),
     "--l2-layers (none): name one or more of hidden_1,hidden_2,output"),
    ("sweep", ("--dropout-layers", "output"), "--dropout-layers output: name one or more of"),
    ("sweep", ("--dropout-layers", ","),
     "--dropout-layers (none): name one or more of hidden_1,hidden_2"),
    ("sweep", ("--l2", ","), "--l2 is empty; give at least one value"),
    ("sweep", ("--dropout", ","), "--dropout is empty; give at least one value"),
    ("sweep", ("--lr", ","), "--lr is empty; give at least one value"),
    ("sweep", ("--search", "random", "--l2", "0,1e-5,1e-4"),
     "--l2 0,1e-05,0.0001: --search random takes a range low,high or one fixed value"),
    ("sweep", ("--search", "random", "--dropout", "0,0.2,0.4"),
     "--dropout 0,0.2,0.4: --search random takes a range low,high"),
    ("sweep", ("--search", "tpe", "--lr", "1e-4,1e-3,1e-2"),
     "--lr 0.0001,0.001,0.01: --search tpe takes a range low,high"),
    ("sweep", ("--l2", "0,0"), "--l2 0,0 lists a value twice"),
    ("sweep", ("--dropout", "0,0"), "--dropout 0,0 lists a value twice"),
    ("sweep", ("--lr", "1e-3,1e-3"), "--lr 0.001,0.001 lists a value twice"),
    ("sweep", ("--l2", "0,-1e-3"), "--l2 -0.001 must be a finite number >= 0"),
    ("sweep", ("--dropout", "0,1"), "--dropout 1.0 must lie in [0, 1)"),
    ("sweep", ("--lr", "0"), "--lr 0.0 must be a finite number > 0"),
    ("sweep", ("--lr", "inf"), "--lr inf must be a finite number > 0"),
    ("sweep", ("--search", "random", "--l2", "1e-2,1e-6"),
     "--l2 0.01,1e-06: the range must be low,high with low < high"),
    ("sweep", ("--search", "tpe", "--dropout", "0.5,0.1"),
     "--dropout 0.5,0.1: the range must be low,high"),
    ("sweep", ("--search", "random", "--lr", "1e-2,1e-4"),
     "--lr 0.01,0.0001: the range must be low,high"),
    ("sweep", ("--search", "random", "--l2", "0,1e-3"), "so the range must lie above 0"),
    ("sweep", ("--samples", "0", "--search", "random"), "--samples 0 must be an integer >= 1"),
    ("sweep", ("--chunk", "-1"), "--chunk -1 must be an integer >= 0 (0: automatic)"),
    ("sweep", ("--chunk", "3", "--model-parallel", "2", "--placement", "stack"),
     "--chunk 3 must be a multiple of --model-parallel 2"),
    ("sweep", ("--search-seed", "-1"), "--search-seed -1 must be an integer >= 0"),
    # experiment: the run directory; rundir.exclusive
    ("experiment", ("--out", "{file}"), "is a file; choose a directory"),
    ("sweep", ("--out", "{file}"), "is a file; choose a directory"),
    ("experiment", ("--out", "{file}/run"),
     "/run is not writable (Not a directory); choose another --out"),
    ("experiment", ("--out", "{run}"),
     "already holds a run; choose another --out, continue it with --resume"),
    ("experiment", ("--resume", "/nonexistent/run"),
     "--resume /nonexistent/run: there is no run there"),
    ("sweep", ("--resume", "/nonexistent/run"), "--resume /nonexistent/run: there is no run"),
    ("experiment", ("--resume", "{file}"), "is a file; give the run's directory"),
    ("experiment", ("--resume", "{sweep}"),
     "holds a run of `mnist-jax sweep`; resume it with: mnist-jax sweep --resume"),
    ("sweep", ("--resume", "{run}"),
     "holds a run of `mnist-jax experiment`; resume it with: mnist-jax experiment --resume"),
    ("experiment", ("--resume", "{garbled}"), "run.json is unreadable (Expecting property name"),
    # predict, evaluate, export: a finished run's models
    ("predict", ("--run", "{file}", "{file}"), "is not a directory; give a run's directory "
                                               "(the --out of"),
    ("predict", ("--run", "{finished}", "--variant", "nope", "{file}"),
     "--variant nope: the run in"),
    ("predict", ("--run", "{finished}", "--seed", "x", "{file}"), "--seed 'x' must be an "
                                                                  "integer"),
    ("predict", ("--run", "{finished}", "--seed", "9", "{file}"),
     "has seeds 0; choose one of them"),
    ("predict", ("--run", "{finished}", "--invert", "maybe", "{file}"),
     "--invert 'maybe' must be one of 'auto', 'yes', 'no'"),
    ("evaluate", ("--run", "{run}"), "is not finished (status: interrupted); finish it with: "
                                     "mnist-jax experiment --resume"),
    ("evaluate", ("--run", "{finished}", "--variant", "nope"), "--variant nope: the run in"),
    ("evaluate", ("--run", "{finished}", "--seed", "9"), "--seed 9: the run in"),
    ("evaluate", ("--run", "{finished}", "--data-dir", "{file}"),
     "is not a directory; pass a directory to --data-dir"),
    ("export", ("--run", "{finished}", "--format", "tflite", "--out", "{out}"),
     "--format 'tflite' must be one of 'keras', 'onnx', 'jax'"),
    ("export", ("--run", "{finished}", "--format", "jax", "--out", "{file}"),
     "exists; choose another --out or add --overwrite"),
    ("export", ("--run", "{finished}", "--format", "jax", "--out", "{run}"),
     "is a directory; give the file to write"),
    ("export", ("--run", "{garbled}", "--format", "jax", "--out", "{out}"),
     "garbled/run.json is unreadable"),
    ("export", ("--run", "{finished}", "--variant", "nope", "--format", "jax", "--out",
                "{out}"), "--variant nope: the run in"),
    ("export", ("--run", "{finished}", "--seed", "9", "--format", "jax", "--out", "{out}"),
     "--seed 9: the run in"),
    # data.check_data_dir
    ("experiment", ("--data-dir", "/nonexistent/mnist"),
     "data directory /nonexistent/mnist does not exist"),
    ("sweep", ("--data-dir", "/nonexistent/mnist"), "data directory /nonexistent/mnist does not"),
    ("eda", ("--data-dir", "/nonexistent/mnist"), "data directory /nonexistent/mnist does not"),
    ("data", ("--data-dir", "/nonexistent/mnist"), "data directory /nonexistent/mnist does not"),
    ("experiment", ("--data-dir", "{file}"), "is not a directory; pass a directory to --data-dir"),
    ("experiment", ("--data-dir", "{unreadable}"),
     "is not readable; fix its permissions or choose another --data-dir"),
]
IDS = [" ".join((c, *a)) for c, a, _ in BAD_SETTINGS]
# Raised where no row can reach: (module, function, part of the raise's source, why).
UNREACHABLE = [
    ("config", "Variant.with_values", "has no L2 penalty",
     "select_variants gives --l2 only to variants with a penalty; a sweep builds Variants"),
    ("config", "Variant.with_values", "has no dropout", "as for --l2"),
    ("config", "resolve_layers", "the model's layers are",
     "SweepConfig.validate catches it and names --l2-layers or --dropout-layers itself"),
    ("config", "Variant.validate", "{field} names {e}", "the built-in variants name layer "
     "groups every depth has, and SweepConfig.validate checks --l2-layers and "
     "--dropout-layers first"),
    ("config", "Variant.validate", "(variant {self.name!r}) must be a finite",
     "built-in variants have no learning rate; SweepConfig.validate checks --lr first"),
    ("config", "TrainConfig.validate", "must be one of {', '.join(choices)}",
     "--optimizer, --loss, --dtype and --matmul-precision: argparse's choices refuse first"),
    ("config", "TrainConfig.validate", "--placement {self.placement!r}", "argparse's choices"),
    ("config", "TrainConfig.validate", "--dropout-rng {self.dropout_rng!r}",
     "argparse's choices"),
    ("config", "TrainConfig.validate", "Adam {flag}", "b1 and b2 are no flags"),
    ("config", "TrainConfig.validate", "Adam eps", "eps is no flag"),
    ("config", "check_seeds", "must be distinct", "parse_seeds refuses the same seeds first"),
    ("rundir", "exclusive", "is in use by another run",
     "no bad value: a second live process; the lock tests above hold it"),
    ("rundir", "prepare", "is a file", "rundir.hold refuses it first"),
    ("rundir", "prepare", "started with another config",
     "the CLI resumes a run with the config it recorded"),
    ("rundir", "prepare", "is not writable",
     "rundir.exclusive has just made the directory and its lock, or refused it"),
    ("sweep", "SweepConfig.validate", "--search {self.search!r}", "argparse's choices"),
    ("sweep", "SweepConfig.validate", "needs Optuna", "Optuna is installed with the tests"),
]
# Where the meta-test looks for raise sites: each module, all of it or one function.
SCOPE = {"config": "", "cli": "", "experiment": "", "rundir": "", "sweep": "SweepConfig.validate",
         "data": "check_data_dir"}
REACHED: dict[str, tuple | None] = {}  # row id -> where its error was raised, once run


def run_bad_setting(tmp_path, capsys, monkeypatch, command, args, message):
    """One row, through the CLI's own entry point in this process (its four test devices);
    returns where the error it printed was raised: (file, function, line), or None for
    argparse's. The process boundary is checked once below."""
    out = tmp_path / "out"
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "file").write_text("not a directory")
    places = {"file": tmp_path / "file", "out": out, "run": tmp_path / "run",
              "sweep": tmp_path / "sweep", "garbled": tmp_path / "garbled",
              "unreadable": tmp_path / "unreadable"}
    for name, config, command_of in (("run", ExperimentConfig(), "experiment"),
                                     ("sweep", SweepConfig(), "sweep")):
        places[name].mkdir()
        files.write_json(places[name] / "run.json", {"config": config.to_dict(),
                                                     "command": command_of,
                                                     "status": "interrupted"})
    places["finished"] = finished = tmp_path / "finished"
    finished.mkdir()
    files.write_json(finished / "run.json", {
        "config": ExperimentConfig(variants=("baseline",)).to_dict(), "command": "experiment",
        "status": "complete"})
    files.write_json(finished / "metrics.json", {"best_variant": "baseline", "variants": {
        "baseline": {"variant": dataclasses.asdict(VARIANTS["baseline"]), "runs": [
            {"seed": 0, "history": {"val_accuracy": [0.9]}, "test": {"accuracy": 0.9}}]}}})
    places["garbled"].mkdir()
    (places["garbled"] / "run.json").write_text("{")
    places["unreadable"].mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: str(path) != str(
        places["unreadable"]) and access(path, mode, **kw))
    for name, path in places.items():
        args = tuple(a.replace(f"{{{name}}}", str(path)) for a in args)
    # Every row of train, experiment and sweep: the compilation cache, once on, would stay on
    # for every later test (the rows with their own --out or --resume turned it on).
    trains = command in ("train", "experiment", "sweep")
    extra = ("--no-compilation-cache",) if trains else ()
    if command in ("eda", "train", "experiment", "sweep") and "--out" not in args \
            and "--resume" not in args:
        extra += ("--out", out)
    before = snapshot(tmp_path)
    made = errors_made(monkeypatch)
    done = run_main(capsys, command, *args, *extra, check=False)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert done.stderr.startswith("mnist-jax: error: ") and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    # select_variants words it for --variants and train's --variant (and Python) alike.
    assert " --" in done.stderr or "unknown variant" in done.stderr, "names no flag"
    assert not out.exists() and snapshot(tmp_path) == before, "written before the check"
    line = done.stderr.strip()
    return next((site for error, site in reversed(made)
                 if line == f"mnist-jax: error: {error}"), None)


def snapshot(directory):
    """Every file and folder under `directory` but the run directories' locks, with content."""
    return {p: p.read_bytes() if p.is_file() else None for p in sorted(directory.rglob("*"))
            if p.name != rundir.LOCK_FILE}


def errors_made(monkeypatch):
    """[(error, (file, function, line))]: each of the project's errors made from now on."""
    made = []
    init = MnistJaxError.__init__

    def record(self, *args, **kwargs):
        caller = sys._getframe(1)
        made.append((self, (os.path.realpath(caller.f_code.co_filename),
                            caller.f_code.co_qualname, caller.f_lineno)))
        init(self, *args, **kwargs)

    monkeypatch.setattr(MnistJaxError, "__init__", record)
    return made


@pytest.mark.parametrize("command, args, message", BAD_SETTINGS, ids=IDS)
def test_bad_settings_fail_at_once_with_one_line_naming_the_flag(tmp_path, capsys, monkeypatch,
                                                                  command, args, message):
    """Exit 2, one line naming the flag, nothing written: before any work."""
    REACHED[" ".join((command, *args))] = run_bad_setting(tmp_path, capsys, monkeypatch,
                                                          command, args, message)


def raise_sites(module, within: str):
    """[(function, first line, last line, source)] of each `raise ConfigError(...)` or
    `raise DataError(...)` in `module`, in functions whose qualified name starts `within`."""
    source = Path(module.__file__).read_text()
    lines = source.splitlines()
    sites, stack = [], []

    class Visit(ast.NodeVisitor):
        def visit_ClassDef(self, node):
            stack.append(node.name)
            self.generic_visit(node)
            stack.pop()

        def visit_FunctionDef(self, node):
            stack.extend((node.name, "<locals>"))
            self.generic_visit(node)
            del stack[-2:]

        def visit_Raise(self, node):
            call = node.exc
            if isinstance(call, ast.Call) and getattr(call.func, "id", "") in (
                    "ConfigError", "DataError"):
                function = ".".join(stack[:-1] if stack[-1:] == ["<locals>"] else stack)
                if function.startswith(within):
                    sites.append((function, node.lineno, node.end_lineno,
                                  "\n".join(lines[node.lineno - 1:node.end_lineno])))

    Visit().visit(ast.parse(source))
    return sites


def test_every_check_a_flag_can_reach_has_a_row(tmp_path, capsys, monkeypatch):
    """Each raise of a ConfigError or DataError in config.py, cli.py, experiment.py,
    SweepConfig.validate and check_data_dir is where some row's error came from, or is listed
    in UNREACHABLE with the reason; a new check without a row fails here. (A raise serving
    several flags, `integer` say, counts once: the rows give each flag its own.)"""
    assert len(set(IDS)) == len(IDS)
    for i, (command, args, message) in enumerate(BAD_SETTINGS):
        if IDS[i] not in REACHED:  # not run yet in this process (-k, another worker)
            with monkeypatch.context() as patch:
                REACHED[IDS[i]] = run_bad_setting(tmp_path / str(i), capsys, patch, command,
                                                  args, message)
    unexplained, listed = [], set()
    for name, within in SCOPE.items():
        module = importlib.import_module(f"mnist_jax.{name}")
        path = os.path.realpath(module.__file__)
        for function, first, last, text in raise_sites(module, within):
            rows = [row for row, site in REACHED.items() if site is not None
                    and site[:2] == (path, function) and first <= site[2] <= last]
            why = [u for u in UNREACHABLE if u[:2] == (name, function) and u[2] in text]
            listed.update(why)
            assert not (rows and why), (f"{name}.{function} line {first} is reached by "
                                        f"{rows}: take it out of UNREACHABLE")
            if not rows and not why:
                unexplained.append(f"{name}.{function} line {first}: {text.splitlines()[0]}")
    assert not unexplained, "no row reaches:\n" + "\n".join(unexplained)
    assert listed == set(UNREACHABLE), set(UNREACHABLE) - listed  # no stale entries


def test_every_flag_that_takes_a_value_has_a_bad_value_case():
    """A new flag without a row above fails here: every flag keeps the one-line promise."""
    from mnist_jax import cli

    commands = cli.build_parser()._subparsers._group_actions[0].choices
    covered = {(c, a) for c, args, _ in BAD_SETTINGS for a in args if a.startswith("--")}
    # A flag and its aliases (--placement, --schedule) are one action: a row for either.
    missing = [(name, action.option_strings[0]) for name, parser in commands.items()
               for action in parser._actions
               if action.nargs != 0 and action.option_strings  # not FILE...
               and action.option_strings[0].startswith("--")
               and not {(name, flag) for flag in action.option_strings} & (covered | NO_BAD_VALUE)]
    assert not missing, missing


# `train`'s and `sweep`'s flags that are `experiment`'s (cli._common, cli._training,
# cli._fit_flags, cli._output): the rows above cover them.
NO_BAD_VALUE = {("train", "--out"), ("train", "--resume"), ("train", "--data-dir"),
                ("train", "--epochs"), ("train", "--batch-size"), ("train", "--validation-split"),
                ("train", "--l2"), ("train", "--dropout"), ("train", "--lr"),
                ("train", "--optimizer"), ("train", "--loss"), ("train", "--eval-batch-size"),
                ("train", "--data-parallel"), ("train", "--placement"), ("train", "--dropout-rng"),
                ("train", "--checkpoint-every"), ("train", "--dtype"),
                ("train", "--matmul-precision"), ("sweep", "--dtype"),
                ("train", "--hidden"), ("train", "--weight-decay"),
                ("train", "--weight-decay-on"), ("sweep", "--hidden"),
                ("sweep", "--matmul-precision"),
                *(("sweep", flag) for flag in (
                    "--epochs", "--batch-size", "--validation-split", "--optimizer", "--loss",
                    "--eval-batch-size", "--placement", "--dropout-rng"))}


def test_a_bad_setting_exits_the_process_with_2_and_no_traceback(tmp_path):
    out = tmp_path / "out"
    done = run_cli("experiment", "--dropout", "1.5", "--out", out, check=False, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("mnist-jax: error: --dropout 1.5 must lie in [0, 1)")
    assert "Traceback" not in done.stderr and not out.exists()


def test_an_existing_run_is_never_overwritten_by_accident(mnist, tmp_path, capsys):
    out = tmp_path / "run"
    common = ("--epochs", 1, "--out", out, "--data-dir", mnist.cache_dir, "--quiet",
              "--no-compilation-cache")
    run_main(capsys, "train", "--variant", "baseline", *common)
    before = (out / "metrics.json").read_bytes()
    done = run_main(capsys, "experiment", *common, check=False)
    assert done.returncode == 2 and "already holds a run" in done.stderr
    assert "--overwrite" in done.stderr and (out / "metrics.json").read_bytes() == before
    run_main(capsys, "train", "--variant", "l2", *common, "--overwrite")
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["variants"]) == ["l2"]
    assert not (out / "history_baseline.csv").exists()


def test_resuming_a_finished_run_says_so_and_trains_nothing(mnist, tmp_path, capsys):
    out = tmp_path / "run"
    run_main(capsys, "train", "--variant", "baseline", "--epochs", 1, "--out", out,
             "--data-dir", mnist.cache_dir, "--quiet", "--no-compilation-cache")
    results = [p for p in out.rglob("*") if p.is_file() and p.name != ".lock"]
    before = {p: p.read_bytes() for p in results}
    done = run_main(capsys, "train", "--resume", out, "--no-compilation-cache")
    assert f"the run in {out} is complete (1 of 1 epochs): nothing to resume" in done.stderr
    assert "compiled in" not in done.stderr and "trained in" not in done.stderr
    assert "baseline" in done.stdout and f"report: {out / 'report.md'}" in done.stdout
    assert {p: p.read_bytes() for p in results} == before  # the lock alone names its holder


def test_resume_refuses_other_settings(mnist, tmp_path, capsys):
    out = tmp_path / "run"
    run_main(capsys, "train", "--variant", "baseline", "--epochs", 1, "--out", out,
             "--data-dir", mnist.cache_dir, "--quiet", "--no-compilation-cache")
    done = run_main(capsys, "experiment", "--resume", out, "--epochs", 2,
                    "--no-compilation-cache", check=False)
    assert done.returncode == 2 and "--epochs 2 differs from the resumed run's 1" in done.stderr


WRITER = """
import sys
from mnist_jax import files
path, size = sys.argv[1], int(sys.argv[2])
print("ready", flush=True)
i = 0
while True:
    i += 1
    files.write_bytes(path, bytes([i % 256]) * size)
"""


def test_a_killed_write_leaves_the_old_file_whole(tmp_path):
    path = tmp_path / "metrics.json"
    size = 20_000_000
    files.write_bytes(path, b"\x00" * size)
    for delay in (0.05, 0.13, 0.31):
        with subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(size)],
                              stdout=subprocess.PIPE, text=True, env=cli_env()) as writer:
            assert writer.stdout.readline().strip() == "ready"
            time.sleep(delay)
            writer.send_signal(signal.SIGKILL)
        content = path.read_bytes()
        assert len(content) == size and content == content[:1] * size, "half-written file"
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == [path.name]


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "report.md"
    files.write_text(path, "old")

    def fail(*args):
        raise OSError("no space left on device")

    monkeypatch.setattr(files.os, "replace", fail)
    with pytest.raises(OSError, match="no space"):
        files.write_text(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_checkpoints_are_saved_by_time_and_at_the_end(mnist, tmp_path, capsys, monkeypatch):
    """By default a checkpoint is due 10 s after the last: a 3-epoch run of a second or two
    saves only its last epoch; with a clock that jumps 11 s an epoch, every epoch."""
    import itertools

    out = tmp_path / "run"
    common = ("train", "--variant", "baseline", "--epochs", 3, "--data-dir", mnist.cache_dir,
              "--quiet", "--no-compilation-cache")
    run_main(capsys, *common, "--out", out)
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["3"]
    ticks = itertools.count(0.0, 11.0)
    monkeypatch.setattr(checkpoint.time, "monotonic", lambda: next(ticks))
    run_main(capsys, *common, "--out", tmp_path / "run2")
    assert sorted(p.name for p in (tmp_path / "run2" / "checkpoints").iterdir()
                  if p.name.isdigit()) == ["2", "3"]  # orbax keeps the newest two
