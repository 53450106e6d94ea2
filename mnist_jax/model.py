"""The MLP: Dense layers with ReLU, optional dropout after each hidden layer, logits out."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.experimental.layout import Layout, with_layout_constraint

from mnist_jax.config import dense_names

# Keras's Dense default; Flax's own default is LeCun normal.
glorot_uniform = nn.initializers.glorot_uniform()


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


def _contract(a: jax.Array, b: jax.Array, dims: tuple[int, int], precision) -> jax.Array:
    """a @ b over a's axis dims[0] and b's axis dims[1], accumulated and returned in
    float32."""
    return jax.lax.dot_general(a, b, (((dims[0],), (dims[1],)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)


def _product(x: jax.Array, kernel: jax.Array, dtype, precision) -> jax.Array:
    """x [..., K] @ kernel [K, N] with both operands in `dtype`, in float32."""
    return _contract(x.astype(dtype), kernel.astype(dtype), (x.ndim - 1, 0), precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def matmul(x: jax.Array, kernel: jax.Array, dtype=jnp.float32, precision=None,
           row_major: bool = True) -> jax.Array:
    """float32 x [..., K] @ kernel [K, N], the operands in `dtype` (float32, or bfloat16 for
    mixed precision), the products accumulated and returned in float32; the gradients'
    products (g @ kernel^T, x^T @ g) alike, with g in `dtype` too.

    The gradients are JAX's own, written out for XLA:CPU, whose fast matmuls (YNNPACK) take a
    row-major left operand and, in bfloat16, only bfloat16 x bfloat16 -> float32 products.
    The kernel gradient contracts over the batch, the leading axis of both operands; XLA
    folds x's transpose into the product, which then runs in XLA's fallback (in bfloat16 with
    conversions to float32 around it). Made row-major on CPU, the 784x128x256 product ran in
    0.11 ms instead of 0.23 ms in bfloat16, and the study's float32 epoch 4% faster
    (docs/benchmarks.md, Zen 5); JAX's transposes also give bfloat16 results, another
    fallback. `row_major=False` leaves the transpose to XLA: where the batch or the models are
    split over devices, the SPMD partitioner cannot split the layout constraint and would
    gather every batch or model onto each device.
    """
    return _product(x, kernel, dtype, precision)


def _matmul_fwd(x, kernel, dtype, precision, row_major):
    xc, kc = x.astype(dtype), kernel.astype(dtype)
    return _product(xc, kc, dtype, precision), (xc, kc)


def _matmul_bwd(dtype, precision, row_major, residuals, g):
    xc, kc = residuals
    gc = g.astype(dtype)
    dx = _contract(gc, kc, (gc.ndim - 1, 1), precision)
    rows = xc.reshape(-1, xc.shape[-1]).T
    if row_major and jax.default_backend() == "cpu":
        # A row-major copy of x^T: without it XLA folds the transpose into the product.
        rows = with_layout_constraint(rows, Layout(major_to_minor=(0, 1)))
    dkernel = _contract(rows, gc.reshape(-1, gc.shape[-1]), (1, 0), precision)
    return dx, dkernel


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _dot_general(x, kernel, dimension_numbers, precision=None, *, dtype, row_major, **_):
    """`matmul` in the signature nn.Dense calls its `dot_general` with, on one CPU device;
    elsewhere the same product with JAX's own gradients, which train the same numbers split
    over two processes as over one process's devices (tests/test_parallel.py). `matmul`'s
    custom_vjp did not: its kernel gradient, reduced over gloo, was summed in another order
    than within one process (2e-5 in the baseline's first-epoch loss, 6e-4 with dropout's
    amplification), where JAX's transposed one agreed to 6 digits."""
    assert dimension_numbers == (((x.ndim - 1,), (0,)), ((), ())), dimension_numbers
    if row_major and jax.default_backend() == "cpu":
        return matmul(x, kernel, dtype, precision, row_major)
    return _product(x, kernel, dtype, precision)


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
    `dtype` None computes in float32; 'bfloat16' is mixed precision: every matmul takes its
    operands rounded to bfloat16 and accumulates in float32 (with `matmul` the gradients'
    too; with JAX's gradients their cotangents stay float32), while parameters, optimizer
    state, activations, loss and logits stay float32. `precision` is the float32 matmuls'
    (None: XLA's default, TF32 on recent NVIDIA GPUs; 'highest': full float32).
    `row_major_transposes` (on CPU) computes each Dense with `matmul`, whose kernel gradient
    takes a row-major copy of its transposed operand for XLA:CPU's fast products; fit turns
    it off when a model's batch or the models are split over devices, and the products then
    take JAX's own gradients.
    """

    hidden: tuple[int, ...] = (256, 256)
    num_classes: int = 10
    dropout: bool = False
    dropout_rng: str = "hash"
    dtype: str | None = None
    precision: str | None = None
    row_major_transposes: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, dropout_rates: jax.Array | None = None, *,
                 train: bool = False) -> jax.Array:
        names = dense_names(self.hidden)
        if self.dtype not in (None, "float32", "bfloat16"):
            raise ValueError(f"dtype {self.dtype!r}: use None, 'float32' or 'bfloat16'")
        compute = jnp.bfloat16 if self.dtype == "bfloat16" else jnp.float32
        dense = dict(kernel_init=glorot_uniform, param_dtype=jnp.float32,
                     precision=None if compute == jnp.bfloat16 else self.precision,
                     dot_general=functools.partial(_dot_general, dtype=compute,
                                                   row_major=self.row_major_transposes))
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
