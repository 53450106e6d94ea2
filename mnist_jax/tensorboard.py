"""TensorBoard event files, through tensorboardX (the optional extra `tensorboard`; no
TensorFlow): one run directory per model with its per-epoch scalars, and for sweeps the
HParams plugin's summaries, so the dashboard's table and parallel-coordinates views list every
configuration with its final metrics."""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mnist_jax.errors import ConfigError

DIRECTORY = "tensorboard"


def available() -> None:
    """Raises ConfigError with the fix when tensorboardX is not installed."""
    try:
        import tensorboardX  # noqa: F401
    except ImportError as e:
        raise ConfigError("--tensorboard needs tensorboardX: pip install "
                          "'mnist_jax[tensorboard]'") from e


def run_name(name: str) -> str:
    """A configuration's name as a directory name: spaces become commas, no slashes."""
    return re.sub(r"[^A-Za-z0-9_.=,+#-]", "_", name.replace(" ", ","))


def write(logdir: str | Path, runs: Mapping[str, Sequence[Mapping[str, Any]]], *,
          hparams: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """Event files under `logdir` (replaced if there): `runs[name]` lists that model's runs,
    each {"seed", "history"} (history: key -> per-epoch values, None for non-finite), written
    to <name>/seed_<seed> as scalars 'epoch/<key>' at steps 1..epochs. With `hparams[name]`
    (hyperparameter -> value), each run also records an HParams session whose metrics are the
    final epoch's values as 'hparams/<key>'. Returns `logdir`."""
    from tensorboardX import SummaryWriter
    from tensorboardX.summary import hparams as hparams_summaries

    logdir = Path(logdir)
    shutil.rmtree(logdir, ignore_errors=True)  # written whole from the results: no duplicates
    for name, seeds in runs.items():
        for run in seeds:
            history = run["history"]
            with SummaryWriter(str(logdir / run_name(name) / f"seed_{run['seed']}")) as w:
                for key, values in history.items():
                    for epoch, value in enumerate(values, start=1):
                        if value is not None:
                            w.add_scalar(f"epoch/{key}", value, epoch)
                if hparams is not None:
                    finals = {f"hparams/{k}": v[-1] for k, v in history.items()
                              if v and v[-1] is not None}
                    for summary in hparams_summaries({**hparams[name], "seed": run["seed"]},
                                                     finals):
                        w.file_writer.add_summary(summary)
                    for tag, value in finals.items():
                        w.add_scalar(tag, value, len(next(iter(history.values()))))
    return logdir


class Live:
    """Per-epoch scalars written as a run trains, so a running job can be watched: after each
    epoch, `epoch(stack)` adds that epoch's values of every model ('epoch/<key>' at the epoch's
    number) to <logdir>/<name>/seed_<seed>, on disk when it returns. A resumed run (after epoch
    k of its checkpoint, 0 where it had none) starts its event files with TensorBoard's purge
    at step k + 1: what the stopped run wrote past its checkpoint is superseded, and each
    epoch shows once.

    tensorboardX's synchronous EventsWriter, not its SummaryWriter, whose flush does not wait
    for the events its queue still holds.
    """

    def __init__(self, logdir: str | Path, resumed_after: int | None = None):
        self.logdir = Path(logdir)
        self.resumed_after = resumed_after  # None: a fresh run, nothing to supersede
        self.writers: dict[tuple[str, int], Any] = {}

    def _writer(self, name: str, seed: int):
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto import event_pb2

        key = (name, seed)
        if key not in self.writers:
            directory = self.logdir / run_name(name) / f"seed_{seed}"
            directory.mkdir(parents=True, exist_ok=True)
            # TensorBoard reads a run's files in name order, whose time is in seconds: the
            # suffix keeps a file started the same second apart, and after the older one.
            w = EventsWriter(str(directory / "events"), f".{time.time_ns()}")
            if self.resumed_after is not None:
                w.write_event(event_pb2.Event(
                    wall_time=time.time(), step=self.resumed_after + 1,
                    session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
            self.writers[key] = w
        return self.writers[key]

    def epoch(self, stack) -> None:
        """Writes epoch `stack.epochs_done` of every model of the stack, and flushes."""
        from tensorboardX.proto import event_pb2
        from tensorboardX.summary import scalar

        step = stack.epochs_done
        for variant in stack.variants:
            for s, seed in enumerate(stack.seeds):
                w = self._writer(variant.name, seed)
                for key, values in stack.histories[variant.name][s].items():
                    if len(values) >= step and values[step - 1] is not None:
                        w.write_event(event_pb2.Event(
                            wall_time=time.time(), step=step,
                            summary=scalar(f"epoch/{key}", float(values[step - 1]))))
                w.flush()

    def before(self, hook):
        """An on_epoch_end hook that writes the epoch, then calls `hook` (a checkpoint's, which
        may stop the run)."""
        def both(stack) -> None:
            self.epoch(stack)
            hook(stack)
        return both

    def close(self) -> None:
        for w in self.writers.values():
            w.close()
        self.writers.clear()
