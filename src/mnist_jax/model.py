"""The MLP: Dense layers with ReLU, optional dropout after each hidden layer, logits out."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.experimental.layout import Layout, with_layout_constraint

# Keras's Dense default; Flax's own default is LeCun normal.
glorot_uniform = nn.initializers.glorot_uniform()


def dense_names(hidden: tuple[int, ...]) -> tuple[str, ...]:
    """Names of the Dense layers in order: hidden_1 .. hidden_k, then output."""
    return tuple(f"hidden_{i + 1}" for i in range(len(hidden))) + ("output",)


def _lowbias32(x: jax.Array) -> jax.Array:
    """A bijective 32-bit integer hash with very low bias (C. Wellons' lowbias32)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def random_bits(key: jax.Array, shape: tuple[int, ...], rng: str = "hash") -> jax.Array:
    """32 random bits per element, uint32, drawn from `key`.

    'threefry' is `jax.random.bits`. 'hash' draws two 32-bit words from `key` with Threefry
    and hashes each element's index with them (two rounds of lowbias32, one per word): a
    counter-based generator like Philox, keyed by the explicit key, and on CPU about ten
    times cheaper than XLA's Threefry for a dropout mask (see benchmarks/).
    """
    if rng == "threefry":
        return jax.random.bits(key, shape, jnp.uint32)
    if rng != "hash":
        raise ValueError(f"unknown dropout generator {rng!r}; use 'hash' or 'threefry'")
    seed = jax.random.bits(key, (2,), jnp.uint32)
    counter = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
    return _lowbias32(_lowbias32(counter ^ seed[0]) ^ seed[1])


def _matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x [..., K] @ kernel [K, N], accumulated and returned in float32."""
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)


@jax.custom_vjp
def bfloat16_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """float32 x [..., K] @ kernel [K, N] with the operands rounded to bfloat16 and the
    products accumulated in float32, in the forward pass and in both gradients alike.

    The gradients are written out because XLA:CPU's fast bfloat16 matmul (YNNPACK) takes only
    bfloat16 x bfloat16 -> float32 products with a row-major left operand: JAX's own
    transposes give bfloat16 results, and the kernel gradient contracts over the batch, the
    leading axis of both operands, which XLA folds into a transposed operand; either sends the
    matmul to XLA's float32 fallback with conversions around it, slower than float32 itself
    (a 128x784x256 product: 0.23 ms folded, 0.11 ms with the transpose made, 0.20 ms in
    float32 on a Zen 5; docs/benchmarks.md).
    """
    return _matmul(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))


def _bfloat16_matmul_fwd(x, kernel):
    xb, kb = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
    return _matmul(xb, kb), (xb, kb)


def _bfloat16_matmul_bwd(residuals, g):
    xb, kb = residuals
    gb = g.astype(jnp.bfloat16)
    dx = jax.lax.dot_general(gb, kb, (((gb.ndim - 1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32)
    rows = xb.reshape(-1, xb.shape[-1]).T
    if jax.default_backend() == "cpu":
        # A row-major copy of x^T: without it XLA folds the transpose into the product.
        rows = with_layout_constraint(rows, Layout(major_to_minor=(0, 1)))
    dkernel = _matmul(rows, gb.reshape(-1, gb.shape[-1]))
    return dx, dkernel


bfloat16_matmul.defvjp(_bfloat16_matmul_fwd, _bfloat16_matmul_bwd)


def _bfloat16_dot_general(x, kernel, dimension_numbers, precision=None, **_):
    """`bfloat16_matmul` in the signature nn.Dense calls its `dot_general` with."""
    assert dimension_numbers == (((x.ndim - 1,), (0,)), ((), ())), dimension_numbers
    return bfloat16_matmul(x, kernel)


class Dropout(nn.Module):
    """Inverted dropout whose rate is a traced value, so one compiled program serves any rate.

    Keeps each unit with probability 1 - rate and scales kept units by 1 / (1 - rate). The
    mask compares 32 random bits per unit with rate * 2**32 (no float conversion); a rate of
    0 keeps every unit and returns `x` unchanged. `rng` picks the generator of the bits
    (`random_bits`).
    """

    rng: str = "hash"

    @nn.compact
    def __call__(self, x: jax.Array, rate: jax.Array) -> jax.Array:
        bits = random_bits(self.make_rng("dropout"), x.shape, self.rng)
        threshold = (rate * 2.0**32).astype(jnp.uint32)
        keep = bits >= threshold
        return jnp.where(keep, x / (1.0 - rate).astype(x.dtype), jnp.zeros((), x.dtype))


class MLP(nn.Module):
    """784 -> hidden... -> num_classes, ReLU after each hidden Dense, logits out.

    Kernels are Glorot-uniform and biases zero, as in Keras. With `dropout=True` the module
    has a dropout layer after each hidden layer, its rate taken from `dropout_rates` (shape
    (len(hidden),)) at call time and active only when `train=True` (a 'dropout' RNG is then
    needed); with `dropout=False` there are none and no random bits are drawn.
    `dropout_rng` chooses the generator of the masks ('hash' or 'threefry', `random_bits`).
    `dtype` None computes in float32; 'bfloat16' is mixed precision: every matmul, forward
    and backward, takes its operands rounded to bfloat16 and accumulates in float32
    (`bfloat16_matmul`), while parameters, optimizer state, activations, loss and logits stay
    float32. `precision` is the float32 matmuls' (None: XLA's default, TF32 on recent NVIDIA
    GPUs; 'highest': full float32).
    """

    hidden: tuple[int, ...] = (256, 256)
    num_classes: int = 10
    dropout: bool = False
    dropout_rng: str = "hash"
    dtype: str | None = None
    precision: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, dropout_rates: jax.Array | None = None, *,
                 train: bool = False) -> jax.Array:
        names = dense_names(self.hidden)
        if self.dtype not in (None, "float32", "bfloat16"):
            raise ValueError(f"dtype {self.dtype!r}: use None, 'float32' or 'bfloat16'")
        dense = dict(kernel_init=glorot_uniform, param_dtype=jnp.float32,
                     precision=self.precision)
        if self.dtype == "bfloat16":
            dense["dot_general"] = _bfloat16_dot_general
        for i, width in enumerate(self.hidden):
            x = nn.Dense(width, name=names[i], **dense)(x)
            x = nn.relu(x)
            if self.dropout and train:
                x = Dropout(rng=self.dropout_rng, name=f"dropout_{i + 1}")(x, dropout_rates[i])
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
            rows.append((f"dropout_{i + 1} (rate traced)", f"(batch, {kernel[1]})", "0"))
    total = count_params(shapes)
    widths = [max(len(r[c]) for r in rows) for c in range(3)]
    lines = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}" for a, b, c in rows]
    rule = "-" * len(lines[0])
    arch = "-".join(map(str, (input_dim, *model.hidden, model.num_classes)))
    return "\n".join([f"MLP {arch}", rule, lines[0], rule, *lines[1:], rule,
                      f"total parameters: {total:,} (all trainable)"])
