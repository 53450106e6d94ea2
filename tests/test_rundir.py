"""The run directory on its own: the lock, run.json, the resume checks, stop signals and how
a run's end is recorded. Nothing is trained here; test_reliability.py runs the whole CLI."""

import json
import os
import signal
import socket
import types

import pytest

from mnist_jax import rundir
from mnist_jax.errors import ConfigError, Interrupted, StopNow, TrainingDiverged
from mnist_jax.experiment import ExperimentConfig
from mnist_jax.sweep import SweepConfig


def test_the_lock_refuses_a_second_holder_and_names_the_first(tmp_path):
    out = tmp_path / "run"
    with rundir.exclusive(out):
        holder = json.loads((out / rundir.LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(ConfigError) as e, rundir.exclusive(out, "--resume"):
            pass
        assert str(e.value) == (
            f"--resume {out} is in use by another run (pid {os.getpid()} on "
            f"{socket.gethostname()}, since {holder['since']}); wait for it to finish or stop "
            "it, or choose another --resume")
        assert json.loads((out / rundir.LOCK_FILE).read_text()) == holder  # as it was
    assert (out / rundir.LOCK_FILE).read_text() == ""  # no stale record once released
    with rundir.exclusive(out):  # released with its holder
        pass


def test_run_json_records_the_config_and_the_status(tmp_path):
    config = ExperimentConfig(variants=("l2",), seeds=(0, 1))
    out = rundir.prepare(tmp_path / "run", config, resume=False, overwrite=False,
                         command="train")
    as_json = json.loads(json.dumps(config.to_dict()))
    assert json.loads((out / rundir.RUN_FILE).read_text()) == {
        "config": as_json, "command": "train", "status": "running"}
    assert rundir.load_config(out, ExperimentConfig, "experiment") == config
    rundir.set_status(out, "complete", epochs_done=20)
    assert json.loads((out / rundir.RUN_FILE).read_text()) == {
        "config": as_json, "command": "train", "status": "complete", "epochs_done": 20}


def test_a_run_is_replaced_only_with_overwrite_and_then_entirely(tmp_path):
    out = tmp_path / "run"
    rundir.prepare(out, ExperimentConfig(), resume=False, overwrite=False)
    outputs = ["metrics.json", "report.md", "sweep.csv", "history_l2.csv",
               "figures/a.png", "checkpoints/1/x", "chunks/0000.json", "tensorboard/l2/e"]
    for name in [*outputs, "notes.txt"]:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("old")
    with pytest.raises(ConfigError, match="already holds a run; choose another --out"):
        rundir.prepare(out, ExperimentConfig(), resume=False, overwrite=False)
    rundir.prepare(out, ExperimentConfig(variants=("l2",)), resume=False, overwrite=True)
    left = {str(p.relative_to(out)) for p in out.rglob("*")}
    assert left == {rundir.RUN_FILE, "notes.txt"}  # what the run did not write is kept
    assert rundir.load_config(out, ExperimentConfig, "train").variants == ("l2",)


def test_resume_says_what_is_wrong_and_what_to_do(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is a file; give the run's directory"):
        rundir.load_config(tmp_path / "file", ExperimentConfig, "train")
    with pytest.raises(ConfigError, match=r"there is no run there \(no run.json\)"):
        rundir.load_config(tmp_path, ExperimentConfig, "train")
    (tmp_path / rundir.RUN_FILE).write_text("{")
    with pytest.raises(ConfigError, match="run.json is unreadable"):
        rundir.load_config(tmp_path, ExperimentConfig, "train")

    swept = rundir.prepare(tmp_path / "sweep", SweepConfig(), resume=False, overwrite=False,
                           command="sweep")
    with pytest.raises(ConfigError) as e:
        rundir.load_config(swept, ExperimentConfig, "train")
    assert str(e.value) == (f"--resume {swept} holds a run of `mnist-jax sweep`; resume it "
                            f"with: mnist-jax sweep --resume {swept}")
    trained = rundir.prepare(tmp_path / "train", ExperimentConfig(), resume=False,
                             overwrite=False, command="train")
    with pytest.raises(ConfigError, match="resume it with: mnist-jax train --resume"):
        rundir.load_config(trained, SweepConfig, "sweep")
    with pytest.raises(ConfigError, match="the run there was started with another config"):
        rundir.prepare(trained, ExperimentConfig(seeds=(1,)), resume=True, overwrite=False,
                       command="train")


def test_hold_yields_the_record_of_a_complete_run_only(tmp_path):
    out, config = tmp_path / "run", ExperimentConfig()
    with rundir.hold(out, config, resume=False, overwrite=False, command="train",
                     primary=True) as complete:
        assert complete is None
    rundir.set_status(out, "complete", epochs_done=3)
    with rundir.hold(out, config, resume=True, overwrite=False, command="train",
                     primary=True) as complete:
        assert complete is None  # complete, but without its metrics.json
    (out / "metrics.json").write_text("{}")
    with rundir.hold(out, config, resume=True, overwrite=False, command="train",
                     primary=True) as complete:
        assert complete["status"] == "complete" and complete["epochs_done"] == 3


def test_a_stop_signal_is_deferred_and_a_second_stops_at_once():
    said, before = [], signal.getsignal(signal.SIGTERM)
    with rundir.deferred_interrupt(said.append) as interrupt:
        assert signal.getsignal(signal.SIGTERM) is not before  # else the signal ends pytest
        signal.raise_signal(signal.SIGTERM)
        assert interrupt == [signal.SIGTERM]
        assert said == ["\nSIGTERM: finishing this epoch and saving a checkpoint (a second "
                        "SIGTERM stops at once)"]
        with pytest.raises(StopNow):
            signal.raise_signal(signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is before


def test_the_checkpoint_hook_saves_when_due_and_stops_after_a_signal():
    forced, interrupt = [], []
    hook = rundir.checkpoint_hook(lambda s, force: forced.append(force), interrupt, 3,
                                  "mnist-jax train --resume run", " of chunk 1")
    hook(types.SimpleNamespace(epochs_done=1))
    interrupt.append(signal.SIGINT)
    with pytest.raises(Interrupted) as e:
        hook(types.SimpleNamespace(epochs_done=2))
    assert str(e.value) == ("SIGINT: stopped after epoch 2 of 3 of chunk 1, checkpoint saved; "
                            "resume with: mnist-jax train --resume run")
    hook(types.SimpleNamespace(epochs_done=3))  # after the last epoch the run completes
    assert forced == [False, True, True]


@pytest.mark.parametrize("error, status", [
    (Interrupted("stopped", signum=signal.SIGTERM), "interrupted"),
    (TrainingDiverged("diverged", variant="l2", epoch=2, step=5), "diverged"),
    (StopNow(signal.SIGINT), "interrupted"),
])
def test_how_a_run_ended_is_recorded(tmp_path, error, status):
    out = rundir.prepare(tmp_path / "run", ExperimentConfig(), resume=False, overwrite=False)
    with pytest.raises(type(error)), rundir.recording_outcome(
            out, True, "mnist-jax train --resume run", lambda: {"epochs_done": 2},
            lambda: ({"epochs_done": 1}, "the newest checkpoint is of epoch 1")):
        raise error
    record = json.loads((out / rundir.RUN_FILE).read_text())
    assert record["status"] == status
    assert record["epochs_done"] == (1 if isinstance(error, StopNow) else 2)
    if status == "interrupted":
        assert record["resume"] == "mnist-jax train --resume run"
        assert record["signal"] == signal.Signals(error.signum).name
    else:
        assert record["error"] == "diverged"
