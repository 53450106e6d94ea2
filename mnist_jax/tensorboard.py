"""TensorBoard event files, through tensorboardX (the optional extra `tensorboard`; no
TensorFlow): one run directory per model with its per-epoch scalars, and for sweeps the
HParams plugin's summaries, so the dashboard's table and parallel-coordinates views list every
configuration with its final metrics."""

from __future__ import annotations

import re
import shutil
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
