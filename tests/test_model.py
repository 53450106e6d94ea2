"""The MLP and its dropout against hand-written NumPy."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from mnist_jax import kernels, stacks
from mnist_jax.model import (
    MLP,
    Dropout,
    count_params,
    dense_names,
    forward_flops_per_sample,
    summary,
    train_flops_per_sample,
)


def numpy_forward(params, x):
    h = np.maximum(x @ params["hidden_1"]["kernel"] + params["hidden_1"]["bias"], 0)
    h = np.maximum(h @ params["hidden_2"]["kernel"] + params["hidden_2"]["bias"], 0)
    return h @ params["output"]["kernel"] + params["output"]["bias"]


@pytest.fixture(scope="module")
def params():
    model = MLP(dropout=True)
    return jax.device_get(model.init(jax.random.key(0), jnp.zeros((1, 784)))["params"])


def test_parameter_count_and_shapes(params):
    assert count_params(params) == 784 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10 == 269322
    assert list(params) == list(dense_names((256, 256))) == ["hidden_1", "hidden_2", "output"]
    assert params["hidden_1"]["kernel"].shape == (784, 256)
    assert params["output"]["bias"].shape == (10,)


def test_keras_initialisation(params):
    """Glorot uniform kernels (|W| <= sqrt(6 / (fan_in + fan_out)), variance limit^2 / 3),
    zero biases."""
    for name in params:
        kernel = params[name]["kernel"]
        limit = np.sqrt(6.0 / sum(kernel.shape))
        assert np.abs(kernel).max() <= limit
        assert kernel.std() == pytest.approx(limit / np.sqrt(3), rel=0.05)
        assert not params[name]["bias"].any()


def test_forward_matches_numpy(params, splits):
    x = splits.test_images[:64]
    rates = jnp.array([0.45, 0.45])
    for module in (MLP(dropout=True), MLP(dropout=False)):
        logits = module.apply({"params": params}, x, rates, train=False)
        np.testing.assert_allclose(logits, numpy_forward(params, x), rtol=1e-5, atol=1e-5)


def test_dropout_is_off_at_evaluation_and_on_in_training(params, splits):
    x = splits.test_images[:64]
    model = MLP(dropout=True)
    rates = jnp.array([0.45, 0.45])
    evaluated = model.apply({"params": params}, x, rates, train=False)
    trained = model.apply({"params": params}, x, rates, train=True,
                          rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(evaluated, trained)
    zero_rates = model.apply({"params": params}, x, jnp.zeros(2), train=True,
                             rngs={"dropout": jax.random.key(1)})
    np.testing.assert_array_equal(zero_rates, evaluated)


def dropout(x, rate, key, rng="hash"):
    return Dropout(bits=kernels.dropout_bits(rng)).apply({}, x, jnp.float32(rate),
                                                         rngs={"dropout": key})


def odd_units_bits(key, shape):
    """Bits that drop every even unit at any rate > 0 and keep every odd one."""
    del key
    odd = jax.lax.iota(jnp.uint32, shape[-1]) % 2 == 1
    return jnp.broadcast_to(jnp.where(odd, jnp.uint32(2**32 - 1), jnp.uint32(0)), shape)


def test_dropout_draws_its_bits_from_the_function_it_is_given(params, splits):
    x = jnp.arange(1.0, 9.0).reshape(2, 4)
    y = Dropout(bits=odd_units_bits).apply({}, x, jnp.float32(0.5),
                                           rngs={"dropout": jax.random.key(0)})
    np.testing.assert_array_equal(y, [[0, 4, 0, 8], [0, 12, 0, 16]])
    # Through the MLP: each hidden layer's even units dropped, its odd ones doubled.
    model = MLP(dropout=True, dropout_bits=odd_units_bits)
    images = splits.test_images[:8]
    logits = model.apply({"params": params}, images, jnp.array([0.5, 0.5]), train=True,
                         rngs={"dropout": jax.random.key(1)})
    h = images
    for name in ("hidden_1", "hidden_2"):
        h = np.maximum(h @ params[name]["kernel"] + params[name]["bias"], 0)
        h[:, ::2], h[:, 1::2] = 0, 2 * h[:, 1::2]
    np.testing.assert_allclose(logits, h @ params["output"]["kernel"] + params["output"]["bias"],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rng", ["hash", "threefry"])
@pytest.mark.parametrize("rate", [0.1, 0.45, 0.9])
def test_dropout_keep_rate_and_scaling(rate, rng):
    x = jnp.ones((512, 256), jnp.float32)
    y = np.asarray(dropout(x, rate, jax.random.key(3), rng))
    kept = y != 0
    n = kept.size
    # The kept fraction is binomial(n, 1 - rate): within 5 standard deviations.
    assert abs(kept.mean() - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / n)
    np.testing.assert_allclose(y[kept], 1.0 / (1.0 - rate), rtol=1e-6)


def test_dropout_keys():
    x = jnp.ones((64, 256), jnp.float32)
    a = dropout(x, 0.45, jax.random.key(7))
    b = dropout(x, 0.45, jax.random.key(7))
    c = dropout(x, 0.45, jax.random.fold_in(jax.random.key(7), 1))
    np.testing.assert_array_equal(a, b)
    assert (np.asarray(a) != np.asarray(c)).mean() > 0.3
    np.testing.assert_array_equal(dropout(x, 0.0, jax.random.key(7)), x)


def test_summary_table():
    text = summary(MLP(dropout=True))
    assert "784-256-256-10" in text and "269,322" in text
    for row in ("hidden_1", "200,960", "hidden_2", "65,792", "output", "2,570", "dropout_1"):
        assert row in text
    assert "dropout" not in summary(MLP(dropout=False))


def test_flop_counts_by_hand():
    forward = 2 * (784 * 256 + 256 * 256 + 256 * 10)
    assert forward_flops_per_sample() == forward == 537_600
    # backward: weight gradients (as much as forward) + input gradients of layers 2 and 3
    assert train_flops_per_sample() == 2 * forward + 2 * (256 * 256 + 256 * 10) == 1_211_392


def test_bfloat16_rounds_matmul_operands_with_float32_weights_logits_and_state():
    """Mixed precision: every matmul's operands in bfloat16 with float32 products, the
    parameters (so the optimizer state) and the logits float32, the logits within bfloat16's
    rounding of float32's."""
    import optax

    x = jax.random.uniform(jax.random.key(1), (64, 784))
    f32, bf16 = MLP(), MLP(dtype="bfloat16")
    params = f32.init(jax.random.key(0), x)["params"]
    assert jax.tree.leaves(bf16.init(jax.random.key(0), x)["params"])[0].dtype == jnp.float32
    assert jax.tree.map(lambda a, b: a.shape == b.shape and bool((a == b).all()),
                        params, bf16.init(jax.random.key(0), x)["params"])

    def loss(p):
        return bf16.apply({"params": p}, x).sum()

    # The forward's 3 products and the 3 kernel and 3 input gradients (the images' one,
    # unused, XLA drops): each bfloat16 x bfloat16 -> float32.
    found = _dot_signatures(jax.make_jaxpr(jax.grad(loss))(params))
    assert len(found) == 9 and set(found) == {("bfloat16", "bfloat16", "float32")}, found
    low = bf16.apply({"params": params}, x)
    high = f32.apply({"params": params}, x)
    assert low.dtype == jnp.float32
    assert not np.array_equal(low, high)
    np.testing.assert_allclose(low, high, atol=0.05, rtol=0.05)
    state = optax.adam(1e-3).init(params)
    assert {a.dtype for a in jax.tree.leaves(state) if a.ndim} == {jnp.dtype(jnp.float32)}


def _dot_signatures(closed_jaxpr) -> list[tuple[str, str, str]]:
    """(lhs, rhs, out) dtype names of every dot_general in a jaxpr, nested ones included."""
    found = []

    def walk(jaxpr):
        for e in jaxpr.eqns:
            if e.primitive.name == "dot_general":
                found.append(tuple(str(v.aval.dtype) for v in (*e.invars, *e.outvars)))
            for sub in jax.extend.core.jaxprs_in_params(e.params):
                walk(sub)

    walk(closed_jaxpr.jaxpr)
    return found


def test_matmul_precision_highest_reaches_every_matmul():
    """'highest' holds even where JAX's default is lower (TF32 on GPUs; set here, since the
    tests otherwise run at 'highest'); without it the matmuls follow that default."""
    x = jnp.ones((4, 784))
    params = MLP().init(jax.random.key(0), x)["params"]
    highest = (jax.lax.Precision.HIGHEST,) * 2
    for precision, is_highest in ((None, False), ("highest", True)):
        model = MLP(precision=precision)
        with jax.default_matmul_precision("default"):  # the forward's and gradients' products
            jaxpr = jax.make_jaxpr(jax.grad(
                lambda p, m=model: m.apply({"params": p}, x).sum()))(params)
        found = _dot_params(jaxpr, "precision")
        assert len(found) == 9 and all((p == highest) == is_highest for p in found), found


def _dot_params(closed_jaxpr, name: str) -> list:
    """Parameter `name` of every dot_general in a jaxpr, nested ones included."""
    found = []

    def walk(jaxpr):
        for e in jaxpr.eqns:
            if e.primitive.name == "dot_general":
                found.append(e.params[name])
            for sub in jax.extend.core.jaxprs_in_params(e.params):
                walk(sub)

    walk(closed_jaxpr.jaxpr)
    return found


def test_the_train_config_s_precision_reaches_the_model():
    from mnist_jax import fit
    from mnist_jax.config import VARIANTS, TrainConfig

    for config, dtype, precision in ((TrainConfig(), None, None),
                                     (TrainConfig(dtype="bfloat16",
                                                  matmul_precision="highest"),
                                      "bfloat16", "highest")):
        stack = fit.new_stack([VARIANTS["baseline"]], (0,), config)
        assert (stack.model.dtype, stack.model.precision) == (dtype, precision)
        assert jax.tree.leaves(stack.state.params)[0].dtype == jnp.float32


def test_models_of_equal_configs_are_equal_and_hash_alike():
    """The MLP is a static argument of the jitted init, epoch and evaluation: models built
    from equal configs must be equal and hash alike, or every call would compile anew (a
    `functools.partial` or lambda field compares by identity)."""
    from mnist_jax.config import TrainConfig

    for settings in ({}, {"dtype": "bfloat16", "matmul_precision": "highest"},
                     {"dropout_rng": "threefry"}, {"placement": "stack", "model_parallel": 4},
                     {"data_parallel": 2}):
        a = stacks.model_for(TrainConfig(**settings), dropout=True)
        b = stacks.model_for(TrainConfig(**settings), dropout=True)
        assert a == b and hash(a) == hash(b), settings
    assert stacks.model_for(TrainConfig(), dropout=False) == MLP()


def test_the_train_config_picks_the_kernels():
    """The row-major matmul unless a batch or the models are split over devices; the
    config's dropout generator."""
    from mnist_jax.config import TrainConfig

    for settings, dot in (({}, kernels.RowMajorDot),
                          ({"placement": "stack", "model_parallel": 4}, kernels.Dot),
                          ({"data_parallel": 2}, kernels.Dot)):
        assert stacks.model_for(TrainConfig(**settings), dropout=True).dot_general is dot
    for rng, bits in (("hash", kernels.hash_bits), ("threefry", kernels.threefry_bits)):
        assert stacks.model_for(TrainConfig(dropout_rng=rng), dropout=True).dropout_bits is bits
