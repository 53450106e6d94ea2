"""A stack of models trained together, and the data they train on.

A stack is S seeds x V variants: every leaf of its TrainState has leading axes (S, V); its
histories, and the data rows `fit` placed on the devices, travel with it. It needs no
compiled program of this process to be read: `evaluate` compiles (or takes from the cache)
what it needs.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence

import jax
import numpy as np

from mnist_jax import kernels, optim, placement, preprocessing, programs
from mnist_jax.config import TrainConfig, Variant
from mnist_jax.data import MNIST
from mnist_jax.errors import ConfigError
from mnist_jax.model import MLP
from mnist_jax.steps import EpochData, RunKeys, TrainState

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

    def __post_init__(self):
        # Shapes and dtypes only (cheap, every time); from_arrays checks values and converts.
        for part in ("train", "val", "test"):
            images, labels = getattr(self, f"{part}_images"), getattr(self, f"{part}_labels")
            ok = (getattr(images, "ndim", 0) == 2 and images.shape[1:] == (784,)
                  and images.dtype == np.float32 and getattr(labels, "ndim", 0) == 2
                  and labels.shape == (len(images), 10) and labels.dtype == np.float32)
            if not ok:
                raise ConfigError(
                    f"Splits.{part}_images {_described(images)} and {part}_labels "
                    f"{_described(labels)}: a Splits holds (N, 784) float32 images in [0, 1] "
                    "and (N, 10) float32 one-hot labels; make it from your arrays with "
                    "Splits.from_arrays(train_images, train_labels, test_images, test_labels)")

    @classmethod
    def from_arrays(cls, train_images, train_labels, test_images, test_labels, *,
                    validation_split: float = 0.3) -> Splits:
        """Splits of your own data, checked: images (N, 28, 28) or (N, 784), uint8 (scaled by
        1/255) or floats in [0, 1]; labels (N,) integers 0..9 or one-hot (N, 10). The last
        `validation_split` of the training rows is held out, as Keras's `validation_split`.
        A problem raises ConfigError naming the array and the fix."""
        arrays = []
        for what, images, labels in (("train", train_images, train_labels),
                                     ("test", test_images, test_labels)):
            try:
                x = preprocessing.check_images(images)
                arrays.append((x, preprocessing.check_labels(labels, len(x))))
            except ConfigError as e:
                raise ConfigError(f"{what}: {e}") from None
        (x, y), test = arrays
        kept = (math.floor(len(x) * (1 - validation_split))
                if isinstance(validation_split, int | float) else 0)
        if not (isinstance(validation_split, int | float) and 0 <= validation_split < 1
                and kept >= 1 and (validation_split == 0 or kept < len(x))):
            raise ConfigError(f"validation_split {validation_split!r} must lie in [0, 1) and "
                              f"leave training and validation rows of the {len(x)} given")
        (x_train, y_train), (x_val, y_val) = preprocessing.validation_split(
            x, y, validation_split)
        return cls(x_train, y_train, x_val, y_val, *test)


def _described(a) -> str:
    return f"{a.shape} {a.dtype}" if hasattr(a, "shape") else type(a).__name__


def prepare(mnist: MNIST, validation_split: float = 0.3) -> Splits:
    """Flatten, scale, one-hot, and hold out the last `validation_split` as Keras does.

    The six arrays are read-only views of one images and one labels array, the training,
    validation and test rows back to back, on a 64-byte boundary: there XLA:CPU uses a host
    array in place, so `epoch_data` places them on the CPU device without a copy.
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


def epoch_data(splits: Splits, mesh=None) -> EpochData:
    """The training, validation and test rows, placed on the device(s) once, as one array."""
    return placement.put(EpochData(
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
    data: EpochData | None = None  # the data set's rows placed on the devices (`place`)

    def place(self, splits: Splits) -> EpochData:
        """Puts the data set's rows on the stack's devices once (`fit` does); returns them."""
        self.data = epoch_data(splits, placement.devices_mesh(self.config))
        self.keys = placement.put(self.keys, placement.devices_mesh(self.config))
        return self.data

    def evaluate(self, split: str) -> dict[str, np.ndarray]:
        """Loss, cross-entropy, penalty and accuracy of every model on the 'train',
        'validation' or 'test' rows placed on the devices (by `fit`, or `place`), by the
        evaluation program `fit` compiled with the epoch (compiled here if none was); arrays
        of shape (S, V)."""
        if self.data is None:
            raise ValueError("Stack.evaluate needs the data on the devices: call "
                             "stack.place(splits) (fit does), or use "
                             "fit.evaluate_models(stack, images, labels)")
        state = placement.place_state(self.state, self.config)
        run = programs.runner(self.model, self.config, state, self.keys, self.data,
                              self.epochs_done, train=False)
        return run.evaluate(state, *self.data.rows(split))

    def params(self, variant: str, seed_index: int = 0):
        """The parameters of one model of the stack."""
        v = [x.name for x in self.variants].index(variant)
        if not -len(self.seeds) <= seed_index < len(self.seeds):  # a traced index would clamp
            raise IndexError(f"seed_index {seed_index} is out of range for "
                             f"{len(self.seeds)} seed(s)")
        return programs.model_of(self.state.params, seed_index, v)


def model_for(config: TrainConfig, dropout: bool) -> MLP:
    """The MLP of a config: its widths, dtype, precision and dropout generator, with dropout
    layers if `dropout`; the row-major matmul unless a batch or the models are split."""
    unsplit = config.data_parallel == 1 and config.model_parallel == 1
    return MLP(hidden=config.hidden, dropout=dropout,
               dtype=None if config.dtype == "float32" else config.dtype,
               precision=None if config.matmul_precision == "default" else "highest",
               dot_general=kernels.RowMajorDot if unsplit else kernels.Dot,
               dropout_bits=kernels.dropout_bits(config.dropout_rng))


def init_stack(variants: Sequence[Variant], seeds: Sequence[int], config: TrainConfig,
               decay: bool | None = None) -> tuple[MLP, TrainState, RunKeys]:
    """The model, a fresh (S, V) stack of states, and the per-seed keys. `decay`: whether the
    optimizer decays weights (default: if any variant does); a run whose stacks differ in
    which points they hold (a sweep's chunks) decides it once, so that a model's numbers
    never depend on its neighbours (optim.keras_adamw with decay 0 rounds otherwise)."""
    for variant in variants:
        variant.validate(config.hidden)
    decaying = any(v.weight_decay > 0 for v in variants)
    if decay is None:
        decay = decaying
    elif decaying and not decay:
        raise ValueError("decay=False with a variant whose weight_decay > 0 would not decay it")
    model = model_for(config, dropout=any(v.dropout > 0 for v in variants))
    state, keys = programs.init_program()(
        tuple(jax.random.key(seed) for seed in seeds),
        np.array([v.learning_rate_or(config.learning_rate) for v in variants], np.float32),
        np.array([v.l2_vector(config.hidden) for v in variants], np.float32),
        np.array([v.dropout_vector(config.hidden) for v in variants], np.float32),
        np.array([v.weight_decay for v in variants], np.float32),
        model=model, tx=optim.for_config(config, decay=decay))
    return model, state, keys


def new_stack(variants: Sequence[Variant], seeds: Sequence[int], config: TrainConfig,
              n_train: int = 60000, *, decay: bool | None = None) -> Stack:
    """A validated, freshly initialised stack, ready for `fit` (`decay`: see init_stack)."""
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
    model, state, keys = init_stack(variants, seeds, config, decay)
    jax.block_until_ready(state)
    histories = {v.name: [{} for _ in seeds] for v in variants}
    return Stack(model, config, tuple(variants), tuple(seeds), state, keys, histories,
                 compile_seconds=time.perf_counter() - t0)
