"""The MLP: Dense layers with ReLU, optional dropout after each hidden layer, logits out."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from mnist_jax import kernels
from mnist_jax.config import dense_names

# Keras's Dense default; Flax's own default is LeCun normal.
glorot_uniform = nn.initializers.glorot_uniform()


class Dropout(nn.Module):
    """Inverted dropout with a traced rate, so one compiled program serves any rate.

    Keeps a unit where its 32 random bits from `bits(key, shape)` are >= rate * 2**32 and
    scales kept units by 1 / (1 - rate); a rate of 0 returns `x` unchanged.
    """

    bits: kernels.Bits = kernels.hash_bits

    @nn.compact
    def __call__(self, x: jax.Array, rate: jax.Array) -> jax.Array:
        bits = self.bits(self.make_rng("dropout"), x.shape)
        threshold = (rate * 2.0**32).astype(jnp.uint32)
        keep = bits >= threshold
        return jnp.where(keep, x / (1.0 - rate).astype(x.dtype), jnp.zeros((), x.dtype))


class MLP(nn.Module):
    """784 -> hidden... -> num_classes, ReLU after each hidden Dense, logits out; Keras's
    Glorot-uniform kernels and zero biases.

    With `dropout`, a dropout layer follows each hidden layer, its rate taken from
    `dropout_rates` [len(hidden)] and active only with `train=True` (a 'dropout' RNG then).
    `dtype` 'bfloat16' rounds every matmul's operands (mixed precision; all else float32);
    `precision` is the float32 matmuls' ('highest', or None: XLA's default). From
    mnist_jax.kernels: `dot_general(compute dtype)` is each Dense's `dot_general`, and
    `dropout_bits(key, shape)` draws the masks' bits.
    """

    hidden: tuple[int, ...] = (256, 256)
    num_classes: int = 10
    dropout: bool = False
    dtype: str | None = None
    precision: str | None = None
    dot_general: Callable[[Any], Callable[..., jax.Array]] = kernels.RowMajorDot
    dropout_bits: kernels.Bits = kernels.hash_bits

    @nn.compact
    def __call__(self, x: jax.Array, dropout_rates: jax.Array | None = None, *,
                 train: bool = False) -> jax.Array:
        names = dense_names(self.hidden)
        if self.dtype not in (None, "float32", "bfloat16"):
            raise ValueError(f"dtype {self.dtype!r}: use None, 'float32' or 'bfloat16'")
        compute = jnp.bfloat16 if self.dtype == "bfloat16" else jnp.float32
        dense = dict(kernel_init=glorot_uniform, param_dtype=jnp.float32,
                     precision=None if compute == jnp.bfloat16 else self.precision,
                     dot_general=self.dot_general(compute))
        for i, width in enumerate(self.hidden):
            x = nn.Dense(width, name=names[i], **dense)(x)
            x = nn.relu(x)
            if self.dropout and train:
                x = Dropout(bits=self.dropout_bits, name=f"dropout_{i + 1}")(x, dropout_rates[i])
        logits = nn.Dense(self.num_classes, name=names[-1], **dense)(x)
        return logits


def train_flops_per_sample(hidden: tuple[int, ...] = (256, 256), input_dim: int = 784,
                           num_classes: int = 10) -> int:
    """Matmul FLOPs of one training sample: the forward pass (2 * in * out per Dense), the
    weight gradients (the same again) and the input gradients of every Dense but the first
    (nothing needs the gradient of the images). 1,211,392 for 784-256-256-10."""
    sizes = (input_dim, *hidden, num_classes)
    macs = [a * b for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
    return 2 * sum(macs) + 2 * sum(macs) + 2 * sum(macs[1:])


def forward_flops_per_sample(hidden: tuple[int, ...] = (256, 256), input_dim: int = 784,
                             num_classes: int = 10) -> int:
    """Matmul FLOPs of one sample's forward pass (evaluation): 537,600 for 784-256-256-10."""
    sizes = (input_dim, *hidden, num_classes)
    return 2 * sum(a * b for a, b in zip(sizes[:-1], sizes[1:], strict=True))


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
            rows.append((f"dropout_{i + 1} (rate per variant)", f"(batch, {kernel[1]})", "0"))
    total = count_params(shapes)
    widths = [max(len(r[c]) for r in rows) for c in range(3)]
    lines = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}" for a, b, c in rows]
    rule = "-" * len(lines[0])
    arch = "-".join(map(str, (input_dim, *model.hidden, model.num_classes)))
    return "\n".join([f"MLP {arch}", rule, lines[0], rule, *lines[1:], rule,
                      f"total parameters: {total:,} (all trainable)"])
