"""The CPU kernels: the matmuls nn.Dense is handed and the dropout bits, against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from mnist_jax.kernels import Dot, RowMajorDot, dropout_bits, hash_bits, matmul, threefry_bits
from mnist_jax.model import MLP

DENSE_DIMS = (((1,), (0,)), ((), ()))


def test_kernels_compare_and_hash_by_value():
    """A model holding a kernel is a static argument of jitted programs: equal kernels must
    be equal and hash alike between calls, or each call would compile anew."""
    for kernel in (Dot, RowMajorDot):
        assert kernel(jnp.bfloat16) == kernel(jnp.bfloat16)
        assert hash(kernel(jnp.bfloat16)) == hash(kernel(jnp.bfloat16))
        assert kernel() == kernel(jnp.float32) != kernel(jnp.bfloat16)
    assert Dot() != RowMajorDot()
    assert dropout_bits("hash") == dropout_bits("hash")


@pytest.mark.parametrize("kernel", [Dot, RowMajorDot])
def test_dense_kernels_compute_dense_with_gradients_by_numpy(kernel):
    """Each kernel is what nn.Dense calls: x @ W (Dense adds b), float32, and the gradients
    of both operands; it takes exactly Dense's arguments (no keyword is silently dropped)."""
    kx, kc = jax.random.split(jax.random.key(4))
    x = jax.random.normal(kx, (6, 40))
    c = np.asarray(jax.random.normal(kc, (6, 7)), np.float64)
    dense = nn.Dense(7, dot_general=kernel(jnp.float32))
    params = dense.init(jax.random.key(0), x)["params"]
    w = np.asarray(params["kernel"], np.float64)
    np.testing.assert_allclose(dense.apply({"params": params}, x), np.asarray(x) @ w,
                               rtol=1e-5, atol=1e-5)
    dx, dp = jax.grad(lambda x, p: (dense.apply({"params": p}, x) * c).sum(),
                      argnums=(0, 1))(x, params)
    np.testing.assert_allclose(dx, c @ w.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dp["kernel"], np.asarray(x, np.float64).T @ c,
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError):
        kernel()(x, params["kernel"], DENSE_DIMS, None, preferred_element_type=jnp.float32)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_matmul_gradients_match_numpy(dtype):
    """The hand-written gradients of `matmul` against NumPy in float64 on the operands
    rounded to `dtype`, with two leading batch axes (the reshape of x^T), and vmapped over
    models (the stack placement)."""
    import ml_dtypes

    kx, kw, kc = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(kx, (2, 3, 40))
    w = jax.random.normal(kw, (40, 7))
    c = jax.random.normal(kc, (2, 3, 7))  # the cotangent, through sum(out * c)

    def f(x, w):
        return (matmul(x, w, jnp.dtype(dtype)) * c).sum()

    out, (dx, dw) = jax.value_and_grad(f, argnums=(0, 1))(x, w)

    def rounded(a):
        a = np.asarray(a)
        return (a.astype(ml_dtypes.bfloat16) if dtype == "bfloat16" else a).astype(np.float64)

    xr, wr, cr = rounded(x), rounded(w), rounded(c)
    np.testing.assert_allclose(out, ((xr @ wr) * np.asarray(c, np.float64)).sum(), rtol=1e-5)
    np.testing.assert_allclose(dx, cr @ wr.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, xr.reshape(6, 40).T @ cr.reshape(6, 7), rtol=1e-5, atol=1e-5)
    assert dx.dtype == dw.dtype == jnp.float32
    xs, ws = jnp.stack([x, -x]), jnp.stack([w, 2 * w])
    bx, bw = jax.vmap(jax.grad(f, argnums=(0, 1)))(xs, ws)
    for m in range(2):
        one = jax.grad(f, argnums=(0, 1))(xs[m], ws[m])
        np.testing.assert_allclose(bx[m], one[0], rtol=1e-5, atol=1e-6)  # rounding only
        np.testing.assert_allclose(bw[m], one[1], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's compiled program")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_training_gradient_compiles_to_fast_products_on_cpu(dtype):
    """In the compiled training gradient every product is XLA:CPU's fast kind: operands of
    the compute dtype and a row-major left operand. The kernel gradient's transpose, if XLA
    folds it back into the product, sends it to a slower fallback (in bfloat16 also with its
    operands converted to float32), as does a bfloat16 result (docs/benchmarks.md)."""
    import optax

    model = MLP(dtype=None if dtype == "float32" else dtype, dropout=True)
    x = jax.random.uniform(jax.random.key(1), (128, 784))
    y = jnp.arange(128) % 10
    params = model.init(jax.random.key(0), x)["params"]

    def loss(p):
        logits = model.apply({"params": p}, x, jnp.array([0.2, 0.2]), train=True,
                             rngs={"dropout": jax.random.key(2)})
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    dots = _compiled_dots(hlo)
    kind = {"float32": "f32", "bfloat16": "bf16"}[dtype]
    assert len(dots) == 8, hlo
    assert {d[:2] for d in dots} == {(kind, kind)}, dots
    assert all(d[2] == "1" for d in dots), dots  # the left operand contracted on its last axis


def _compiled_dots(hlo: str) -> list[tuple[str, str, str]]:
    """(lhs type, rhs type, lhs contracting axis) of every dot in an optimized HLO module's
    text (its 2-D products)."""
    import re

    found, types = [], {}
    for line in hlo.splitlines():
        if line.rstrip().endswith("{") and "=" not in line.split("(")[0]:
            types = {}  # a new computation: its own names
        m = re.match(r"\s*(?:ROOT )?%(\S+) = (\w+)\[", line)
        if m:
            types[m.group(1)] = m.group(2)
        d = re.search(r" dot\(%([^,\s]+), %([^,\s)]+)\).*lhs_contracting_dims=\{(\d+)\}", line)
        if d:
            found.append((types[d.group(1)], types[d.group(2)], d.group(3)))
    return found



def test_hash_bits_look_random():
    """Each bit is a fair coin, and masks of different keys, neighbouring units and the two
    layers are uncorrelated (all within 5 standard errors)."""
    key = jax.random.key(11)
    bits = np.asarray(hash_bits(key, (2, 128, 256)))
    n = bits[0].size
    for b in range(32):
        assert abs(((bits >> b) & 1).mean() - 0.5) < 5 * 0.5 / np.sqrt(bits.size), b
    keep = (bits >= np.uint32(0.45 * 2**32)).astype(np.float64)
    other = (np.asarray(hash_bits(jax.random.fold_in(key, 1), (2, 128, 256)))
             >= np.uint32(0.45 * 2**32)).astype(np.float64)

    def corr(a, b):
        return np.corrcoef(a.ravel(), b.ravel())[0, 1]

    bound = 5 / np.sqrt(n)
    assert abs(corr(keep[0], other[0])) < bound  # next step
    assert abs(corr(keep[0], keep[1])) < bound  # the other layer
    assert abs(corr(keep[0][:, 1:], keep[0][:, :-1])) < bound  # neighbouring units
    assert abs(corr(keep[0][1:], keep[0][:-1])) < bound  # neighbouring samples


def test_threefry_bits_are_jax_random_bits():
    key = jax.random.key(5)
    np.testing.assert_array_equal(dropout_bits("threefry")(key, (4, 8)),
                                  jax.random.bits(key, (4, 8), jnp.uint32))
    assert dropout_bits("threefry") is threefry_bits and dropout_bits("hash") is hash_bits
    with pytest.raises(ValueError, match="unknown dropout generator"):
        dropout_bits("mt19937")
