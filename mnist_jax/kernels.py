"""The MLP's CPU kernels, handed to it as values: nn.Dense's `dot_general` and dropout's bits.

Each is a module-level function or a frozen dataclass, so a model holding one compares and
hashes by value and a jitted program taking the model as a static argument is not recompiled.
Measurements behind them: docs/design.md ("CPU kernels") and docs/benchmarks.md.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.layout import Layout, with_layout_constraint

# (key, shape) -> uint32 bits of that shape: what the dropout layer draws its masks from.
Bits = Callable[[jax.Array, tuple[int, ...]], jax.Array]


def _contract(a: jax.Array, b: jax.Array, dims: tuple[int, int], precision) -> jax.Array:
    """a @ b over a's axis dims[0] and b's axis dims[1], accumulated and returned in float32."""
    return jax.lax.dot_general(a, b, (((dims[0],), (dims[1],)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)


def _product(x: jax.Array, kernel: jax.Array, dtype, precision) -> jax.Array:
    """x [..., K] @ kernel [K, N] with both operands in `dtype`, in float32."""
    return _contract(x.astype(dtype), kernel.astype(dtype), (x.ndim - 1, 0), precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def matmul(x: jax.Array, kernel: jax.Array, dtype=jnp.float32, precision=None) -> jax.Array:
    """float32 x [..., K] @ kernel [K, N] with the operands in `dtype`, returned in float32.

    JAX's gradients written out (g @ kernel^T, x^T @ g, g in `dtype` too, float32 results) so
    that on CPU the kernel gradient takes a row-major copy of x^T: XLA:CPU's fast products
    want a row-major left operand, and in bfloat16 a float32 result.
    """
    return _product(x, kernel, dtype, precision)


def _matmul_fwd(x, kernel, dtype, precision):
    xc, kc = x.astype(dtype), kernel.astype(dtype)
    return _product(xc, kc, dtype, precision), (xc, kc)


def _matmul_bwd(dtype, precision, residuals, g):
    xc, kc = residuals
    gc = g.astype(dtype)
    dx = _contract(gc, kc, (gc.ndim - 1, 1), precision)
    rows = xc.reshape(-1, xc.shape[-1]).T
    if jax.default_backend() == "cpu":
        # A row-major copy of x^T: without it XLA folds the transpose into the product.
        rows = with_layout_constraint(rows, Layout(major_to_minor=(0, 1)))
    dkernel = _contract(rows, gc.reshape(-1, gc.shape[-1]), (1, 0), precision)
    return dx, dkernel


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _check_dense(x: jax.Array, dimension_numbers) -> None:
    assert dimension_numbers == (((x.ndim - 1,), (0,)), ((), ())), dimension_numbers


@dataclasses.dataclass(frozen=True)
class Dot:
    """nn.Dense's `dot_general` with JAX's own gradients, operands in `dtype`, float32 out.

    For a batch or models split over devices: the SPMD partitioner cannot split
    `RowMajorDot`'s layout constraint, and its gradient, reduced across processes, sums in
    another order than within one.
    """

    dtype: Any = jnp.float32

    def __call__(self, x: jax.Array, kernel: jax.Array, dimension_numbers,
                 precision=None) -> jax.Array:
        _check_dense(x, dimension_numbers)
        return _product(x, kernel, self.dtype, precision)


@dataclasses.dataclass(frozen=True)
class RowMajorDot:
    """nn.Dense's `dot_general` computed by `matmul` on CPU, by `Dot` elsewhere."""

    dtype: Any = jnp.float32

    def __call__(self, x: jax.Array, kernel: jax.Array, dimension_numbers,
                 precision=None) -> jax.Array:
        _check_dense(x, dimension_numbers)
        if jax.default_backend() == "cpu":
            return matmul(x, kernel, self.dtype, precision)
        return _product(x, kernel, self.dtype, precision)


def _lowbias32(x: jax.Array) -> jax.Array:
    """A bijective 32-bit integer hash with very low bias (C. Wellons' lowbias32)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def hash_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """uint32 bits of `shape`: each element's index hashed with two words Threefry draws from
    `key` (two rounds of lowbias32), a counter-based generator like Philox that on CPU costs a
    fraction of XLA's Threefry."""
    seed = jax.random.bits(key, (2,), jnp.uint32)
    counter = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
    return _lowbias32(_lowbias32(counter ^ seed[0]) ^ seed[1])


def threefry_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """uint32 bits of `shape` from `jax.random.bits`."""
    return jax.random.bits(key, shape, jnp.uint32)


def dropout_bits(name: str) -> Bits:
    """The generator a config's `dropout_rng` names: 'hash' or 'threefry'."""
    bits = {"hash": hash_bits, "threefry": threefry_bits}.get(name)
    if bits is None:
        raise ValueError(f"unknown dropout generator {name!r}; use 'hash' or 'threefry'")
    return bits
