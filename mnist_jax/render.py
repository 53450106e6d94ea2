"""Figures drawn in worker processes while this one evaluates, then written here.

Drawing a figure is Python holding the GIL, so threads would
not overlap; two worker processes (the cores training has just freed) draw while the main
process evaluates. They start early, so their imports overlap compilation, and they return
PNG bytes: every file is written by this process (atomically, with the user's umask). Where
processes cannot be made, figures are drawn here, one after another, with the same bytes.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from mnist_jax import files

NICENESS = 10  # added to the workers' niceness


def png(function: str, args: tuple, kwargs: dict) -> bytes:
    """`plots.<function>(*args, **kwargs)` drawn as PNG bytes (in a worker or here)."""
    from mnist_jax import plots

    return plots.png(getattr(plots, function)(*args, **kwargs))


def _worker(main_pid: int) -> None:
    """A worker's set-up: signals and output are the main process's business (Ctrl-C reaches
    the whole process group; a test may wait for the main process's pipes to close), and it
    exits when the main process is gone, even by SIGKILL, rather than wait on its queue."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Below the main process: their imports and the EDA figures take what the compiler and
    # the evaluation leave of the cores, rather than slowing them (docs/design.md).
    try:
        os.nice(NICENESS)
    except (AttributeError, OSError):  # no nice here: the same work at the same priority
        pass
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    threading.Thread(target=_exit_with, args=(main_pid,), daemon=True).start()
    # Told to stop, a worker has sent every result (its queue writes synchronously); what the
    # interpreter would do next is tear matplotlib down, which the main process would wait for.
    atexit.register(os._exit, 0)
    import mnist_jax.plots  # noqa: F401  (warm: matplotlib imported before the first job)


def _exit_with(pid: int) -> None:
    while _alive(pid):
        time.sleep(0.2)
    os._exit(0)


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, killed but not yet reaped, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


class Renderer:
    """Queues figures (`draw`), then writes them when `finish` is called; a context manager
    that stops its workers on leaving, whatever happened."""

    def __init__(self, workers: int = 2):
        self.jobs: list[tuple[Path, Any]] = []
        self.pool = None
        if workers > 0:
            try:
                # spawn: fresh interpreters (never a fork of this multi-threaded process) and no
                # server process that could outlive this one.
                context = multiprocessing.get_context("spawn")
                self.pool = concurrent.futures.ProcessPoolExecutor(
                    workers, mp_context=context, initializer=_worker, initargs=(os.getpid(),))
                for _ in range(workers):  # start them now: their imports overlap compiling
                    self.pool.submit(int)
            except (OSError, ValueError, RuntimeError):
                self.pool = None

    def draw(self, path: Path, function: str, *args, **kwargs) -> None:
        """Queues `plots.<function>(*args, **kwargs)`, to be written to `path`."""
        job = (self.pool.submit(png, function, args, kwargs) if self.pool is not None
               else (function, args, kwargs))
        self.jobs.append((Path(path), job))

    def finish(self) -> None:
        """Writes every queued figure, in the order queued; re-raises a drawing's error."""
        jobs, self.jobs = self.jobs, []
        for path, job in jobs:
            data = job.result() if isinstance(job, concurrent.futures.Future) else png(*job)
            files.write_bytes(path, data)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def __enter__(self) -> Renderer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
