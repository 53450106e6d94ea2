"""The host side of training: data on the device once, a stack of models, the epoch loop.

`train` fits one model and `train_stack` many (seeds x variants) with one compiled program;
both compile once (timed apart), then make one device call per epoch (per model with the
sequential and concurrent placements, several at once with the latter), reading back only that
epoch's metrics for the history and the bar.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mnist_jax import kernels, parallel, preprocessing, runtime
from mnist_jax.config import VARIANTS, TrainConfig, Variant
from mnist_jax.data import MNIST
from mnist_jax.errors import ConfigError, TrainingDiverged
from mnist_jax.model import MLP
from mnist_jax.progress import ProgressBar
from mnist_jax.steps import (
    DIVERGED_CROSS_ENTROPY,
    EpochData,
    EpochMetrics,
    Hyperparams,
    RunKeys,
    TrainMetrics,
    TrainState,
    create_train_state,
    evaluate_rows_stack,
    evaluate_stack,
    optimizer,
    steps_per_epoch,
    train_epoch,
)

History = dict[str, list[float]]
HISTORY_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy", "cross_entropy", "penalty",
                "val_cross_entropy")


@dataclasses.dataclass(frozen=True, eq=False)
class Splits:
    """Preprocessed host arrays: images (N, 784) float32 in [0, 1], labels (N, 10) one-hot.
    `prepare`'s are read-only (the CPU device may share their memory); `np.array(x)` gives
    a copy to change."""

    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def prepare(mnist: MNIST, validation_split: float = 0.3) -> Splits:
    """Flatten, scale, one-hot, and hold out the last `validation_split` as Keras does.

    The six arrays are read-only views of one images and one labels array, the training,
    validation and test rows back to back, on a 64-byte boundary: there XLA:CPU uses a host
    array in place, so `epoch_data` places them on the CPU device without a copy (copying
    220 MB took 0.08-0.5 s on 2 cores, page faults included).
    """
    train = preprocessing.flatten(mnist.train_images)
    test = preprocessing.flatten(mnist.test_images)
    n = len(train)
    images = _aligned_empty((n + len(test), train.shape[1]), np.float32)
    preprocessing.scale(train, out=images[:n])
    preprocessing.scale(test, out=images[n:])
    labels = _aligned_empty((len(images), 10), np.float32)
    labels[:] = preprocessing.one_hot(np.concatenate([mnist.train_labels, mnist.test_labels]))
    for a in (images, labels):  # a device array may share their memory
        a.flags.writeable = False
    (x_train, y_train), (x_val, y_val) = preprocessing.validation_split(
        images[:n], labels[:n], validation_split)
    return Splits(x_train, y_train, x_val, y_val, images[n:], labels[n:])


def _aligned_empty(shape: tuple[int, ...], dtype, alignment: int = 64) -> np.ndarray:
    """np.empty whose data starts on an `alignment`-byte boundary (NumPy's is 16)."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(size + alignment, np.uint8)
    skip = -raw.ctypes.data % alignment
    return raw[skip:skip + size].view(dtype).reshape(shape)


@dataclasses.dataclass(eq=False)
class Stack:
    """Models trained together: `state` leaves have leading axes (len(seeds), len(variants)).

    `histories[variant.name][i]` is the Keras-style history of that variant with `seeds[i]`.
    """

    model: MLP
    config: TrainConfig
    variants: tuple[Variant, ...]
    seeds: tuple[int, ...]
    state: TrainState
    keys: RunKeys
    histories: dict[str, list[History]]
    epochs_done: int = 0
    compile_seconds: float = 0.0  # compiling and running the initialiser, compiling the epoch
    train_seconds: float = 0.0
    # Models that diverged while training went on (fit's halt_on_divergence=False): the first
    # time each did, {"variant", "seed", "epoch", "step", "loss"}.
    diverged: list[dict] = dataclasses.field(default_factory=list)
    data: EpochData | None = None  # the data set's rows fit placed on the devices
    runner: Runner | None = dataclasses.field(default=None, repr=False)  # fit's programs

    def evaluate(self, split: str) -> dict[str, np.ndarray]:
        """Loss, cross-entropy, penalty and accuracy of every model on the 'train',
        'validation' or 'test' rows `fit` placed on the devices, by the evaluation program it
        compiled with the epoch (no compilation here); arrays of shape (S, V)."""
        if self.runner is None or self.data is None:
            raise ValueError("Stack.evaluate needs the programs and data of a fit in this "
                             "process; call fit.fit(stack, splits) first, or use "
                             "fit.evaluate_models(stack, images, labels)")
        return self.runner.evaluate(place_state(self.state, self.config),
                                    *self.data.rows(split))

    def params(self, variant: str, seed_index: int = 0):
        """The parameters of one model of the stack."""
        v = [x.name for x in self.variants].index(variant)
        if not -len(self.seeds) <= seed_index < len(self.seeds):  # a traced index would clamp
            raise IndexError(f"seed_index {seed_index} is out of range for "
                             f"{len(self.seeds)} seed(s)")
        return _model_of(self.state.params, seed_index, v)


def run_keys(seed: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(init_key, shuffle_key, dropout_key): one root key per seed, split by purpose."""
    return _purpose_keys(jax.random.key(seed))


def _purpose_keys(root: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    init_key, shuffle_key, dropout_key = jax.random.split(root, 3)
    return init_key, shuffle_key, dropout_key


def _init_models(roots: tuple[jax.Array, ...], learning_rates: jax.Array, l2: jax.Array,
                 dropout: jax.Array, *, model: MLP, tx: optax.GradientTransformation,
                 ) -> tuple[TrainState, RunKeys]:
    """The (S, V) stack of fresh states, from each seed's root key and each variant's
    learning rate, L2 and dropout rows (V, ...), and the (S,) shuffle and dropout keys.
    Every variant of a seed starts from the same parameters."""
    def per_seed(root):
        init_key, shuffle_key, dropout_key = _purpose_keys(root)
        states = jax.vmap(lambda lr, l2_row, dropout_row: create_train_state(
            init_key, model, tx, Hyperparams(l2=l2_row, dropout=dropout_row),
            learning_rate=lr))(learning_rates, l2, dropout)
        return states, shuffle_key, dropout_key

    states, shuffle, dropout_keys = jax.vmap(per_seed)(jnp.stack(roots))
    return states, RunKeys(shuffle, dropout_keys)


@functools.cache
def _init_program():
    """The initialiser of a whole stack, jitted once per process: one compiled program per
    model, optimizer and stack shape, whatever the seeds, variants and learning rates (it
    was a program per model plus one per leaf to stack them: 0.55 s more of a cold start).

    On CPU it is compiled at LLVM optimisation level 2 instead of XLA's default 3: its
    Threefry draws for the Glorot kernels took 2.0 s to compile on 2 cores, at level 2 0.8 s,
    for the same run time (5-7 ms a model) and bitwise the same parameters (tested).
    """
    options = {"xla_backend_optimization_level": 2} if jax.default_backend() == "cpu" else {}
    return jax.jit(_init_models, static_argnames=("model", "tx"), compiler_options=options)


def init_stack(variants: Sequence[Variant], seeds: Sequence[int], config: TrainConfig,
               ) -> tuple[MLP, TrainState, RunKeys]:
    """The model, a fresh (S, V) stack of states, and the per-seed keys."""
    for variant in variants:
        variant.validate(config.hidden)
    model = model_for(config, dropout=any(v.dropout > 0 for v in variants))
    state, keys = _init_program()(
        tuple(jax.random.key(seed) for seed in seeds),
        np.array([v.learning_rate_or(config.learning_rate) for v in variants], np.float32),
        np.array([v.l2_vector(config.hidden) for v in variants], np.float32),
        np.array([v.dropout_vector(config.hidden) for v in variants], np.float32),
        model=model, tx=tx_for(config))
    return model, state, keys


def model_for(config: TrainConfig, dropout: bool) -> MLP:
    """The MLP of a config: its widths, dtype, precision and dropout generator, with dropout
    layers if `dropout`; the row-major matmul unless a batch or the models are split."""
    unsplit = config.data_parallel == 1 and config.model_parallel == 1
    return MLP(hidden=config.hidden, dropout=dropout,
               dtype=None if config.dtype == "float32" else config.dtype,
               precision=None if config.matmul_precision == "default" else "highest",
               dot_general=kernels.RowMajorDot if unsplit else kernels.Dot,
               dropout_bits=kernels.dropout_bits(config.dropout_rng))


def tx_for(config: TrainConfig) -> optax.GradientTransformation:
    """The (cached) optimizer of a config: its Adam with its b1, b2 and eps."""
    return optimizer(config.optimizer, config.b1, config.b2, config.eps)


_train_epoch = jax.jit(train_epoch, donate_argnames=("state",),
                       static_argnames=("model", "tx", "batch_size", "batch_sharding",
                                        "loss_form", "halt_on_divergence", "models_sharding"))
_evaluate_rows = jax.jit(evaluate_rows_stack,
                         static_argnames=("model", "batch_size", "batch_sharding", "loss_form"))


def compiler_options() -> dict[str, bool]:
    """XLA options for the epoch program. On CPU, copy insertion with region analysis lets the
    step loop update the weights in place; without it XLA copied W1 and W2 every step
    (measured: 6% of a lone model's step)."""
    if jax.default_backend() != "cpu":
        return {}
    return {"xla_cpu_copy_insertion_use_region_analysis": True}


def compile_epoch(*args, **static):
    """`train_epoch` compiled ahead of time for these arguments (see `compiler_options`).

    Compiled once per process for each shape, dtype, sharding and static setting: a second
    `fit` of the same kind (another seed, variant or learning rate, a sweep from Python) reuses
    the program, as `jax.jit` would, instead of compiling it again.
    """
    return _compiled(_train_epoch, args, static, compiler_options())


def compile_evaluation(*args, **static):
    """`evaluate_rows_stack` compiled ahead of time for these arguments, once per process
    for each kind (as `compile_epoch`)."""
    return _compiled(_evaluate_rows, args, static, {})


def _compiled(jitted, args, static, options):
    leaves, treedef = jax.tree.flatten(args)
    specs = tuple((x.shape, x.dtype, getattr(x, "weak_type", False),
                   getattr(x, "sharding", None)) for x in leaves)
    slot = _program_slot((jitted, treedef, specs, tuple(sorted(static.items())),
                          tuple(sorted(options.items()))))
    if not slot:  # lowered from the arrays themselves: uncommitted ones may follow a mesh
        slot.append(jitted.lower(*args, **static).compile(compiler_options=options))
    return slot[0]


@functools.lru_cache(maxsize=32)
def _program_slot(key) -> list:
    """The compiled program of `key` once `_compiled` has put it there."""
    return []


_evaluate_stack = jax.jit(evaluate_stack,
                          static_argnames=("model", "batch_size", "batch_sharding", "loss_form"))


def data_mesh(config: TrainConfig):
    """The mesh each batch is split over, or None (one device, or the models split instead:
    with several hosts `parallel.data_mesh(1)` is one device of the first host)."""
    return None if config.model_parallel > 1 else parallel.data_mesh(config.data_parallel)


def devices_mesh(config: TrainConfig):
    """The mesh a stack's data (replicated) and keys live on: the data mesh, or the one its
    models are split over, or None for the default device."""
    return data_mesh(config) or parallel.models_mesh(config.model_parallel)


def place_state(state: TrainState, config: TrainConfig) -> TrainState:
    """A stack's state on its devices: replicated for data parallelism, the variants axis
    split over `config.model_parallel` devices (each trains its share), or on the default
    device."""
    if config.model_parallel > 1:
        return parallel.put_models(state, parallel.models_mesh(config.model_parallel))
    return parallel.put(state, data_mesh(config))


def epoch_data(splits: Splits, mesh=None) -> EpochData:
    """The training, validation and test rows, placed on the device(s) once, as one array."""
    return parallel.put(EpochData(
        _joined(splits.train_images, splits.val_images, splits.test_images),
        _joined(splits.train_labels, splits.val_labels, splits.test_labels),
        n_train=len(splits.train_images), n_val=len(splits.val_images)), mesh)


def _joined(*parts: np.ndarray) -> np.ndarray:
    """The parts as one array: a read-only view of their memory when they lie back to back
    in one buffer, as `prepare` leaves them; else a copy."""
    parts = tuple(np.asarray(p) for p in parts)
    first, owner = parts[0], parts[0].base
    if isinstance(owner, np.ndarray) and owner.flags.c_contiguous and all(
            p.base is owner and p.flags.c_contiguous and p.dtype == first.dtype
            and p.shape[1:] == first.shape[1:] for p in parts):
        at = [p.__array_interface__["data"][0] for p in parts]
        if all(at[i] + parts[i].nbytes == at[i + 1] for i in range(len(parts) - 1)):
            joined = np.ndarray((sum(len(p) for p in parts), *first.shape[1:]), first.dtype,
                                buffer=owner,
                                offset=at[0] - owner.__array_interface__["data"][0])
            joined.flags.writeable = False
            return joined
    return np.concatenate(parts)


def _describe(metrics: EpochMetrics, stack: Stack) -> str:
    """The progress bar's metrics: each variant's (seed-averaged) latest numbers."""
    if len(stack.variants) > 4:  # a sweep: the best and the mean, not every model
        val = metrics.val_accuracy.mean(axis=0)
        key = val if np.isfinite(val).any() else metrics.accuracy.mean(axis=0)
        best = int(np.argmax(np.where(np.isfinite(key), key, -np.inf)))
        return (f"{len(stack.variants)} configurations: best {stack.variants[best].name} "
                f"{key[best]:.4f}, mean {np.nanmean(key):.4f}")
    parts = []
    one = len(stack.variants) == 1
    for v, variant in enumerate(stack.variants):
        acc, val_acc = metrics.accuracy[:, v].mean(), metrics.val_accuracy[:, v].mean()
        loss, val_loss = metrics.loss[:, v].mean(), metrics.val_loss[:, v].mean()
        if one:
            parts.append(f"loss {loss:.4f} acc {acc:.4f} val_loss {val_loss:.4f} "
                         f"val_acc {val_acc:.4f}")
        else:
            parts.append(f"{variant.name} {acc:.4f}/{val_acc:.4f}")
    return ("" if one else "acc/val_acc ") + " | ".join(parts)


def placement(config: TrainConfig) -> str:
    """How the models of a stack share the device.

    'stack': all models in one vmapped step. 'sequential': one model at a time, each with the
    same single-model program. 'concurrent': the same programs, several at once from host
    threads (one per CPU core, `workers`), each model's numbers bit for bit those of
    'sequential'. 'auto' picks concurrent on CPU (a lone batch-128 step cannot keep two cores
    busy: 1.3 ms on one core, 1.0 ms on two; two to eight models at once measured 1.15-1.5x
    the throughput of one after another by machine, a vmapped stack 0.9-1.0x, see benchmarks/),
    sequential on CPU with --data-parallel (concurrent programs' collectives could
    interleave), and the stack on accelerators, which it keeps busy.
    """
    if config.placement != "auto":
        return config.placement
    if jax.default_backend() != "cpu" or config.model_parallel > 1:
        return "stack"
    return "concurrent" if config.data_parallel == 1 else "sequential"


def workers(n_models: int) -> int:
    """Host threads of the concurrent placement: one per CPU core this process may use."""
    return max(1, min(n_models, runtime.usable_cores()))


@functools.cache
def _pool(n: int) -> concurrent.futures.ThreadPoolExecutor:
    """The concurrent placement's threads, made once per process."""
    return concurrent.futures.ThreadPoolExecutor(n, thread_name_prefix="mnist_jax-model")


# Slicing and merging run as one program each for the whole tree: leaf by leaf, every leaf
# shape compiled its own (27 small programs, 0.4 s of a cold start).
@jax.jit
def _cell(tree, s, v):
    """The (1, 1) stack of model (s, v)."""
    return jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(
        jax.lax.dynamic_slice_in_dim(a, s, 1, axis=0), v, 1, axis=1), tree)


@jax.jit
def _merge(grid: list[list]):
    """(1, 1) stacks in a grid -> one (S, V) stack."""
    return jax.tree.map(lambda *leaves: jnp.concatenate(
        [jnp.concatenate(leaves[r * len(grid[0]):(r + 1) * len(grid[0])], axis=1)
         for r in range(len(grid))], axis=0), *[cell for row in grid for cell in row])


@jax.jit
def _seed_of(keys: RunKeys, s) -> RunKeys:
    """Seed s's (1,) keys of the (S,) ones."""
    return jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, s, 1), keys)


@jax.jit
def _model_of(tree, s, v):
    """Model (s, v) of an (S, V) stack, without the two axes."""
    return jax.tree.map(lambda a: a[s, v], tree)


@dataclasses.dataclass(frozen=True)
class Runner:
    """A stack's compiled programs, run by its placement: `epoch(state, epoch)` trains one
    epoch and evaluates the validation rows, `evaluate(state, start, count)` any rows of
    the stack's data (host arrays of shape (S, V))."""

    epoch: Callable[[TrainState, jax.Array], tuple[TrainState, EpochMetrics]]
    evaluate: Callable[[TrainState, int, int], dict[str, np.ndarray]]


def _runner(stack: Stack, state: TrainState, keys: RunKeys, data: EpochData, mesh,
            halt_on_divergence: bool = True) -> Runner:
    """Compiles the epoch and the evaluation once (AOT, so compilation is timed apart) for
    the placement."""
    config = stack.config
    sharding = parallel.batch_sharding(mesh)
    static = dict(model=stack.model, tx=tx_for(config), batch_size=config.batch_size,
                  batch_sharding=sharding, loss_form=config.loss,
                  halt_on_divergence=halt_on_divergence,
                  models_sharding=parallel.models_sharding(
                      parallel.models_mesh(config.model_parallel)))
    evaluation = dict(model=stack.model, batch_size=config.eval_batch_size,
                      batch_sharding=sharding, loss_form=config.loss)
    epoch0 = jnp.asarray(stack.epochs_done, jnp.int32)
    val = _rows(*data.rows("validation"))
    n_seeds, n_variants = len(stack.seeds), len(stack.variants)
    if placement(config) == "stack" or n_seeds * n_variants == 1:
        compiled = compile_epoch(state, keys, data, epoch0, **static)
        evaluate = compile_evaluation(state, data.images, data.labels, *val, **evaluation)

        def run_stack(state, epoch):
            state, m = compiled(state, keys, data, epoch)
            return state, _with_validation(m, evaluate(state, data.images, data.labels, *val))

        return Runner(run_stack, lambda state, start, count: parallel.to_host(
            evaluate(state, data.images, data.labels, *_rows(start, count))))

    seed_keys = [_seed_of(keys, s) for s in range(n_seeds)]
    cell0 = _cell(state, 0, 0)
    compiled = compile_epoch(cell0, seed_keys[0], data, epoch0, **static)
    evaluate = compile_evaluation(cell0, data.images, data.labels, *val, **evaluation)
    threads = workers(n_seeds * n_variants) if placement(config) == "concurrent" else 1
    pool = _pool(threads) if threads > 1 else None

    def each_model(work, state):
        """`work(cell, seed_keys)` for every model: one after another, or from the pool,
        where each thread runs one model's programs and waits for them, so they overlap."""
        # Every cell is sliced first (an epoch donates its slice).
        inputs = [(_cell(state, s, v), seed_keys[s])
                  for s in range(n_seeds) for v in range(n_variants)]
        if pool is None:  # one finished before the next starts: collectives never overlap
            out = [jax.block_until_ready(work(cell, k)) for cell, k in inputs]
        else:
            futures = [pool.submit(lambda cell=cell, k=k: jax.block_until_ready(work(cell, k)))
                       for cell, k in inputs]
            out = [f.result() for f in futures]
        return [out[s * n_variants:(s + 1) * n_variants] for s in range(n_seeds)]

    def run(state, epoch):
        def work(cell, k):
            cell, m = compiled(cell, k, data, epoch)
            return cell, _with_validation(m, evaluate(cell, data.images, data.labels, *val))

        grid = each_model(work, state)
        return (_merge([[c[0] for c in row] for row in grid]),
                _merge([[c[1] for c in row] for row in grid]))

    def evaluate_all(state, start, count):
        rows = _rows(start, count)
        grid = parallel.to_host(each_model(
            lambda cell, k: evaluate(cell, data.images, data.labels, *rows), state))
        return {key: np.array([[cell[key][0, 0] for cell in row] for row in grid])
                for key in grid[0][0]}

    return Runner(run, evaluate_all)


def _rows(start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """A range of rows as the evaluation program takes it: traced int32, one program for any."""
    return np.int32(start), np.int32(count)


def _with_validation(m: TrainMetrics, val: dict[str, jax.Array]) -> EpochMetrics:
    return EpochMetrics(m.loss, m.cross_entropy, m.penalty, m.accuracy, val["loss"],
                        val["cross_entropy"], val["accuracy"], m.bad_step, m.bad_loss)


def fit(stack: Stack, splits: Splits, *, progress: bool = True,
        on_epoch_end: Callable[[Stack], None] | None = None,
        halt_on_divergence: bool = True) -> Stack:
    """Trains the stack from `stack.epochs_done` to `config.epochs`, in place; returns it.

    `on_epoch_end(stack)` runs after every epoch (checkpoints, interruption); it may replace
    `stack.state`. Raises TrainingDiverged, after `on_epoch_end` has seen every good epoch,
    when a model's loss turns non-finite or explodes; with `halt_on_divergence=False` such a
    model keeps its last good state, is listed in `stack.diverged`, and the others train on.
    """
    config = stack.config
    mesh = data_mesh(config)
    devices = devices_mesh(config)
    data = stack.data = epoch_data(splits, devices)
    state = place_state(stack.state, config)
    keys = stack.keys = parallel.put(stack.keys, devices)  # global arrays for checkpoints too
    t0 = time.perf_counter()
    runner = stack.runner = _runner(stack, state, keys, data, mesh, halt_on_divergence)
    stack.compile_seconds += time.perf_counter() - t0

    desc = stack.variants[0].name if len(stack.variants) == 1 else "epoch"
    bar = ProgressBar(config.epochs, desc, enabled=progress, start=stack.epochs_done)
    steps = steps_per_epoch(len(splits.train_images), config.batch_size)
    try:
        for epoch in range(stack.epochs_done, config.epochs):
            t0 = time.perf_counter()
            state, metrics = runner.epoch(state, jnp.asarray(epoch, jnp.int32))
            metrics = EpochMetrics(*parallel.to_host(metrics))
            stack.train_seconds += time.perf_counter() - t0
            if halt_on_divergence:
                _check_finite(metrics, stack, epoch, steps)
            else:
                _record_diverged(metrics, stack, epoch)
            stack.state = state
            stack.epochs_done = epoch + 1
            _append(stack, metrics)
            bar.update(epoch + 1, _describe(metrics, stack))
            if on_epoch_end is not None:
                on_epoch_end(stack)  # it may replace stack.state (a placement, say)
                state = place_state(stack.state, config)
    finally:
        bar.close()
    return stack


def _check_finite(metrics: EpochMetrics, stack: Stack, epoch: int, steps: int) -> None:
    bad = np.argwhere(metrics.bad_step >= 0)
    if not len(bad):
        return
    s, v = bad[0]
    step = int(metrics.bad_step[s, v]) + 1
    loss = float(metrics.bad_loss[s, v])
    what = (f"the loss became {loss}" if not np.isfinite(loss) else
            f"the loss exploded to {loss:.3g} (cross-entropy above {DIVERGED_CROSS_ENTROPY:g})")
    name = stack.variants[v].name
    raise TrainingDiverged(
        f"variant {name!r} (seed {stack.seeds[s]}) diverged: {what} at epoch {epoch + 1}, "
        f"step {step} of {steps}; training stopped there and the last good checkpoint is "
        f"kept. Lower the learning rate (--lr {stack.config.learning_rate:g}).",
        variant=name, epoch=epoch + 1, step=step)


def _record_diverged(metrics: EpochMetrics, stack: Stack, epoch: int) -> None:
    """Adds each model that diverged in this epoch for the first time to `stack.diverged`."""
    seen = {(d["variant"], d["seed"]) for d in stack.diverged}
    for s, v in np.argwhere(metrics.bad_step >= 0):
        key = (stack.variants[v].name, stack.seeds[s])
        if key not in seen:
            stack.diverged.append({"variant": key[0], "seed": key[1], "epoch": epoch + 1,
                                   "step": int(metrics.bad_step[s, v]) + 1,
                                   "loss": float(metrics.bad_loss[s, v])})


def _append(stack: Stack, metrics: EpochMetrics) -> None:
    has_val = stack.config.validation_split > 0
    for v, variant in enumerate(stack.variants):
        for s in range(len(stack.seeds)):
            history = stack.histories[variant.name][s]
            for key in HISTORY_KEYS:
                if key.startswith("val_") and not has_val:
                    continue
                history.setdefault(key, []).append(float(getattr(metrics, key)[s, v]))


def new_stack(variants: Sequence[Variant], seeds: Sequence[int], config: TrainConfig,
              n_train: int = 60000) -> Stack:
    """A validated, freshly initialised stack, ready for `fit`."""
    config.validate(n_train)
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"two variants share the name {twice[0]!r}: names identify results; "
                          "give each its own (Variant.with_values(..., name=...))")
    if len(variants) % config.model_parallel:
        raise ConfigError(f"{len(variants)} variants cannot be split evenly over "
                          f"--model-parallel {config.model_parallel} devices; make the count a "
                          "multiple of it")
    t0 = time.perf_counter()
    model, state, keys = init_stack(variants, seeds, config)
    jax.block_until_ready(state)
    histories = {v.name: [{} for _ in seeds] for v in variants}
    return Stack(model, config, tuple(variants), tuple(seeds), state, keys, histories,
                 compile_seconds=time.perf_counter() - t0)


def train_stack(data: MNIST | Splits, variants: Sequence[Variant], seeds: Sequence[int] = (0,),
                config: TrainConfig = TrainConfig(), *, progress: bool = True) -> Stack:
    """Trains len(seeds) x len(variants) models in one compiled program (`config.placement`).

    Returns the Stack: `histories[name][i]` (Keras-style, seed `seeds[i]`),
    `params(name, i)`, and with `evaluate_models(stack, images, labels)` every model's test
    metrics. `progress=False` turns the per-epoch progress bar off.
    """
    splits = data if isinstance(data, Splits) else prepare(data, config.validation_split)
    stack = new_stack(variants, seeds, config,
                      len(splits.train_images) + len(splits.val_images))
    return fit(stack, splits, progress=progress)


@dataclasses.dataclass(frozen=True, eq=False)
class TrainResult:
    """One trained model: its parameters, Keras-style history, full state and module."""

    params: dict
    history: History
    state: TrainState
    model: MLP
    variant: Variant
    seed: int


def train(data: MNIST | Splits, variant: str | Variant = "baseline",
          config: TrainConfig = TrainConfig(), *, seed: int = 0,
          progress: bool = True) -> TrainResult:
    """Trains one model (a 1 x 1 stack, compiled exactly as an unbatched model); a variant by
    name or a `Variant`. `progress=False` turns the per-epoch progress bar off."""
    if isinstance(variant, str):
        if variant not in VARIANTS:
            raise ConfigError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
        variant = VARIANTS[variant]
    stack = train_stack(data, [variant], [seed], config, progress=progress)
    state = jax.tree.map(lambda a: a[0, 0], stack.state)
    return TrainResult(state.params, stack.histories[variant.name][0], state, stack.model,
                       variant, seed)


def evaluate(model: MLP, state: TrainState, images: np.ndarray, labels: np.ndarray, *,
             batch_size: int = 2000, loss: str = "logits") -> dict[str, float]:
    """Loss (cross-entropy of form `loss` + L2 penalty, as Keras) and accuracy of one model on
    a data set."""
    stacked = jax.tree.map(lambda a: jnp.asarray(a)[None, None], state)
    out = _evaluate_stack(stacked, jnp.asarray(images), jnp.asarray(labels), model=model,
                          batch_size=batch_size, loss_form=loss)
    return {k: float(v[0, 0]) for k, v in out.items()}


def evaluate_models(stack: Stack, images: np.ndarray | jax.Array,
                    labels: np.ndarray | jax.Array) -> dict[str, np.ndarray]:
    """Loss, cross-entropy, penalty and accuracy of every model; arrays of shape (S, V).
    `images` may be arrays already on the devices (`stack.data`'s, say)."""
    mesh = data_mesh(stack.config)
    state = place_state(stack.state, stack.config)
    images, labels = parallel.put((images, labels), devices_mesh(stack.config))
    out = _evaluate_stack(state, images, labels, model=stack.model,
                          batch_size=stack.config.eval_batch_size,
                          batch_sharding=parallel.batch_sharding(mesh),
                          loss_form=stack.config.loss)
    return parallel.to_host(out)


@functools.partial(jax.jit, static_argnames=("model",))
def _predict(model: MLP, params, images: jax.Array) -> jax.Array:
    return jnp.argmax(model.apply({"params": params}, images), -1)


def predict(model: MLP, params, images: np.ndarray, *, batch_size: int = 2000,
            mesh=None) -> np.ndarray:
    """Predicted class of each image (N, 784), in inference mode, a chunk at a time."""
    params = parallel.put(params, mesh)
    chunks = [_predict(model, params, parallel.put(images[i:i + batch_size], mesh))
              for i in range(0, len(images), batch_size)]
    return np.concatenate([parallel.to_host(c) for c in chunks])
