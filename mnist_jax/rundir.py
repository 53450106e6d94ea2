"""The run directory (`--out`): one writer at a time, never overwritten by accident, and
resumable. Its run.json records the config a run was started with and how it ended; a stop
signal finishes the epoch in flight and checkpoints it. Experiments and sweeps both hold theirs
with this module: the work they do inside is theirs.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import shutil
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mnist_jax import files
from mnist_jax.errors import ConfigError, Interrupted, StopNow, TrainingDiverged, WriteError
from mnist_jax.tensorboard import DIRECTORY as TENSORBOARD

if TYPE_CHECKING:
    from mnist_jax.fit import Stack

# What a run directory holds; --overwrite clears all of it but the lock.
RUN_FILE = "run.json"  # the config, the command that started the run, its status
LOCK_FILE = ".lock"
CHECKPOINTS = "checkpoints"
CHUNKS = "chunks"  # a sweep's finished chunks, one JSON file each
FIGURES = "figures"
MODELS = "models"  # the trained models, kept (mnist_jax.saving)
RESULT_FILES = ("metrics.json", "report.md", "sweep.csv")
RESULT_DIRECTORIES = (FIGURES, CHECKPOINTS, CHUNKS, TENSORBOARD, MODELS)


# --- the lock: one writer per run directory -----------------------------------------------------

@contextlib.contextmanager
def exclusive(directory: str | os.PathLike, flag: str = "--out") -> Iterator[None]:
    """Holds an exclusive lock on `directory` (created if missing) for the block: one writer per
    run directory. The kernel releases a flock when its holder dies, so a SIGKILLed run leaves
    no stale lock. A second holder is refused with ConfigError naming the first (pid, host)."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise ConfigError(f"{flag} {directory} is not writable ({e.strerror}); choose "
                          f"another {flag}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except ValueError:
            holder = {}
        os.close(fd)
        raise ConfigError(
            f"{flag} {directory} is in use by another run (pid {holder.get('pid', '?')} on "
            f"{holder.get('host', '?')}, since {holder.get('since', '?')}); wait for it to "
            f"finish or stop it, or choose another {flag}") from None
    try:
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "since": datetime.datetime.now().astimezone().isoformat(
                                 timespec="seconds")}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        yield
    finally:
        # The record names the live holder only: cleared before the lock is let go, however
        # the run ended (a SIGKILLed holder leaves its own, which the next one overwrites).
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # releases the lock


# --- run.json: the config, and whether the directory may take this run --------------------------

def load_config(out_dir: str | Path, kind: type, command: str) -> Any:
    """The config a run directory was started with (its run.json), as a `kind` (a class with
    `from_dict`: ExperimentConfig, SweepConfig). `command` is the one resuming it: a sweep's
    run resumes only with `sweep`, an experiment's (`experiment`, `train`) only without."""
    if Path(out_dir).is_file():
        raise ConfigError(f"--resume {out_dir} is a file; give the run's directory (the --out "
                          "it was started with)")
    path = Path(out_dir) / RUN_FILE
    try:
        record = json.loads(path.read_text())
        started = record.get("command", "experiment")
        if (started == "sweep") != (command == "sweep"):
            raise ConfigError(f"--resume {out_dir} holds a run of `mnist-jax {started}`; "
                              f"resume it with: mnist-jax {started} --resume {out_dir}")
        return kind.from_dict(record["config"])
    except FileNotFoundError as e:
        raise ConfigError(f"--resume {out_dir}: there is no run there (no {RUN_FILE}); "
                          "start one with --out") from e
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--resume {out_dir}: {path} is unreadable ({e})") from e


def _clear_outputs(out: Path) -> None:
    for name in (RUN_FILE, *RESULT_FILES):
        (out / name).unlink(missing_ok=True)
    for path in out.glob("history_*.csv"):
        path.unlink()
    for name in RESULT_DIRECTORIES:
        shutil.rmtree(out / name, ignore_errors=True)


def prepare(out_dir: str | Path, config: Any, *, resume: bool, overwrite: bool,
            command: str = "experiment") -> Path:
    """Checks that `out_dir` may receive this run (`config`: an ExperimentConfig, or a
    SweepConfig), then records its config there."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; choose a directory")
    if resume:
        saved = load_config(out, type(config), command)
        if saved != config:
            raise ConfigError(f"--resume {out}: the run there was started with another config")
        return out
    holds_run = (out / RUN_FILE).exists() or (out / "metrics.json").exists()
    if holds_run and not overwrite:
        raise ConfigError(f"--out {out} already holds a run; choose another --out, continue it "
                          f"with --resume {out}, or replace it with --overwrite")
    if holds_run:
        _clear_outputs(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        files.write_json(out / RUN_FILE, {"config": config.to_dict(), "command": command,
                                          "status": "running"})
    except OSError as e:
        raise ConfigError(f"--out {out} is not writable ({e}); choose another --out") from e
    return out


@contextlib.contextmanager
def hold(out: Path, config: Any, *, resume: bool, overwrite: bool, command: str,
         primary: bool):
    """Holds `out` for this run (the first host takes its lock and records `config` there, as
    `prepare`), for the body of the `with`. Yields the run's run.json record when `resume`
    finds the run complete with its metrics.json (nothing to do), else None."""
    with contextlib.ExitStack() as held:
        if primary:
            if out.exists() and not out.is_dir():
                raise ConfigError(f"--out {out} is a file; choose a directory")
            if resume:  # nothing there: say so before creating anything
                load_config(out, type(config), command)
            held.enter_context(exclusive(out, "--resume" if resume else "--out"))
            prepare(out, config, resume=resume, overwrite=overwrite, command=command)
        complete = None
        if resume:  # every host reads it: all return, or all train
            record = json.loads((out / RUN_FILE).read_text())
            if record.get("status") == "complete" and (out / "metrics.json").is_file():
                complete = record
        yield complete


def set_status(out: Path, status: str, **extra: Any) -> None:
    """Records in run.json how the run stands (running, complete, interrupted, diverged,
    failed), with `extra` fields (the progress made, the error)."""
    record = json.loads((out / RUN_FILE).read_text())
    files.write_json(out / RUN_FILE, {**record, "status": status, **extra})


# --- stopping: signals, checkpoints, and how the run ended --------------------------------------

# Signals that ask a run to stop: Ctrl-C, and SIGTERM, which SLURM, Kubernetes, spot and TPU
# preemption and `timeout` send before SIGKILL.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def deferred_interrupt(echo: Callable[[str], None]):
    """First Ctrl-C or SIGTERM: finish the epoch in flight, checkpoint it, then stop (the list
    yielded receives the signal's number). A second one: stop at once (StopNow)."""
    requested: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def handler(signum, frame):
        if requested:
            raise StopNow(signum)
        requested.append(signum)
        again = "Ctrl-C" if signum == signal.SIGINT else "a second SIGTERM"
        echo(f"\n{signal.Signals(signum).name}: finishing this epoch and saving a checkpoint "
             f"({again} stops at once)")

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield requested
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def checkpoint_hook(save: Callable[..., bool], interrupt: list[int], epochs: int,
                    resume_with: str, where: str = "") -> Callable[[Stack], None]:
    """`fit`'s on_epoch_end: `save(stack, force=...)` when due, and always after the last epoch
    and once a stop signal is in `interrupt`; then, before the last epoch, Interrupted with the
    command that resumes (`where` names the part of the run, a sweep's chunk)."""
    def on_epoch_end(s: Stack) -> None:
        save(s, force=bool(interrupt) or s.epochs_done == epochs)
        if interrupt and s.epochs_done < epochs:
            name = signal.Signals(interrupt[0]).name
            raise Interrupted(f"{name}: stopped after epoch {s.epochs_done} of {epochs}{where}, "
                              f"checkpoint saved; resume with: {resume_with}",
                              signum=interrupt[0])
    return on_epoch_end


@contextlib.contextmanager
def recording_outcome(out: Path, primary: bool, resume_with: str,
                      done: Callable[[], dict[str, Any]],
                      saved: Callable[[], tuple[dict[str, Any], str]]):
    """Records in run.json how a run ended early, and re-raises: interrupted (a signal; after
    the checkpoint, or at once on a second one), diverged, or failed (a full disk, an I/O
    error: a WriteError naming the file, what is intact and the resume command).

    `done()` is the progress made (run.json fields); `saved()` the progress the newest
    checkpoint holds, with its description for messages.
    """
    try:
        yield
    except Interrupted as e:
        if primary:
            set_status(out, "interrupted", **done(), signal=signal.Signals(e.signum).name,
                       resume=resume_with)
        raise
    except TrainingDiverged as e:
        if primary:
            set_status(out, "diverged", **done(), error=str(e))
        raise
    except KeyboardInterrupt as e:  # a second signal (StopNow): at once, mid-epoch
        if primary:
            set_status(out, "interrupted", **saved()[0],
                       signal=signal.Signals(getattr(e, "signum", signal.SIGINT)).name,
                       resume=resume_with)
        raise
    except (OSError, WriteError) as e:  # a full disk, an I/O error
        from mnist_jax.checkpoint import cause  # orbax is slow to import; only on failure

        what = (str(e) if isinstance(e, WriteError) else
                f"could not write {e.filename or out}: {cause(e)}")
        fields, newest = saved()
        error = WriteError(f"{what}. What was written before is intact ({newest}); free "
                           f"space or fix the disk, then continue with: {resume_with}")
        if primary:
            with contextlib.suppress(OSError):  # the disk may refuse this too
                set_status(out, "failed", **fields, error=str(error))
        raise error from e
