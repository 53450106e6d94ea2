"""Training with Keras `fit` semantics, compiled: a pure train step, a whole epoch on device.

Shapes: a *stack* of models has leading axes (S, V) on every leaf of its TrainState: S seeds,
V variants. Models that share a seed share their initial weights, batch order and dropout
noise, and differ only in their hyperparameters (common random numbers: the fairest paired
comparison). In the training loop the stack is one models axis of S * V.
The hyperparameters (L2 coefficients, dropout rates, learning rate) are traced values in the
state, so every variant runs the same compiled program.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

from mnist_jax.config import dense_names
from mnist_jax.model import MLP

Params = Any
# A step diverged when its loss is non-finite or its cross-entropy exceeds this: a uniform
# guess scores ln(10) = 2.3 and a confidently wrong sane model a few dozen, so a value like
# this means logits of that size, a blown-up network (Adam at a huge learning rate rarely
# reaches inf in float32, it saturates at losses of 1e11 instead).
DIVERGED_CROSS_ENTROPY = 1e4
KERAS_EPSILON = 1e-7  # keras.backend.epsilon(): the clip of the 'clipped' cross-entropy


class Hyperparams(struct.PyTreeNode):
    l2: jax.Array  # (n_dense,) float32: coefficient on sum(W**2) of each Dense kernel
    dropout: jax.Array  # (n_hidden,) float32: dropout rate after each hidden layer


class TrainState(struct.PyTreeNode):
    step: jax.Array  # () int32: optimizer steps taken
    params: Params
    opt_state: optax.OptState
    hparams: Hyperparams


class Batch(NamedTuple):
    images: jax.Array  # (B, 784) float32 in [0, 1]
    labels: jax.Array  # (B, 10) float32 one-hot
    weights: jax.Array  # (B,) float32: 1 for real samples, 0 for padding


class StepMetrics(NamedTuple):
    loss: jax.Array  # cross_entropy + penalty
    cross_entropy: jax.Array  # mean over the batch's real samples
    penalty: jax.Array  # L2 term at this step
    accuracy: jax.Array
    count: jax.Array  # real samples in the batch


class RunKeys(NamedTuple):
    shuffle: jax.Array  # key per seed: batch order, fold_in(epoch)
    dropout: jax.Array  # key per seed: dropout masks, fold_in(global step)


class EpochData(struct.PyTreeNode):
    """The data set on the device(s) once, as rows: the training rows, then the validation
    rows, then the test rows. Training draws its batches from the first `n_train` only; one
    compiled evaluation reads any range of rows (`evaluate_rows`): the validation rows after
    every epoch, the test and training rows at the end."""

    images: jax.Array  # (n_train + n_val + n_test, 784) float32
    labels: jax.Array  # (n_train + n_val + n_test, 10) float32 one-hot
    n_train: int = struct.field(pytree_node=False)
    n_val: int = struct.field(pytree_node=False)

    def rows(self, split: str) -> tuple[int, int]:
        """(start, count) of 'train', 'validation' or 'test'."""
        n_test = self.images.shape[0] - self.n_train - self.n_val
        ranges = {"train": (0, self.n_train), "validation": (self.n_train, self.n_val),
                  "test": (self.n_train + self.n_val, n_test)}
        if split not in ranges:
            raise ValueError(f"unknown split {split!r}; use one of {', '.join(ranges)}")
        return ranges[split]


class TrainMetrics(NamedTuple):
    """Per model, shape (S, V): what one epoch's training measured."""

    loss: jax.Array
    cross_entropy: jax.Array
    penalty: jax.Array  # mean over the epoch's samples, so loss = cross_entropy + penalty
    accuracy: jax.Array
    bad_step: jax.Array  # int32: first step of the epoch that diverged, else -1
    bad_loss: jax.Array  # the loss at that step


class EpochMetrics(NamedTuple):
    """Per model, shape (S, V): the Keras history entries of one epoch."""

    loss: jax.Array
    cross_entropy: jax.Array
    penalty: jax.Array  # mean over the epoch's samples, so loss = cross_entropy + penalty
    accuracy: jax.Array
    val_loss: jax.Array
    val_cross_entropy: jax.Array
    val_accuracy: jax.Array
    bad_step: jax.Array  # int32: first step of the epoch that diverged, else -1
    bad_loss: jax.Array  # the loss at that step


def cross_entropy(logits: jax.Array, labels: jax.Array, form: str = "logits") -> jax.Array:
    """(B,) softmax cross-entropy of (B, C) logits against (B, C) one-hot labels.

    'logits' computes it from the logits (log-softmax), as Keras on TensorFlow does for a
    softmax output and every backend with `from_logits=True`. 'clipped' is what Keras on JAX
    and PyTorch compute for a softmax output: the probabilities renormalised, clipped to
    [1e-7, 1 - 1e-7] and logged, which caps a sample's loss at 16.1 and zeroes the gradient of
    every sample predicted with p > 1 - 1e-7.
    """
    if form == "logits":
        return optax.softmax_cross_entropy(logits, labels)
    probs = jax.nn.softmax(logits)
    probs = probs / jnp.sum(probs, -1, keepdims=True)
    probs = jnp.clip(probs, KERAS_EPSILON, 1.0 - KERAS_EPSILON)
    return -jnp.sum(labels * jnp.log(probs), -1)


def create_train_state(init_key: jax.Array, model: MLP, tx: optax.GradientTransformation,
                       hparams: Hyperparams, *, learning_rate: float = 1e-3,
                       weight_decay: float = 0.0, input_dim: int = 784) -> TrainState:
    """Fresh parameters from `init_key`; optimizer state with the given learning rate (and
    weight decay, where `tx` decays: optim.optimizer's `decay_on`)."""
    params = model.init(init_key, jnp.zeros((1, input_dim), jnp.float32))["params"]
    opt_state = tx.init(params)
    opt_state.hyperparams["learning_rate"] = jnp.asarray(learning_rate, jnp.float32)
    if "weight_decay" in opt_state.hyperparams:
        opt_state.hyperparams["weight_decay"] = jnp.asarray(weight_decay, jnp.float32)
    elif isinstance(weight_decay, int | float) and weight_decay:  # a traced value is checked
        raise ValueError(f"weight_decay={weight_decay:g} needs an optimizer that decays: "
                         "optim.optimizer(..., decay_on='all' or 'kernels')")  # by init_stack
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                      hparams=hparams)


def run_keys(seed: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(init_key, shuffle_key, dropout_key): one root key per seed, split by purpose."""
    return purpose_keys(jax.random.key(seed))


def purpose_keys(root: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    init_key, shuffle_key, dropout_key = jax.random.split(root, 3)
    return init_key, shuffle_key, dropout_key


def init_stack_state(roots: tuple[jax.Array, ...], learning_rates: jax.Array, l2: jax.Array,
                     dropout: jax.Array, weight_decays: jax.Array, *, model: MLP,
                     tx: optax.GradientTransformation) -> tuple[TrainState, RunKeys]:
    """The (S, V) stack of fresh states, from each seed's root key and each variant's
    learning rate, L2 and dropout rows and weight decay (V, ...), and the (S,) shuffle and
    dropout keys. Every variant of a seed starts from the same parameters."""
    def per_seed(root):
        init_key, shuffle_key, dropout_key = purpose_keys(root)
        states = jax.vmap(lambda lr, l2_row, dropout_row, wd: create_train_state(
            init_key, model, tx, Hyperparams(l2=l2_row, dropout=dropout_row),
            learning_rate=lr, weight_decay=wd))(learning_rates, l2, dropout, weight_decays)
        return states, shuffle_key, dropout_key

    states, shuffle, dropout_keys = jax.vmap(per_seed)(jnp.stack(roots))
    return states, RunKeys(shuffle, dropout_keys)


def l2_penalty(params: Params, coefs: jax.Array, hidden: tuple[int, ...]) -> jax.Array:
    """sum_i coefs[i] * sum(W_i ** 2) over the Dense kernels in order; biases never count.

    This is Keras's `kernel_regularizer=l2(c)`: a term in the loss, so under Adam it is
    rescaled with the gradient (unlike AdamW's decoupled weight decay).
    """
    terms = [coefs[i] * jnp.sum(jnp.square(params[name]["kernel"]))
             for i, name in enumerate(dense_names(hidden))]
    return functools.reduce(jnp.add, terms)


def loss_fn(params: Params, hparams: Hyperparams, batch: Batch, dropout_key: jax.Array | None,
            *, model: MLP, train: bool, loss_form: str = "logits",
            ) -> tuple[jax.Array, StepMetrics]:
    """Mean softmax cross-entropy (`cross_entropy` of `loss_form`) over the batch's real
    samples plus the L2 penalty."""
    rngs = {"dropout": dropout_key} if train and model.dropout else None
    logits = model.apply({"params": params}, batch.images, hparams.dropout, train=train,
                         rngs=rngs)
    count = jnp.sum(batch.weights)
    ce = jnp.sum(cross_entropy(logits, batch.labels, loss_form) * batch.weights) / count
    correct = jnp.argmax(logits, -1) == jnp.argmax(batch.labels, -1)
    accuracy = jnp.sum(correct.astype(jnp.float32) * batch.weights) / count
    penalty = l2_penalty(params, hparams.l2, model.hidden)
    loss = ce + penalty
    return loss, StepMetrics(loss, ce, penalty, accuracy, count)


def train_step(state: TrainState, batch: Batch, dropout_key: jax.Array, *, model: MLP,
               tx: optax.GradientTransformation, loss_form: str = "logits",
               ) -> tuple[TrainState, StepMetrics]:
    """One Adam step on one batch: pure, jittable; `dropout_key` is used only with dropout."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (_, metrics), grads = grad_fn(state.params, state.hparams, batch, dropout_key,
                                  model=model, train=True, loss_form=loss_form)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params: Params, hparams: Hyperparams, batch: Batch, *, model: MLP,
              loss_form: str = "logits") -> StepMetrics:
    """Metrics of one batch in inference mode (no dropout, no gradients)."""
    return loss_fn(params, hparams, batch, None, model=model, train=False,
                   loss_form=loss_form)[1]


# --- stacks of models ------------------------------------------------------------------------

def over_models(fn: Callable, size: int, in_axes: tuple) -> Callable:
    """`jax.vmap(fn, in_axes)` over a models axis; for one model, squeeze instead of vmap so a
    lone model compiles to exactly the program of an unbatched call."""
    if size > 1:
        return jax.vmap(fn, in_axes=in_axes)

    def single(*args):
        args = [a if ax is None else jax.tree.map(lambda leaf: leaf[0], a)
                for a, ax in zip(args, in_axes, strict=True)]
        return jax.tree.map(lambda leaf: leaf[None], fn(*args))

    return single


def stack_shape(state: TrainState) -> tuple[int, int]:
    """(S, V): the seeds and variants axes of a stacked state."""
    return tuple(state.step.shape)  # type: ignore[return-value]


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Keras keeps the final partial batch: ceil(n / batch_size) steps."""
    return math.ceil(n / batch_size)


# Index bits above which `shuffle_indices` leaves too few random bits per sort key and hands
# over to jax.random.permutation (2**24 samples; MNIST has 2**16).
_MAX_INDEX_BITS = 24


def shuffle_indices(key: jax.Array, n: int) -> jax.Array:
    """A random permutation of 0..n-1 (int32), as `jax.random.permutation` draws it, faster.

    Same algorithm (tjablin's, in jax.random's `_shuffle`): rounds of stable sorts by fresh
    random keys, as many rounds as make key collisions negligible, ceil(3 ln n / ln 2**bits).
    jax sorts (key, value) pairs with 32-bit keys; XLA:CPU sorts a lone uint32 array several
    times faster than a pair, so here each round sorts one array, `bits` random bits above
    the element's current position (log2 n bits). The position makes every key distinct and
    the sort stable; with fewer random bits per round it takes more rounds (3 instead of 2
    for 42,000 samples), and is still faster (docs/design.md).
    """
    index_bits = max(1, (n - 1).bit_length())
    if index_bits > _MAX_INDEX_BITS:
        return jax.random.permutation(key, n).astype(jnp.int32)
    bits = 32 - index_bits
    rounds = max(1, math.ceil(3 * math.log(max(n, 2)) / math.log(2.0**bits)))
    position = jnp.arange(n, dtype=jnp.uint32)
    perm = jnp.arange(n, dtype=jnp.int32)
    for round_key in jax.random.split(key, rounds):
        random = jax.random.bits(round_key, (n,), jnp.uint32) >> index_bits
        order = jnp.sort((random << index_bits) | position) & ((1 << index_bits) - 1)
        perm = perm[order.astype(jnp.int32)]
    return perm


def epoch_batches(shuffle_key: jax.Array, epoch: jax.Array, n: int, batch_size: int,
                  ) -> tuple[jax.Array, jax.Array]:
    """A fresh permutation of 0..n-1 in (steps, B) batches, and (steps, B) sample weights.

    The last batch is padded with index 0 at weight 0, so every step has the same shape and
    the padded rows change neither the loss nor the gradient.
    """
    steps = steps_per_epoch(n, batch_size)
    perm = shuffle_indices(jax.random.fold_in(shuffle_key, epoch), n)
    pad = steps * batch_size - n
    idx = jnp.concatenate([perm, jnp.zeros((pad,), jnp.int32)])
    weights = jnp.concatenate([jnp.ones((n,), jnp.float32), jnp.zeros((pad,), jnp.float32)])
    return idx.reshape(steps, batch_size), weights.reshape(steps, batch_size)


def evaluate_rows(state: TrainState, images: jax.Array, labels: jax.Array, start: jax.Array,
                  count: jax.Array, *, model: MLP, batch_size: int,
                  batch_sharding: jax.sharding.Sharding | None = None,
                  loss_form: str = "logits") -> dict[str, jax.Array]:
    """Loss (cross-entropy + penalty, as Keras's `evaluate`) and accuracy of one model on the
    rows [start, start + count) of `images`, in chunks of `batch_size` rows (each split over
    the devices by `batch_sharding`, if given); NaN for no rows.

    `start` and `count` may be traced: one compiled program evaluates any range of one array
    (`EpochData`'s validation rows every epoch, then its test and training rows), where a
    program per data set would cost a compilation each.
    """
    n = images.shape[0]
    b = min(batch_size, n)
    start = jnp.asarray(start, jnp.int32)
    end = start + jnp.asarray(count, jnp.int32)
    chunk_sharding = None if batch_sharding is None else jax.sharding.NamedSharding(
        batch_sharding.mesh, jax.sharding.PartitionSpec(batch_sharding.spec[1]))

    def body(carry):
        first, ce_sum, correct = carry
        # The last chunk reaches back instead of past the array's end; the rows before
        # `first`, counted already, weigh 0 there.
        at = jnp.minimum(first, n - b)
        rows = at + jnp.arange(b, dtype=jnp.int32)
        batch = Batch(jax.lax.dynamic_slice_in_dim(images, at, b),
                      jax.lax.dynamic_slice_in_dim(labels, at, b),
                      ((rows >= first) & (rows < end)).astype(jnp.float32))
        if chunk_sharding is not None:
            batch = Batch(*(jax.lax.with_sharding_constraint(a, chunk_sharding) for a in batch))
        m = eval_step(state.params, state.hparams, batch, model=model, loss_form=loss_form)
        return first + b, ce_sum + m.cross_entropy * m.count, correct + m.accuracy * m.count

    zero = jnp.zeros((), jnp.float32)
    _, ce_sum, correct = jax.lax.while_loop(lambda c: c[0] < end, body, (start, zero, zero))
    penalty = l2_penalty(state.params, state.hparams.l2, model.hidden)
    total = (end - start).astype(jnp.float32)
    ce = ce_sum / total
    return {"loss": ce + penalty, "cross_entropy": ce, "penalty": penalty,
            "accuracy": correct / total}


def evaluate_rows_stack(state: TrainState, images: jax.Array, labels: jax.Array,
                        start: jax.Array, count: jax.Array, *, model: MLP, batch_size: int,
                        batch_sharding: jax.sharding.Sharding | None = None,
                        loss_form: str = "logits") -> dict[str, jax.Array]:
    """`evaluate_rows` for every model of a (S, V) stack; values of shape (S, V)."""
    s, v = stack_shape(state)
    fn = functools.partial(evaluate_rows, model=model, batch_size=batch_size,
                           batch_sharding=batch_sharding, loss_form=loss_form)
    axes = (0, None, None, None, None)
    return over_models(over_models(fn, v, axes), s, axes)(state, images, labels, start, count)


def train_epoch(state: TrainState, keys: RunKeys, data: EpochData, epoch: jax.Array, *,
                model: MLP, tx: optax.GradientTransformation, batch_size: int,
                batch_sharding: jax.sharding.Sharding | None = None,
                loss_form: str = "logits", halt_on_divergence: bool = True,
                models_sharding: jax.sharding.NamedSharding | None = None,
                ) -> tuple[TrainState, TrainMetrics]:
    """One epoch of every model in the (S, V) stack, in one program (validation is
    `evaluate_rows`' program: fused in here it lengthened the epoch's compilation).

    Each seed draws a fresh permutation of the training set (fold_in(shuffle key, epoch)),
    every sample is visited once, the last partial batch included. A model whose loss turns
    non-finite (or explodes, see DIVERGED_CROSS_ENTROPY) stops the loop at that step; the
    host reports it from `bad_step` and `bad_loss`. With `halt_on_divergence=False` (sweeps,
    where a learning rate too high for some models must not stop the others) the loop goes on
    and such a model keeps its last good state from that step to the epoch's end.
    `models_sharding` (of a (S, V) leaf, the V axis split over devices) keeps every model, its
    batches and its updates on the device that holds it: no collectives.
    """
    s, v = stack_shape(state)
    n = data.n_train
    steps = steps_per_epoch(n, batch_size)
    idx, weights = over_models(
        lambda key: epoch_batches(key, epoch, n, batch_size), s, (0,))(keys.shuffle)
    weights = weights[0]  # the padding sits at the same place for every seed
    first_step = epoch * steps

    step = functools.partial(train_step, model=model, tx=tx, loss_form=loss_form)
    single = (s, v) == (1, 1)

    # The loop's one models axis: seed-major (s * V + v), or variant-major (v * S + s) when
    # the variants axis is split over devices, so that each device's models stay one block.
    sharded = models_sharding is not None
    loop_sharding = (None if not sharded else jax.sharding.NamedSharding(
        models_sharding.mesh, jax.sharding.PartitionSpec(models_sharding.spec[1])))

    def constrain(a, sharding):
        return a if sharding is None else jax.lax.with_sharding_constraint(a, sharding)

    def per_model(a):  # (S, ...) -> (S * V, ...): each model gets its seed's value
        if sharded:
            a = jnp.broadcast_to(a[None], (v, s, *a.shape[1:])).reshape(s * v, *a.shape[1:])
            return constrain(a, loop_sharding)
        return jnp.broadcast_to(a[:, None], (s, v, *a.shape[1:])).reshape(s * v, *a.shape[1:])

    def to_stack(a):  # (S * V,) in the loop's order -> (S, V)
        return a.reshape(v, s).T if sharded else a.reshape(s, v)

    def step_all(state, images, labels, w, step_keys):
        if single:  # the loop carries the unstacked state (see below)
            state, m = step(state, Batch(images[0], labels[0], w), step_keys[0])
            return state, jax.tree.map(lambda a: a[None, None], m)
        # One models axis, every model with its own copy of its seed's batch: each layer is
        # then a batched matmul with the weights in their stored layout. Sharing the batch
        # (one matmul for the first layer of all models) made XLA transpose every model's
        # first kernel each step and hand Adam its gradient transposed (docs/design.md).
        state, m = jax.vmap(step, in_axes=(0, Batch(0, 0, None), 0))(
            state, Batch(per_model(images), per_model(labels), w), per_model(step_keys))
        return state, jax.tree.map(to_stack, m)

    def body(carry):
        i, state, sums, bad, bad_loss = carry
        batch_idx = idx[:, i]  # (S, B)
        images = data.images[batch_idx]  # indices below n_train: training rows only
        labels = data.labels[batch_idx]
        if batch_sharding is not None:
            images = jax.lax.with_sharding_constraint(images, batch_sharding)
            labels = jax.lax.with_sharding_constraint(labels, batch_sharding)
        step_keys = jax.vmap(jax.random.fold_in, (0, None))(keys.dropout, first_step + i)
        new_state, m = step_all(state, images, labels, weights[i], step_keys)
        ok = jnp.isfinite(m.loss) & (m.cross_entropy < DIVERGED_CROSS_ENTROPY)
        newly = (bad < 0) & ~ok
        if halt_on_divergence:  # the loop stops at this step: no model's state is kept back
            state = new_state
        else:  # a diverged model keeps its state from before its first bad step
            state = jax.tree.map(lambda new, old: jnp.where(
                _model_mask((bad < 0) & ok, new.ndim), new, old), new_state, state)
        bad = jnp.where(newly, i, bad)
        bad_loss = jnp.where(newly, m.loss, bad_loss)
        sums = (sums[0] + m.loss * m.count, sums[1] + m.cross_entropy * m.count,
                sums[2] + m.penalty * m.count, sums[3] + m.accuracy * m.count)
        return i + 1, state, sums, bad, bad_loss

    def cond(carry):
        i, _, _, bad, _ = carry
        if not halt_on_divergence:  # the steps alone: no reduction over (sharded) models
            return i < steps
        return (i < steps) & jnp.all(bad < 0)

    def _model_mask(good, ndim):  # (S, V) -> broadcastable over a loop-carried leaf
        flat = good.reshape(()) if single else (good.T if sharded else good).reshape(s * v)
        return flat.reshape(flat.shape + (1,) * (ndim - flat.ndim))

    zeros = jnp.zeros((s, v), jnp.float32)
    # The loop carries the state as the step makes it: a lone model's without its (1, 1)
    # axes, a stack's with one models axis. Updated in place through a reshape, XLA copied
    # the weights and the optimizer state every step.
    if single:
        to_loop, from_loop = (lambda a: a[0, 0]), (lambda a: a[None, None])
    elif sharded:
        def to_loop(a):
            return constrain(jnp.swapaxes(a, 0, 1).reshape(s * v, *a.shape[2:]), loop_sharding)

        def from_loop(a):
            return constrain(jnp.swapaxes(a.reshape(v, s, *a.shape[1:]), 0, 1),
                             models_sharding)
    else:
        to_loop = lambda a: a.reshape(s * v, *a.shape[2:])  # noqa: E731
        from_loop = lambda a: a.reshape(s, v, *a.shape[1:])  # noqa: E731
    carry = (jnp.zeros((), jnp.int32), jax.tree.map(to_loop, state),
             (zeros, zeros, zeros, zeros), jnp.full((s, v), -1, jnp.int32), zeros)
    carry = jax.lax.while_loop(cond, body, carry)
    carry = (carry[0], jax.tree.map(from_loop, carry[1]), *carry[2:])
    _, state, (loss, ce, penalty, acc), bad, bad_loss = carry
    return state, TrainMetrics(loss / n, ce / n, penalty / n, acc / n, bad, bad_loss)
