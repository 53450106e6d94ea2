"""Reliability: exact resume after SIGKILL and Ctrl-C, the divergence guard, validation of
every setting before any work, and writes that never leave half a file."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from mnist_jax import checkpoint, files, fit
from mnist_jax.config import VARIANTS, TrainConfig

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
from mnist_jax import files
with files.exclusive(sys.argv[1]):
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


BAD_SETTINGS = [  # (command, args, message); {file} is an existing file
    ("experiment", ("--dropout", "1.5"), "--dropout 1.5 must lie in [0, 1)"),
    ("experiment", ("--dropout", "-0.1"), "--dropout -0.1 must lie in [0, 1)"),
    ("experiment", ("--dropout", "x"), "--dropout 'x' must be a number in [0, 1)"),
    ("experiment", ("--l2", "-0.001"), "--l2 -0.001 must be a finite number >= 0"),
    ("experiment", ("--l2", "x"), "--l2 'x' must be a finite number >= 0"),
    ("experiment", ("--l2", "0.01", "--variants", "baseline,dropout"),
     "--l2 0.01 changes nothing: no chosen variant (baseline, dropout) has an L2 penalty"),
    ("experiment", ("--batch-size", "0"), "--batch-size 0 must be an integer between 1 and 42000"),
    ("experiment", ("--batch-size", "60000"),
     "--batch-size 60000 must be an integer between 1 and 42000"),
    ("experiment", ("--batch-size", "x"), "--batch-size 'x' must be an integer >= 1"),
    ("experiment", ("--epochs", "0"), "--epochs 0 must be an integer >= 1"),
    ("experiment", ("--epochs", "2.5"), "--epochs '2.5' must be an integer >= 1"),
    ("experiment", ("--validation-split", "1.0"), "--validation-split 1.0 must lie in [0, 1)"),
    ("experiment", ("--validation-split", "-0.3"), "--validation-split -0.3 must lie in [0, 1)"),
    ("experiment", ("--validation-split", "half"),
     "--validation-split 'half' must be a number in [0, 1)"),
    ("experiment", ("--validation-split", "1e-17"),  # 1 - 1e-17 == 1.0: no validation rows
     "--validation-split 1e-17 leaves no training or no validation samples out of 60000"),
    ("experiment", ("--validation-split", "0.99999"),
     "--validation-split 0.99999 leaves no training or no validation samples out of 60000"),
    ("experiment", ("--lr", "nan"), "--lr nan must be a finite number >= 0"),
    ("experiment", ("--lr", "fast"), "--lr 'fast' must be a finite number >= 0"),
    ("experiment", ("--optimizer", "sgd"), "--optimizer 'sgd' must be one of 'keras-adam', "
                                            "'adam'"),
    ("experiment", ("--loss", "mse"), "--loss 'mse' must be one of 'logits', 'clipped'"),
    ("experiment", ("--dtype", "fp8"), "--dtype 'fp8' must be one of 'float32', 'bfloat16'"),
    ("experiment", ("--precision", "fp8"), "--dtype 'fp8' must be one of"),  # the alias
    ("experiment", ("--matmul-precision", "low"), "--matmul-precision 'low' must be one of "
                                                  "'default', 'highest'"),
    ("experiment", ("--placement", "fast"), "--placement 'fast' must be one of 'auto', 'stack'"),
    ("experiment", ("--schedule", "fast"), "--placement 'fast' must be one of"),  # the alias
    ("experiment", ("--dropout-rng", "x"), "--dropout-rng 'x' must be one of 'hash', "
                                            "'threefry'"),
    ("experiment", ("--variants", "baseline,huge"), "unknown variant 'huge'; choose from baseline"),
    ("experiment", ("--variants", "l2,l2"), "--variants lists a variant twice"),
    ("experiment", ("--seeds", "0,x"), "--seeds '0,x' must be integers"),
    ("experiment", ("--seeds", "1,1"), "--seeds '1,1' must list distinct integers"),
    ("experiment", ("--seeds", "3-1"), "--seeds '3-1': the range 3-1 is reversed; write 1-3"),
    ("experiment", ("--eval-batch-size", "0"), "--eval-batch-size 0 must be an integer >= 1"),
    ("experiment", ("--eval-batch-size", "1.5"), "--eval-batch-size '1.5' must be an integer"),
    ("experiment", ("--data-parallel", "5"), "--data-parallel 5: this run sees 4 device(s)"),
    ("experiment", ("--data-parallel", "two"), "--data-parallel 'two' must be an integer or 'all'"),
    ("experiment", ("--checkpoint-every", "-1"), "--checkpoint-every -1.0 must be a number of "
                                                 "seconds >= 0"),
    ("experiment", ("--checkpoint-every", "x"), "--checkpoint-every 'x' must be a number of "
                                                "seconds >= 0"),
    ("sweep", ("--checkpoint-every", "nan"), "--checkpoint-every nan must be a number of "),
    ("experiment", ("--data-dir", "/nonexistent/mnist"),
     "data directory /nonexistent/mnist does not exist"),
    ("experiment", ("--out", "{file}"), "is a file; choose a directory"),
    ("experiment", ("--resume", "/nonexistent/run"),
     "--resume /nonexistent/run: there is no run there"),
    ("experiment", ("--resume", "{file}"), "is a file; give the run's directory"),
    ("train", ("--variant", "huge"), "unknown variant 'huge'; choose from baseline"),
    ("train", ("--seed", "x"), "--seed 'x' must be an integer >= 0"),
    ("train", ("--seed", "-1"), "--seed -1 must be an integer >= 0"),
    ("train", ("--variant", "baseline", "--dropout", "0.2"),
     "--dropout 0.2 changes nothing: no chosen variant (baseline) has dropout"),
    ("eda", ("--seed", "x"), "--seed 'x' must be an integer >= 0"),
    ("eda", ("--seed", "-1"), "--seed -1 must be an integer >= 0"),
    ("eda", ("--out", "{file}"), "is a file; choose a directory"),
    ("sweep", ("--search", "bayes"), "--search 'bayes' must be one of 'grid', 'random', 'tpe'"),
    ("sweep", ("--l2", "0,x"), "--l2 '0,x' must be numbers separated by commas"),
    ("sweep", ("--l2", "0,-1e-3"), "--l2 -0.001 must be a finite number >= 0"),
    ("sweep", ("--l2", "0,0"), "--l2 0,0 lists a value twice"),
    ("sweep", ("--dropout", "0,1"), "--dropout 1.0 must lie in [0, 1)"),
    ("sweep", ("--lr", "0"), "--lr 0.0 must be a finite number > 0"),
    ("sweep", ("--l2-layers", "hidden_3"), "--l2-layers hidden_3: name one or more of"),
    ("sweep", ("--dropout-layers", "output"), "--dropout-layers output: name one or more of"),
    ("sweep", ("--samples", "0", "--search", "random"), "--samples 0 must be an integer >= 1"),
    ("sweep", ("--samples", "x"), "--samples 'x' must be an integer >= 1"),
    ("sweep", ("--search-seed", "-1"), "--search-seed -1 must be an integer >= 0"),
    ("sweep", ("--seeds", "2-1"), "--seeds '2-1': the range 2-1 is reversed"),
    ("sweep", ("--chunk", "-1"), "--chunk -1 must be an integer >= 0 (0: automatic)"),
    ("sweep", ("--model-parallel", "5"), "--model-parallel 5: this run sees 4 device(s)"),
    ("sweep", ("--chunk", "3", "--model-parallel", "2", "--placement", "stack"),
     "--chunk 3 must be a multiple of --model-parallel 2"),
    ("sweep", ("--search", "random", "--l2", "0,1e-3"), "so the range must lie above 0"),
    ("sweep", ("--search", "tpe", "--dropout", "0.5,0.1"), "the range must be low,high"),
    ("sweep", ("--out", "{file}"), "is a file; choose a directory"),
    ("sweep", ("--resume", "/nonexistent/run"), "--resume /nonexistent/run: there is no run"),
    ("sweep", ("--data-dir", "/nonexistent/mnist"), "data directory /nonexistent/mnist does not"),
    ("data", ("--source", "ftp"), "--source 'ftp' must be one of 'auto', 'cache'"),
    ("data", ("--verify", "half"), "--verify 'half' must be one of 'quick', 'full'"),
]


@pytest.mark.parametrize("command, args, message", BAD_SETTINGS,
                         ids=[" ".join((c, *a)) for c, a, _ in BAD_SETTINGS])
def test_bad_settings_fail_at_once_with_one_line_naming_the_flag(tmp_path, capsys, command,
                                                                  args, message):
    # In this process (its four test devices), through the CLI's own entry point; the
    # process boundary is checked once below.
    out = tmp_path / "out"
    (tmp_path / "file").write_text("not a directory")
    args = tuple(a.replace("{file}", str(tmp_path / "file")) for a in args)
    extra = (() if command in ("data", "eda") or "--resume" in args or "--out" in args
             else ("--out", out, "--no-compilation-cache"))
    if command == "train" and "--variant" not in args:
        extra += ("--variant", "baseline")
    done = run_main(capsys, command, *args, *extra, check=False)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert done.stderr.startswith("mnist-jax: error: ") and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not out.exists(), "work started before the settings were checked"


def test_every_flag_that_takes_a_value_has_a_bad_value_case():
    """A new flag without a row above fails here: every flag keeps the one-line promise."""
    from mnist_jax import cli

    commands = cli.build_parser()._subparsers._group_actions[0].choices
    covered = {(c, a) for c, args, _ in BAD_SETTINGS for a in args if a.startswith("--")}
    # A flag and its aliases (--placement, --schedule) are one action: a row for either.
    missing = [(name, action.option_strings[0]) for name, parser in commands.items()
               for action in parser._actions
               if action.nargs != 0 and action.option_strings[0].startswith("--")
               and not {(name, flag) for flag in action.option_strings} & (covered | NO_BAD_VALUE)]
    assert not missing, missing


# Paths that may not exist yet (any value is valid), and `train`'s and `sweep`'s training flags,
# which are `experiment`'s (cli._training, cli._fit_flags; the rows above cover them).
NO_BAD_VALUE = {("eda", "--data-dir"), ("data", "--data-dir"),
                ("train", "--out"), ("train", "--resume"), ("train", "--data-dir"),
                ("train", "--epochs"), ("train", "--batch-size"), ("train", "--validation-split"),
                ("train", "--l2"), ("train", "--dropout"), ("train", "--lr"),
                ("train", "--optimizer"), ("train", "--loss"), ("train", "--eval-batch-size"),
                ("train", "--data-parallel"), ("train", "--placement"), ("train", "--dropout-rng"),
                ("train", "--checkpoint-every"), ("train", "--dtype"),
                ("train", "--matmul-precision"), ("sweep", "--dtype"),
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
