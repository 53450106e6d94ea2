"""Checkpoints with orbax, one per epoch: the whole stack (parameters, optimizer state, RNG
keys), the epoch and the histories. Orbax writes each into a temporary directory and renames
it when complete, so a kill at any moment leaves the previous checkpoint intact."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from mnist_jax import fit
from mnist_jax.errors import ConfigError
from mnist_jax.steps import RunKeys

log = logging.getLogger(__name__)
KEEP = 2  # the newest two, in case the newest is lost with its disk


def manager(directory: str | Path) -> ocp.CheckpointManager:
    """A synchronous manager: `save` returns once the checkpoint is committed."""
    options = ocp.CheckpointManagerOptions(max_to_keep=KEEP, enable_async_checkpointing=False,
                                           create=True)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def _arrays(stack: fit.Stack) -> dict[str, Any]:
    keys = jax.tree.map(jax.random.key_data, stack.keys._asdict())
    return {"state": stack.state, "keys": keys}


def save(mgr: ocp.CheckpointManager, stack: fit.Stack) -> None:
    """Commits the stack after `stack.epochs_done` epochs."""
    meta = {"epochs_done": stack.epochs_done, "histories": stack.histories,
            "seeds": list(stack.seeds), "variants": [v.name for v in stack.variants],
            "compile_seconds": stack.compile_seconds, "train_seconds": stack.train_seconds}
    mgr.save(stack.epochs_done, args=ocp.args.Composite(
        arrays=ocp.args.StandardSave(_arrays(stack)), meta=ocp.args.JsonSave(meta)))
    mgr.wait_until_finished()


def restore(mgr: ocp.CheckpointManager, fresh: fit.Stack) -> fit.Stack | None:
    """The newest checkpoint restored into the structure of `fresh`, or None if there is none.

    `fresh` is a newly initialised stack of the same config; its arrays give the shapes and
    its variants and seeds must match the checkpoint's.
    """
    step = mgr.latest_step()
    if step is None:
        return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _arrays(fresh))
    restored = mgr.restore(step, args=ocp.args.Composite(
        arrays=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    meta, arrays = restored["meta"], restored["arrays"]
    names = [v.name for v in fresh.variants]
    if meta["variants"] != names or meta["seeds"] != list(fresh.seeds):
        raise ConfigError(f"the checkpoint in {mgr.directory} holds variants {meta['variants']}"
                          f" and seeds {meta['seeds']}, not {names} and {list(fresh.seeds)}")
    keys = RunKeys(**{k: jax.random.wrap_key_data(v) for k, v in arrays["keys"].items()})
    fresh.state = arrays["state"]
    fresh.keys = keys
    fresh.epochs_done = int(meta["epochs_done"])
    fresh.histories = meta["histories"]
    fresh.compile_seconds = float(meta["compile_seconds"])
    fresh.train_seconds = float(meta["train_seconds"])
    log.info("restored the checkpoint of epoch %d from %s", fresh.epochs_done, mgr.directory)
    return fresh
