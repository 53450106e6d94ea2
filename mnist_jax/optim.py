"""Keras's Adam as an optax transformation, beside optax's own.

Keras (every version and backend, and TensorFlow's `ApplyAdam`) folds both bias corrections
into the step size and adds eps to the *uncorrected* sqrt(v):

    m += (g - m) * (1 - b1);  v += (g**2 - v) * (1 - b2)
    alpha = lr * sqrt(1 - b2**t) / (1 - b1**t)
    w -= alpha * m / (sqrt(v) + eps)

optax's `scale_by_adam` adds eps to the bias-corrected sqrt(v_hat), so Keras's effective eps is
eps / sqrt(1 - b2**t), larger the earlier the step; how far apart that sets the two is measured
in docs/fidelity.md.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from mnist_jax.config import OPTIMIZERS, WEIGHT_DECAY_ON, TrainConfig


class ScaleByKerasAdamState(NamedTuple):
    """State of `scale_by_keras_adam`, as optax's `ScaleByAdamState`."""

    count: jax.Array  # () int32: steps taken
    mu: optax.Updates  # first moment, like the parameters
    nu: optax.Updates  # second moment, like the parameters


def _keras_moments(updates, state: ScaleByKerasAdamState, b1: float, b2: float):
    """Keras's moment updates, m + (g - m)(1 - b1) (not optax's b1 m + (1 - b1) g), and the
    two halves of its bias correction, sqrt(1 - b2**t) and 1 - b1**t, in float32 from the
    step count as Keras computes them."""
    mu = jax.tree.map(lambda m, g: m + (g - m) * (1 - b1), state.mu, updates)
    nu = jax.tree.map(lambda v, g: v + (jnp.square(g) - v) * (1 - b2), state.nu, updates)
    count = numerics.safe_increment(state.count)
    t = count.astype(jnp.float32)
    root = jnp.sqrt(1 - jnp.power(jnp.float32(b2), t))
    return ScaleByKerasAdamState(count=count, mu=mu, nu=nu), root, 1 - jnp.power(jnp.float32(b1), t)


def _init_moments(params) -> ScaleByKerasAdamState:
    return ScaleByKerasAdamState(count=jnp.zeros([], jnp.int32),
                                 mu=optax.tree.zeros_like(params),
                                 nu=optax.tree.zeros_like(params))


def scale_by_keras_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-7,
                        ) -> optax.GradientTransformation:
    """Rescales updates as Keras's Adam does (module docstring), without the learning rate,
    its rounding Keras's too (`_keras_moments`)."""

    def update_fn(updates, state, params=None):
        del params
        state, root, denominator = _keras_moments(updates, state, b1, b2)
        alpha = root / denominator
        updates = jax.tree.map(lambda m, v: m * alpha / (jnp.sqrt(v) + eps), state.mu, state.nu)
        return updates, state

    return optax.GradientTransformation(_init_moments, update_fn)


def keras_adam(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
               eps: float = 1e-7) -> optax.GradientTransformation:
    """Adam exactly as Keras computes it: `scale_by_keras_adam`, then -learning_rate.

    Use it where `optax.adam` would go (with `optax.inject_hyperparams`, say).
    """
    return optax.chain(scale_by_keras_adam(b1, b2, eps),
                       optax.scale_by_learning_rate(learning_rate))


def keras_adamw(learning_rate: jax.Array, b1: float = 0.9, b2: float = 0.999,
                eps: float = 1e-7, weight_decay: jax.Array = 0.004, mask=None,
                ) -> optax.GradientTransformation:
    """Keras's AdamW (and Adam with `weight_decay=`), in Keras's order and rounding: each
    masked variable first loses `w * weight_decay * learning_rate`, then takes the Adam step
    `m * alpha / (sqrt(v) + eps)` with `alpha = learning_rate * sqrt(1 - b2**t) / (1 - b1**t)`,
    grouped as Keras groups it.

    optax's composition (`add_decayed_weights` between the Adam scaling and the learning rate,
    as `optax.adamw`) is the same sum rounded in another order, and replayed against Keras's
    own AdamW it parts from Keras's loss within 100 steps where Keras's order does not
    (docs/fidelity.md); so this computes the new weights as Keras does and returns their
    difference from the old (w + (new - w) is new exactly wherever the two are within a
    factor of two).
    """

    def update_fn(updates, state, params):
        state, root, denominator = _keras_moments(updates, state, b1, b2)
        lr = jnp.asarray(learning_rate, jnp.float32)
        wd = jnp.asarray(weight_decay, jnp.float32)
        alpha = lr * root / denominator
        decayed = jax.tree.map(lambda _: True, params) if mask is None else mask(params)

        def step(w, m, v, decay):
            w_decayed = jnp.where(decay, w - w * wd * lr, w)
            return w_decayed - m * alpha / (jnp.sqrt(v) + eps) - w

        return jax.tree.map(step, params, state.mu, state.nu, decayed), state

    return optax.GradientTransformation(_init_moments, update_fn)


def kernels_only(params):
    """The decay mask (of `keras_adamw` and `optax.adamw`) that decays kernels only."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


MASKS = {"all": None, "kernels": kernels_only}  # config.WEIGHT_DECAY_ON -> optax's mask

# config.OPTIMIZERS' names -> (optax transformation, its arguments that are not traced),
# without decay and with.
TRANSFORMS = {
    "keras-adam": (keras_adam, ("b1", "b2", "eps")),
    "adam": (optax.adam, ("b1", "b2", "eps", "eps_root")),
}
DECAYED = {
    "keras-adam": (keras_adamw, ("b1", "b2", "eps", "mask")),
    "adam": (optax.adamw, ("b1", "b2", "eps", "eps_root", "mask")),
}
assert set(TRANSFORMS) == set(DECAYED) == set(OPTIMIZERS), "each optimizer has its transforms"


def optimizer(name: str = "keras-adam", b1: float = 0.9, b2: float = 0.999, eps: float = 1e-7,
              decay_on: str | None = None) -> optax.GradientTransformation:
    """Adam with its learning rate (and weight decay) in the state (optax.inject_hyperparams),
    so every value shares one compiled program; cached, so equal settings give the same object.

    'keras-adam' (the default: the study is Keras's) is Adam as Keras computes it, eps added
    to the uncorrected sqrt(v) (`optim.keras_adam`); 'adam' is `optax.adam`, eps added to the
    bias-corrected sqrt(v_hat) (docs/fidelity.md compares them).
    With `decay_on` ('all' or 'kernels', MASKS) the Adam decouples weight decay (`keras_adamw`,
    `optax.adamw`), its value a hyperparameter like the learning rate; without, the chain has
    no decay at all, so a run without decay is the same program and state as before.
    """
    return _optimizer(name, b1, b2, eps, decay_on)  # positional: one cache entry per setting


@functools.cache
def _optimizer(name: str, b1: float, b2: float, eps: float, decay_on: str | None,
               ) -> optax.GradientTransformation:
    if name not in TRANSFORMS:
        raise ValueError(f"unknown optimizer {name!r}; use one of {', '.join(OPTIMIZERS)}")
    if decay_on is None:
        transform, static = TRANSFORMS[name]
        return optax.inject_hyperparams(transform, static_args=static)(
            learning_rate=1e-3, b1=b1, b2=b2, eps=eps)
    if decay_on not in MASKS:
        raise ValueError(f"unknown weight decay set {decay_on!r}; use one of "
                         f"{', '.join(WEIGHT_DECAY_ON)}")
    transform, static = DECAYED[name]
    return optax.inject_hyperparams(transform, static_args=static)(
        learning_rate=1e-3, b1=b1, b2=b2, eps=eps, weight_decay=0.0, mask=MASKS[decay_on])


def for_config(config: TrainConfig, decay: bool = False) -> optax.GradientTransformation:
    """The (cached) optimizer of a config: its Adam with its b1, b2 and eps, and with
    `decay` (some variant of the stack decays) weight decay on `config.weight_decay_on`."""
    return optimizer(config.optimizer, config.b1, config.b2, config.eps,
                     config.weight_decay_on if decay else None)


def decays(opt_state) -> bool:
    """Whether an optimizer state of `optimizer` carries a weight decay."""
    return "weight_decay" in opt_state.hyperparams
