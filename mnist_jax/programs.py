"""The compiled programs of a stack and their cache: the initialiser, the epoch, the
evaluation, and the small programs that slice and merge stacks.

Each is compiled ahead of time (so compilation is timed apart) once per process for each
shape, dtype, sharding and static setting; a second stack of the same kind (another seed,
variant or learning rate, a sweep's next chunk) reuses it, as `jax.jit` would.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mnist_jax import optim, placement
from mnist_jax.config import TrainConfig
from mnist_jax.model import MLP
from mnist_jax.steps import (
    EpochData,
    EpochMetrics,
    RunKeys,
    TrainMetrics,
    TrainState,
    evaluate_rows_stack,
    init_stack_state,
    train_epoch,
)


@functools.cache
def init_program():
    """The initialiser of a whole stack, jitted once per process: one program per model,
    optimizer and stack shape, whatever the seeds, variants and learning rates.

    On CPU it is compiled at LLVM optimisation level 2 instead of XLA's default 3: its
    Threefry draws compile in less than half the time at level 2, for the same run time and
    bitwise the same parameters (tested; docs/benchmarks.md).
    """
    options = {"xla_backend_optimization_level": 2} if jax.default_backend() == "cpu" else {}
    return jax.jit(init_stack_state, static_argnames=("model", "tx"), compiler_options=options)


train_epoch_jit = jax.jit(train_epoch, donate_argnames=("state",),
                          static_argnames=("model", "tx", "batch_size", "batch_sharding",
                                           "loss_form", "halt_on_divergence",
                                           "models_sharding"))
evaluate_rows_jit = jax.jit(evaluate_rows_stack,
                            static_argnames=("model", "batch_size", "batch_sharding",
                                             "loss_form"))


def evaluate_all_rows(state: TrainState, images, labels, **static) -> dict[str, jax.Array]:
    """Every model of a (S, V) stack on every row of `images`, by the program that evaluates
    row ranges (the row count traced), so a model's numbers are the bits its run reported (a
    constant count lets XLA divide by a rounded reciprocal instead); values of shape (S, V)."""
    return evaluate_rows_jit(state, images, labels, np.int32(0), np.int32(len(images)),
                             **static)


def compiler_options() -> dict[str, bool]:
    """XLA options for the epoch program. On CPU, copy insertion with region analysis lets the
    step loop update the weights in place (without it XLA copies the kernels every step)."""
    if jax.default_backend() != "cpu":
        return {}
    return {"xla_cpu_copy_insertion_use_region_analysis": True}


def compile_epoch(*args, **static):
    """`train_epoch` compiled ahead of time for these arguments (see `compiler_options`),
    once per process for each kind."""
    return _compiled(train_epoch_jit, args, static, compiler_options())


def compile_evaluation(*args, **static):
    """`evaluate_rows_stack` compiled ahead of time for these arguments, once per process
    for each kind."""
    return _compiled(evaluate_rows_jit, args, static, {})


def _compiled(jitted, args, static, options):
    leaves, treedef = jax.tree.flatten(args)
    specs = tuple((x.shape, x.dtype, getattr(x, "weak_type", False),
                   getattr(x, "sharding", None)) for x in leaves)
    slot = program_slot((jitted, treedef, specs, tuple(sorted(static.items())),
                         tuple(sorted(options.items()))))
    if not slot:  # lowered from the arrays themselves: uncommitted ones may follow a mesh
        slot.append(jitted.lower(*args, **static).compile(compiler_options=options))
    return slot[0]


@functools.lru_cache(maxsize=32)
def program_slot(key) -> list:
    """The compiled program of `key` once `_compiled` has put it there."""
    return []


# Slicing and merging run as one program each for the whole tree: leaf by leaf, every leaf
# shape would compile its own.
@jax.jit
def cell(tree, s, v):
    """The (1, 1) stack of model (s, v)."""
    return jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(
        jax.lax.dynamic_slice_in_dim(a, s, 1, axis=0), v, 1, axis=1), tree)


@jax.jit
def merge(grid: list[list]):
    """(1, 1) stacks in a grid -> one (S, V) stack."""
    return jax.tree.map(lambda *leaves: jnp.concatenate(
        [jnp.concatenate(leaves[r * len(grid[0]):(r + 1) * len(grid[0])], axis=1)
         for r in range(len(grid))], axis=0), *[c for row in grid for c in row])


@jax.jit
def seed_of(keys: RunKeys, s) -> RunKeys:
    """Seed s's (1,) keys of the (S,) ones."""
    return jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, s, 1), keys)


@jax.jit
def model_of(tree, s, v):
    """Model (s, v) of an (S, V) stack, without the two axes."""
    return jax.tree.map(lambda a: a[s, v], tree)


@dataclasses.dataclass(frozen=True)
class Runner:
    """A stack's compiled programs, run by its placement: `epoch(state, epoch)` trains one
    epoch and evaluates the validation rows, `evaluate(state, start, count)` any rows of
    the stack's data (host arrays of shape (S, V))."""

    epoch: Callable[[TrainState, jax.Array], tuple[TrainState, EpochMetrics]]
    evaluate: Callable[[TrainState, int, int], dict[str, np.ndarray]]


def runner(model: MLP, config: TrainConfig, state: TrainState, keys: RunKeys,
           data: EpochData, epochs_done: int = 0, halt_on_divergence: bool = True,
           *, train: bool = True) -> Runner:
    """Compiles the epoch (unless `train=False`) and the evaluation for the placement of
    `config`, or takes them from the cache; `state`, `keys` and `data` placed already."""
    sharding = placement.batch_sharding(placement.batch_mesh(config))
    tx = optim.for_config(config, decay=optim.decays(state.opt_state))
    static = dict(model=model, tx=tx, batch_size=config.batch_size,
                  batch_sharding=sharding, loss_form=config.loss,
                  halt_on_divergence=halt_on_divergence,
                  models_sharding=placement.models_sharding(
                      placement.models_mesh(config.model_parallel)))
    evaluation = dict(model=model, batch_size=config.eval_batch_size,
                      batch_sharding=sharding, loss_form=config.loss)
    epoch0 = jnp.asarray(epochs_done, jnp.int32)
    val = _rows(*data.rows("validation"))
    n_seeds, n_variants = tuple(state.step.shape)
    how = placement.resolve(config)
    if how == "stack" or n_seeds * n_variants == 1:
        compiled = compile_epoch(state, keys, data, epoch0, **static) if train else None
        evaluate = compile_evaluation(state, data.images, data.labels, *val, **evaluation)

        def run_stack(state, epoch):
            state, m = compiled(state, keys, data, epoch)
            return state, _with_validation(m, evaluate(state, data.images, data.labels, *val))

        return Runner(run_stack, lambda state, start, count: placement.to_host(
            evaluate(state, data.images, data.labels, *_rows(start, count))))

    seed_keys = [seed_of(keys, s) for s in range(n_seeds)]
    cell0 = cell(state, 0, 0)
    compiled = compile_epoch(cell0, seed_keys[0], data, epoch0, **static) if train else None
    evaluate = compile_evaluation(cell0, data.images, data.labels, *val, **evaluation)
    threads = placement.workers(n_seeds * n_variants) if how == "concurrent" else 1
    pool = placement.pool(threads) if threads > 1 else None

    def each_model(work, state):
        """`work(cell, seed_keys)` for every model: one after another, or from the pool,
        where each thread runs one model's programs and waits for them, so they overlap."""
        # Every cell is sliced first (an epoch donates its slice).
        inputs = [(cell(state, s, v), seed_keys[s])
                  for s in range(n_seeds) for v in range(n_variants)]
        if pool is None:  # one finished before the next starts: collectives never overlap
            out = [jax.block_until_ready(work(c, k)) for c, k in inputs]
        else:
            futures = [pool.submit(lambda c=c, k=k: jax.block_until_ready(work(c, k)))
                       for c, k in inputs]
            out = [f.result() for f in futures]
        return [out[s * n_variants:(s + 1) * n_variants] for s in range(n_seeds)]

    def run(state, epoch):
        def work(c, k):
            c, m = compiled(c, k, data, epoch)
            return c, _with_validation(m, evaluate(c, data.images, data.labels, *val))

        grid = each_model(work, state)
        return (merge([[c[0] for c in row] for row in grid]),
                merge([[c[1] for c in row] for row in grid]))

    def evaluate_all(state, start, count):
        rows = _rows(start, count)
        grid = placement.to_host(each_model(
            lambda c, k: evaluate(c, data.images, data.labels, *rows), state))
        return {key: np.array([[c[key][0, 0] for c in row] for row in grid])
                for key in grid[0][0]}

    return Runner(run, evaluate_all)


def _rows(start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """A range of rows as the evaluation program takes it: traced int32, one program for any."""
    return np.int32(start), np.int32(count)


def _with_validation(m: TrainMetrics, val: dict[str, jax.Array]) -> EpochMetrics:
    return EpochMetrics(m.loss, m.cross_entropy, m.penalty, m.accuracy, val["loss"],
                        val["cross_entropy"], val["accuracy"], m.bad_step, m.bad_loss)
