"""Training and using stacks of models: the epoch loop on the host, one model or many.

`train` fits one model and `train_stack` many (seeds x variants) with one compiled program;
both compile once (timed apart), then make one device call per epoch (per model with the
sequential and concurrent placements, several at once with the latter), reading back only
that epoch's metrics for the history and the bar.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mnist_jax import placement, programs
from mnist_jax.config import VARIANTS, TrainConfig, Variant
from mnist_jax.data import MNIST
from mnist_jax.errors import ConfigError, TrainingDiverged
from mnist_jax.model import MLP
from mnist_jax.preprocessing import check_images, check_labels
from mnist_jax.progress import ProgressBar
from mnist_jax.stacks import HISTORY_KEYS, History, Splits, Stack, new_stack, prepare
from mnist_jax.steps import DIVERGED_CROSS_ENTROPY, EpochMetrics, TrainState, steps_per_epoch

__all__ = ["Splits", "Stack", "TrainResult", "evaluate", "evaluate_models", "fit", "new_stack",
           "predict", "prepare", "train", "train_stack"]


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
    data = stack.place(splits)  # the keys too: global arrays for checkpoints
    state = placement.place_state(stack.state, config)
    t0 = time.perf_counter()
    runner = programs.runner(stack.model, config, state, stack.keys, data, stack.epochs_done,
                             halt_on_divergence)
    stack.compile_seconds += time.perf_counter() - t0

    desc = stack.variants[0].name if len(stack.variants) == 1 else "epoch"
    bar = ProgressBar(config.epochs, desc, enabled=progress, start=stack.epochs_done)
    steps = steps_per_epoch(len(splits.train_images), config.batch_size)
    try:
        for epoch in range(stack.epochs_done, config.epochs):
            t0 = time.perf_counter()
            state, metrics = runner.epoch(state, jnp.asarray(epoch, jnp.int32))
            metrics = EpochMetrics(*placement.to_host(metrics))
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
                on_epoch_end(stack)  # it may replace stack.state (a restore, say)
                state = placement.place_state(stack.state, config)
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
    variant = stack.variants[v]
    name = variant.name
    # A decay whose step (weight_decay * lr) passes 1 flips every weight's sign: name it too.
    decay = (f" or the weight decay (--weight-decay {variant.weight_decay:g})"
             if variant.weight_decay else "")
    raise TrainingDiverged(
        f"variant {name!r} (seed {stack.seeds[s]}) diverged: {what} at epoch {epoch + 1}, "
        f"step {step} of {steps}; training stopped there and the last good checkpoint is "
        f"kept. Lower the learning rate (--lr {stack.config.learning_rate:g}){decay}.",
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


def evaluate(model: MLP | Stack, *args, variant: str | None = None, seed: int | None = None,
             batch_size: int = 2000, loss: str | None = None) -> dict[str, float]:
    """Loss (cross-entropy of form `loss` + L2 penalty, as Keras), cross-entropy, penalty
    and accuracy of one model on a data set:

        evaluate(result.model, result.state, images, labels)        # one model (train)
        evaluate(stack, images, labels, variant="dropout", seed=0)  # one of a stack's

    `images` (N, 784) or (N, 28, 28), uint8 (scaled by 1/255) or floats in [0, 1]; `labels`
    (N,) integers 0..9 or one-hot (N, 10). `loss` defaults to 'logits', or the stack's.
    """
    if isinstance(model, Stack):
        stack = model
        if len(args) != 2 or variant is None or seed is None:
            raise ConfigError("evaluate(stack, images, labels, variant=..., seed=...): name the "
                              f"stack's model by variant ({', '.join(stack_names(stack))}) "
                              f"and seed ({', '.join(map(str, stack.seeds))})")
        v = stack_names(stack).index(_known(variant, stack_names(stack), "variant"))
        s = stack.seeds.index(_known(seed, stack.seeds, "seed"))
        # That model alone off the devices, not the stack with its optimizer states.
        state = placement.to_host(programs.model_of(
            stack.state.replace(opt_state=None), s, v))
        model, loss = stack.model, stack.config.loss if loss is None else loss
        images, labels = args
    else:
        if len(args) != 2 + 1:
            raise ConfigError("evaluate(model, state, images, labels): one model and its state "
                              "(train's result.model, result.state), or evaluate(stack, "
                              "images, labels, variant=..., seed=...)")
        state, images, labels = args
        if np.ndim(state.step) != 0:
            raise ConfigError(f"evaluate: this state holds a stack of {np.shape(state.step)} "
                              "models; pass the Stack itself: evaluate(stack, images, labels, "
                              "variant=..., seed=...)")
    images = check_images(images)
    labels = check_labels(labels, len(images))
    stacked = jax.tree.map(lambda a: jnp.asarray(a)[None, None], state)
    out = programs.evaluate_all_rows(stacked, jnp.asarray(images), jnp.asarray(labels),
                                      model=model, batch_size=batch_size,
                                      loss_form=loss or "logits")
    return {k: float(v[0, 0]) for k, v in out.items()}


def stack_names(stack: Stack) -> list[str]:
    return [v.name for v in stack.variants]


def _known(value, known, what: str):
    if value not in known:
        raise ConfigError(f"{what} {value!r} is not in the stack; it has "
                          f"{', '.join(map(str, known))}")
    return value


def evaluate_models(stack: Stack, images: np.ndarray | jax.Array,
                    labels: np.ndarray | jax.Array) -> dict[str, np.ndarray]:
    """Loss, cross-entropy, penalty and accuracy of every model; arrays of shape (S, V).
    `images` may be arrays already on the devices (`stack.data`'s, say)."""
    mesh = placement.batch_mesh(stack.config)
    state = placement.place_state(stack.state, stack.config)
    images, labels = placement.put((images, labels), placement.devices_mesh(stack.config))
    out = programs.evaluate_all_rows(state, images, labels, model=stack.model,
                                      batch_size=stack.config.eval_batch_size,
                                      batch_sharding=placement.batch_sharding(mesh),
                                      loss_form=stack.config.loss)
    return placement.to_host(out)


@functools.partial(jax.jit, static_argnames=("model",))
def _predict(model: MLP, params, images: jax.Array) -> jax.Array:
    return jnp.argmax(model.apply({"params": params}, images), -1)


def predict(model: MLP, params, images: np.ndarray, *, batch_size: int = 2000,
            mesh=None) -> np.ndarray:
    """Predicted class of each image, in inference mode, a chunk at a time. `images` (N, 784)
    or (N, 28, 28), uint8 (scaled by 1/255) or floats in [0, 1]."""
    images = check_images(images)
    params = placement.put(params, mesh)
    chunks = [_predict(model, params, placement.put(images[i:i + batch_size], mesh))
              for i in range(0, len(images), batch_size)]
    return np.concatenate([placement.to_host(c) for c in chunks])
