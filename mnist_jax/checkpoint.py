"""Checkpoints with orbax: the whole stack (parameters, optimizer state, RNG keys), the epoch
and the histories, saved by time (`Saver`: after an epoch once `EVERY_SECONDS` have passed,
and always after the last epoch and on a stop signal). Orbax writes each into a temporary
directory and renames it when complete, so a kill at any moment leaves the previous checkpoint
intact.

Each checkpoint also records a SHA-256 digest of every file it wrote, of every array and of its
metadata. A restore checks them all, and a checkpoint that fails (damaged, truncated, missing
files, unreadable, or holding non-finite values) is set aside as `<epoch>.damaged` with one
warning, and the next older one is tried.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from mnist_jax import files, placement, stacks
from mnist_jax.errors import CheckpointError, ConfigError, WriteError
from mnist_jax.steps import RunKeys

log = logging.getLogger(__name__)
KEEP = 2  # the newest two: the older one is the fallback when the newest is damaged
DAMAGED = ".damaged"
FILE_DIGESTS = "files.sha256.json"


def manager(directory: str | Path) -> ocp.CheckpointManager:
    """A synchronous manager: `save` returns once the checkpoint is committed."""
    options = ocp.CheckpointManagerOptions(max_to_keep=KEEP, enable_async_checkpointing=False,
                                           create=True)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def _arrays(stack: stacks.Stack) -> dict[str, Any]:
    keys = jax.tree.map(jax.random.key_data, stack.keys._asdict())
    return {"state": stack.state, "keys": keys}


def _meta(stack: stacks.Stack) -> dict[str, Any]:
    return {"epochs_done": stack.epochs_done, "histories": stack.histories,
            "seeds": list(stack.seeds), "variants": [v.name for v in stack.variants],
            "compile_seconds": stack.compile_seconds, "train_seconds": stack.train_seconds,
            "diverged": stack.diverged}


def array_digests(arrays: Any) -> dict[str, str]:
    """SHA-256 of every leaf (its dtype, shape and bytes), keyed by its path in the tree."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(placement.to_host(arrays)):
        leaf = np.ascontiguousarray(leaf)
        h = hashlib.sha256(f"{leaf.dtype.str}{leaf.shape}".encode())
        h.update(leaf.tobytes())
        out[jax.tree_util.keystr(path)] = h.hexdigest()
    return out


def meta_digest(meta: Any) -> str:
    """SHA-256 of the metadata as canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def save(mgr: ocp.CheckpointManager, stack: stacks.Stack) -> None:
    """Commits the stack after `stack.epochs_done` epochs, with the digests of its contents."""
    arrays, meta = _arrays(stack), _meta(stack)
    digests = {"arrays": array_digests(arrays), "meta": meta_digest(meta)}
    _check_space(Path(mgr.directory), stack.epochs_done, arrays)
    try:
        mgr.save(stack.epochs_done, args=ocp.args.Composite(
            arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta),
            digests=ocp.args.JsonSave(digests)))
        mgr.wait_until_finished()
        if jax.process_index() == 0:
            _write_file_digests(Path(mgr.directory) / str(stack.epochs_done))
    except Exception as e:  # tensorstore reports a full disk as a ValueError
        raise WriteError(f"could not write checkpoint "
                         f"{Path(mgr.directory) / str(stack.epochs_done)}: {cause(e)}") from e


# Seconds of training between checkpoints by default: a save after every epoch made a short
# study measurably slower (docs/design.md). A kill loses at most this much work; a resume is
# exact either way.
EVERY_SECONDS = 10.0


class Saver:
    """Checkpoints a stack after an epoch when `every` seconds have passed since the last
    save (0: after every epoch), and always when `force`d (the last epoch, a stop signal)."""

    def __init__(self, mgr: ocp.CheckpointManager, every: float = EVERY_SECONDS):
        self.mgr, self.every = mgr, every
        self.last = time.monotonic()

    def __call__(self, stack: stacks.Stack, *, force: bool = False) -> bool:
        """Saves if due; returns whether it did."""
        if not (force or self.every <= 0 or time.monotonic() - self.last >= self.every):
            return False
        save(self.mgr, stack)
        self.last = time.monotonic()
        return True


def _check_space(directory: Path, step: int, arrays: Any) -> None:
    """Refuses to start a checkpoint the disk cannot hold (its arrays uncompressed, which
    bounds what orbax writes): a write that fills the disk half-way leaves orbax's pending
    writes failing in the background, each printing a traceback after the one line we print."""
    need = sum(leaf.nbytes for leaf in jax.tree.leaves(arrays))
    free = shutil.disk_usage(directory).free
    if free < need:
        raise WriteError(f"could not write checkpoint {directory / str(step)}: No space left on "
                         f"device ({need / 1e6:.1f} MB needed, {free / 1e6:.1f} MB free)")


def cause(e: BaseException) -> str:
    """The OS's words for an I/O failure (tensorstore carries its errno in the message), else
    the first line of the message."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    code = re.search(r"os_error_code='?(\d+)", str(e))
    return os.strerror(int(code[1])) if code else _first_line(e)


def _file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_file_digests(step_dir: Path) -> None:
    """SHA-256 and size of every file of a committed checkpoint, beside them. Checked before
    orbax reads anything: a damaged file is then named, and orbax never meets it (a failed read
    leaves its other reads failing in the background, each printing a traceback)."""
    record = {str(p.relative_to(step_dir)): {"size": p.stat().st_size, "sha256": _file_digest(p)}
              for p in sorted(step_dir.rglob("*")) if p.is_file()}
    files.write_json(step_dir / FILE_DIGESTS, record)


def _check_files(step_dir: Path) -> None:
    """Raises Damaged unless every file recorded by `_write_file_digests` is there, whole.

    The record is written after orbax commits, so a kill in between leaves a checkpoint
    without one: that checkpoint is still checked, by the array and metadata digests orbax
    committed with it. It must at least have those.
    """
    if not (step_dir / "digests").is_dir():
        raise Damaged("it records no digests, so it cannot be verified")
    if not (step_dir / FILE_DIGESTS).exists():
        log.debug("%s has no file digests (stopped before they were written)", step_dir)
        return
    try:
        record = json.loads((step_dir / FILE_DIGESTS).read_text())
    except (OSError, ValueError) as e:
        raise Damaged(f"its file digests are unreadable ({type(e).__name__})") from e
    for name, want in record.items():
        path = step_dir / name
        if not path.is_file():
            raise Damaged(f"{name} is missing")
        if path.stat().st_size != want["size"]:
            raise Damaged(f"{name} has {path.stat().st_size} bytes, not {want['size']} "
                          "(truncated?)")
        if _file_digest(path) != want["sha256"]:
            raise Damaged(f"{name} does not match its SHA-256 digest")


class Damaged(Exception):
    """A checkpoint that cannot be trusted; the message says why."""


def _load(mgr: ocp.CheckpointManager, step: int, fresh: stacks.Stack,
          ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(arrays, meta) of one checkpoint, verified against its digests; raises Damaged."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _arrays(fresh))
    _check_files(Path(mgr.directory) / str(step))
    try:
        restored = mgr.restore(step, args=ocp.args.Composite(
            arrays=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore(),
            digests=ocp.args.JsonRestore()))
        arrays, meta, digests = restored["arrays"], restored["meta"], restored["digests"]
        expected_arrays, expected_meta = digests["arrays"], digests["meta"]
    except Exception as e:  # orbax and tensorstore raise many kinds for unreadable files
        raise Damaged(f"unreadable: {type(e).__name__}: {_first_line(e)}") from e
    if meta_digest(meta) != expected_meta:
        raise Damaged("its metadata does not match its digest")
    host = placement.to_host(arrays)  # once, for the digests and the finiteness check
    got = array_digests(host)
    wrong = [path for path in got if expected_arrays.get(path) != got[path]]
    if wrong or set(expected_arrays) != set(got):
        raise Damaged(f"{len(wrong) or 'some'} array(s) do not match their digests, e.g. "
                      f"{(wrong or sorted(set(expected_arrays) ^ set(got)))[0]}")
    bad = [jax.tree_util.keystr(p) for p, leaf in jax.tree_util.tree_leaves_with_path(host)
           if np.issubdtype(leaf.dtype, np.floating) and not np.isfinite(leaf).all()]
    if bad:  # digests match, so they were saved so: never by a healthy run
        raise Damaged(f"it holds non-finite values in {bad[0]}")
    return arrays, meta


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else "no detail"


def _set_aside(directory: Path, step: int) -> Path:
    """Renames a damaged checkpoint out of orbax's sight, keeping it for inspection."""
    target = directory / f"{step}{DAMAGED}"
    n = 1
    while target.exists():
        n += 1
        target = directory / f"{step}{DAMAGED}-{n}"
    (directory / str(step)).rename(target)
    return target


def restore(mgr: ocp.CheckpointManager, fresh: stacks.Stack,
            warn: Callable[[str], None] = log.warning) -> stacks.Stack | None:
    """The newest intact checkpoint restored into the structure of `fresh`, or None if there
    is none at all.

    `fresh` is a newly initialised stack of the same config; its arrays give the shapes and
    its variants and seeds must match the checkpoint's. Damaged checkpoints are set aside
    (`warn` says which and why) and older ones tried; raises CheckpointError when none is
    intact.
    """
    directory = Path(mgr.directory)
    steps = sorted(mgr.all_steps(), reverse=True)
    if not steps:
        return None
    problems = []
    for step in steps:
        try:
            arrays, meta = _load(mgr, step, fresh)
        except Damaged as e:
            kept = _set_aside(directory, step)
            problems.append(f"epoch {step}: {e}")
            warn(f"checkpoint {directory / str(step)} is damaged ({e}); set aside as "
                 f"{kept.name}, trying an older one")
            continue
        mgr.reload()  # it must not count the set-aside ones
        return _into(fresh, arrays, meta, directory)
    mgr.reload()
    raise CheckpointError(
        f"no intact checkpoint in {directory} ({'; '.join(problems)}); the damaged ones are "
        f"kept there as *{DAMAGED}. Start the run again with --overwrite, or move them away "
        "and --resume to start from epoch 1")


def _into(fresh: stacks.Stack, arrays: dict[str, Any], meta: dict[str, Any],
          directory: Path) -> stacks.Stack:
    names = [v.name for v in fresh.variants]
    if meta["variants"] != names or meta["seeds"] != list(fresh.seeds):
        raise ConfigError(f"the checkpoint in {directory} holds variants {meta['variants']}"
                          f" and seeds {meta['seeds']}, not {names} and {list(fresh.seeds)}")
    fresh.state = arrays["state"]
    fresh.keys = RunKeys(**{k: jax.random.wrap_key_data(v) for k, v in arrays["keys"].items()})
    fresh.epochs_done = int(meta["epochs_done"])
    fresh.histories = meta["histories"]
    fresh.compile_seconds = float(meta["compile_seconds"])
    fresh.train_seconds = float(meta["train_seconds"])
    fresh.diverged = list(meta.get("diverged", []))
    log.info("restored the checkpoint of epoch %d from %s", fresh.epochs_done, directory)
    return fresh
