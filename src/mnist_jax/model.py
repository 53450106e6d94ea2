"""The MLP: Dense layers with ReLU, optional dropout after each hidden layer, logits out."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

# Keras's Dense default; Flax's own default is LeCun normal.
glorot_uniform = nn.initializers.glorot_uniform()


def dense_names(hidden: tuple[int, ...]) -> tuple[str, ...]:
    """Names of the Dense layers in order: hidden_1 .. hidden_k, then output."""
    return tuple(f"hidden_{i + 1}" for i in range(len(hidden))) + ("output",)


class Dropout(nn.Module):
    """Inverted dropout whose rate is a traced value, so one compiled program serves any rate.

    Keeps each unit with probability 1 - rate and scales kept units by 1 / (1 - rate). The
    mask comes from 32 random bits per unit compared with rate * 2**32 (one Threefry draw,
    no float conversion); a rate of 0 keeps every unit and returns `x` unchanged.
    """

    @nn.compact
    def __call__(self, x: jax.Array, rate: jax.Array) -> jax.Array:
        bits = jax.random.bits(self.make_rng("dropout"), x.shape, jnp.uint32)
        threshold = (rate * 2.0**32).astype(jnp.uint32)
        keep = bits >= threshold
        return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype))


class MLP(nn.Module):
    """784 -> hidden... -> num_classes, ReLU after each hidden Dense, logits out.

    Kernels are Glorot-uniform and biases zero, as in Keras. With `dropout=True` the module
    has a dropout layer after each hidden layer, its rate taken from `dropout_rates` (shape
    (len(hidden),)) at call time and active only when `train=True` (a 'dropout' RNG is then
    needed); with `dropout=False` there are none and no random bits are drawn.
    """

    hidden: tuple[int, ...] = (256, 256)
    num_classes: int = 10
    dropout: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, dropout_rates: jax.Array | None = None, *,
                 train: bool = False) -> jax.Array:
        names = dense_names(self.hidden)
        for i, width in enumerate(self.hidden):
            x = nn.Dense(width, kernel_init=glorot_uniform, name=names[i])(x)
            x = nn.relu(x)
            if self.dropout and train:
                x = Dropout(name=f"dropout_{i + 1}")(x, dropout_rates[i])
        return nn.Dense(self.num_classes, kernel_init=glorot_uniform, name=names[-1])(x)


def count_params(params) -> int:
    """Total number of scalars in a parameter pytree."""
    return sum(int(p.size) for p in jax.tree.leaves(params))


def summary(model: MLP, input_dim: int = 784) -> str:
    """A Keras-style table: each layer, its output shape and parameter count, and the total.

    Shapes come from the parameters `model.init` would create (traced abstractly, nothing is
    allocated).
    """
    shapes = jax.eval_shape(model.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, input_dim), jnp.float32))["params"]
    rows = [("layer", "output shape", "params")]
    for i, name in enumerate(dense_names(model.hidden)):
        kernel = shapes[name]["kernel"].shape
        rows.append((f"{name} (Dense, ReLU)" if name != "output" else "output (Dense, logits)",
                     f"(batch, {kernel[1]})", f"{kernel[0] * kernel[1] + kernel[1]:,}"))
        if model.dropout and name != "output":
            rows.append((f"dropout_{i + 1} (rate traced)", f"(batch, {kernel[1]})", "0"))
    total = count_params(shapes)
    widths = [max(len(r[c]) for r in rows) for c in range(3)]
    lines = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}" for a, b, c in rows]
    rule = "-" * len(lines[0])
    arch = "-".join(map(str, (input_dim, *model.hidden, model.num_classes)))
    return "\n".join([f"MLP {arch}", rule, lines[0], rule, *lines[1:], rule,
                      f"total parameters: {total:,} (all trainable)"])
