"""Keras's Adam as an optax transformation, beside optax's own.

Keras (every version and backend, and TensorFlow's `ApplyAdam`) folds both bias corrections
into the step size and adds eps to the *uncorrected* sqrt(v):

    m += (g - m) * (1 - b1);  v += (g**2 - v) * (1 - b2)
    alpha = lr * sqrt(1 - b2**t) / (1 - b1**t)
    w -= alpha * m / (sqrt(v) + eps)

optax's `scale_by_adam` adds eps to the bias-corrected sqrt(v_hat), so Keras's effective eps is
eps / sqrt(1 - b2**t): 3.2e-6 at step 1, 1e-6 at step 10, 2e-7 after an epoch of 329 steps.
Step for step the two differ by 1e-4 in the loss from the second step on (docs/fidelity.md).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from mnist_jax.config import OPTIMIZERS, TrainConfig


class ScaleByKerasAdamState(NamedTuple):
    """State of `scale_by_keras_adam`, as optax's `ScaleByAdamState`."""

    count: jax.Array  # () int32: steps taken
    mu: optax.Updates  # first moment, like the parameters
    nu: optax.Updates  # second moment, like the parameters


def scale_by_keras_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-7,
                        ) -> optax.GradientTransformation:
    """Rescales updates as Keras's Adam does (module docstring), without the learning rate.

    The moments are updated in Keras's form m + (g - m)(1 - b1), not optax's b1 m + (1 - b1) g,
    and the bias corrections are computed in float32 from the step count, as Keras does, so
    the rounding follows Keras's too.
    """

    def init_fn(params):
        return ScaleByKerasAdamState(count=jnp.zeros([], jnp.int32),
                                     mu=optax.tree.zeros_like(params),
                                     nu=optax.tree.zeros_like(params))

    def update_fn(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda m, g: m + (g - m) * (1 - b1), state.mu, updates)
        nu = jax.tree.map(lambda v, g: v + (jnp.square(g) - v) * (1 - b2), state.nu, updates)
        count = numerics.safe_increment(state.count)
        t = count.astype(jnp.float32)
        alpha = (jnp.sqrt(1 - jnp.power(jnp.float32(b2), t))
                 / (1 - jnp.power(jnp.float32(b1), t)))
        updates = jax.tree.map(lambda m, v: m * alpha / (jnp.sqrt(v) + eps), mu, nu)
        return updates, ScaleByKerasAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def keras_adam(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
               eps: float = 1e-7) -> optax.GradientTransformation:
    """Adam exactly as Keras computes it: `scale_by_keras_adam`, then -learning_rate.

    Use it where `optax.adam` would go (with `optax.inject_hyperparams`, say).
    """
    return optax.chain(scale_by_keras_adam(b1, b2, eps),
                       optax.scale_by_learning_rate(learning_rate))


# config.OPTIMIZERS' names -> (optax transformation, its arguments that are not traced).
TRANSFORMS = {
    "keras-adam": (keras_adam, ("b1", "b2", "eps")),
    "adam": (optax.adam, ("b1", "b2", "eps", "eps_root")),
}
assert set(TRANSFORMS) == set(OPTIMIZERS), "each optimizer config names has its transform"


@functools.cache
def optimizer(name: str = "keras-adam", b1: float = 0.9, b2: float = 0.999, eps: float = 1e-7,
              ) -> optax.GradientTransformation:
    """Adam with its learning rate in the state (optax.inject_hyperparams), so every learning
    rate shares one compiled program; cached, so equal settings give the same object.

    'keras-adam' (the default: the study is Keras's) is Adam as Keras computes it, eps added
    to the uncorrected sqrt(v) (`optim.keras_adam`); 'adam' is `optax.adam`, eps added to the
    bias-corrected sqrt(v_hat). They differ by 1e-4 in the loss from the second step on.
    """
    if name not in TRANSFORMS:
        raise ValueError(f"unknown optimizer {name!r}; use one of {', '.join(OPTIMIZERS)}")
    transform, static = TRANSFORMS[name]
    return optax.inject_hyperparams(transform, static_args=static)(
        learning_rate=1e-3, b1=b1, b2=b2, eps=eps)


def for_config(config: TrainConfig) -> optax.GradientTransformation:
    """The (cached) optimizer of a config: its Adam with its b1, b2 and eps."""
    return optimizer(config.optimizer, config.b1, config.b2, config.eps)
