"""Training: loss, penalty, Adam and the epoch against hand-written NumPy and math."""

import dataclasses
import itertools
import math
import re
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mnist_jax import fit, optim, placement, programs, stacks, steps
from mnist_jax.config import VARIANTS, TrainConfig
from mnist_jax.errors import TrainingDiverged
from mnist_jax.model import MLP
from mnist_jax.optim import optimizer
from mnist_jax.steps import (
    Batch,
    Hyperparams,
    create_train_state,
    epoch_batches,
    evaluate_rows,
    l2_penalty,
    loss_fn,
    shuffle_indices,
    train_step,
)

HIDDEN = (256, 256)
NAMES = ("hidden_1", "hidden_2", "output")


def hparams(variant: str) -> Hyperparams:
    v = VARIANTS[variant]
    return Hyperparams(jnp.asarray(v.l2_vector(HIDDEN)), jnp.asarray(v.dropout_vector(HIDDEN)))


def state_for(variant: str, lr: float = 1e-3, seed: int = 0,
              optimizer_name: str = "keras-adam"):
    model = MLP(dropout=VARIANTS[variant].dropout > 0)
    return model, create_train_state(jax.random.key(seed), model, optimizer(optimizer_name),
                                     hparams(variant), learning_rate=lr)


def batch(splits, n=128, start=0) -> Batch:
    x = splits.train_images[start:start + n]
    return Batch(jnp.asarray(x), jnp.asarray(splits.train_labels[start:start + n]),
                 jnp.ones((n,), jnp.float32))


def np_params(params):
    return {k: {p: np.asarray(v, np.float64) for p, v in d.items()} for k, d in params.items()}


def numpy_loss_and_grads(params, x, y, w, l2):
    """Forward and backward pass of the MLP by hand, in float64."""
    x, y, w = (np.asarray(a, np.float64) for a in (x, y, w))
    (w1, b1), (w2, b2), (w3, b3) = ((params[n]["kernel"], params[n]["bias"]) for n in NAMES)
    z1 = x @ w1 + b1
    h1 = np.maximum(z1, 0)
    z2 = h1 @ w2 + b2
    h2 = np.maximum(z2, 0)
    z3 = h2 @ w3 + b3
    shifted = z3 - z3.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    n = w.sum()
    ce = -(w * (y * log_p).sum(axis=1)).sum() / n
    penalty = sum(c * (params[name]["kernel"] ** 2).sum()
                  for c, name in zip(l2, NAMES, strict=True))
    dz3 = (np.exp(log_p) - y) * w[:, None] / n
    dh2 = dz3 @ w3.T
    dz2 = dh2 * (z2 > 0)
    dz1 = (dz2 @ w2.T) * (z1 > 0)
    grads = {
        "hidden_1": {"kernel": x.T @ dz1 + 2 * l2[0] * w1, "bias": dz1.sum(0)},
        "hidden_2": {"kernel": h1.T @ dz2 + 2 * l2[1] * w2, "bias": dz2.sum(0)},
        "output": {"kernel": h2.T @ dz3 + 2 * l2[2] * w3, "bias": dz3.sum(0)},
    }
    return ce, penalty, grads


@pytest.mark.parametrize("variant", ["baseline", "l2", "l2_dropout"])
def test_loss_and_penalty_match_numpy(splits, variant):
    model, state = state_for(variant)
    b = batch(splits)
    loss, m = loss_fn(state.params, state.hparams, b, None, model=model, train=False)
    l2 = VARIANTS[variant].l2_vector(HIDDEN)
    ce, penalty, _ = numpy_loss_and_grads(np_params(state.params), b.images, b.labels,
                                          b.weights, l2)
    assert float(m.cross_entropy) == pytest.approx(ce, rel=1e-5)
    assert float(m.penalty) == pytest.approx(penalty, rel=1e-5)
    assert float(loss) == pytest.approx(ce + penalty, rel=1e-5)
    kernels = {n: np.asarray(state.params[n]["kernel"], np.float64) for n in NAMES}
    # Keras's l2(0.001): 0.001 * sum(W**2), no 1/2, only the named kernels.
    expected = {"baseline": 0.0,
                "l2": 0.001 * (kernels["hidden_1"] ** 2).sum(),
                "l2_dropout": 0.001 * ((kernels["hidden_1"] ** 2).sum()
                                       + (kernels["hidden_2"] ** 2).sum())}[variant]
    assert float(m.penalty) == pytest.approx(expected, rel=1e-5, abs=1e-12)
    # Biases never count, whatever their values.
    _, biased = loss_fn(with_random_biases(state.params), state.hparams, b, None, model=model,
                        train=False)
    assert float(biased.penalty) == pytest.approx(expected, rel=1e-5, abs=1e-12)


def with_random_biases(params, seed=0):
    """Fresh biases are all zero, where a penalty on them would have no gradient either."""
    keys = iter(jax.random.split(jax.random.key(seed), len(NAMES)))
    return {n: {**d, "bias": jax.random.normal(next(keys), d["bias"].shape)}
            for n, d in params.items()}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_penalty_touches_exactly_the_named_kernels(variant):
    _, state = state_for(variant)
    params = with_random_biases(state.params)
    grads = jax.grad(l2_penalty)(params, state.hparams.l2, HIDDEN)
    named = set(VARIANTS[variant].at_depth(HIDDEN).l2_layers)
    for name in NAMES:
        assert bool(jnp.any(grads[name]["kernel"] != 0)) == (name in named), name
        assert not jnp.any(grads[name]["bias"])


def test_keras_l2_equals_coupled_decay_of_twice_the_coefficient_under_sgd(splits):
    """Under plain SGD, c * sum(W**2) in the loss is add_decayed_weights(2c) on the kernels it
    names; under Adam it is not (which is why this is Keras's L2 and not AdamW)."""
    model, state = state_for("l2")
    b = batch(splits)
    lr, c = 0.1, 0.001

    def ce_only(p):
        return loss_fn(p, state.hparams.replace(l2=jnp.zeros(3)), b, None, model=model,
                       train=False)[0]

    def with_l2(p):
        return loss_fn(p, state.hparams, b, None, model=model, train=False)[0]

    sgd = optax.sgd(lr)
    updates, _ = sgd.update(jax.grad(with_l2)(state.params), sgd.init(state.params))
    coupled = optax.apply_updates(state.params, updates)
    mask = {n: {"kernel": n == "hidden_1", "bias": False} for n in NAMES}
    decayed = optax.chain(optax.add_decayed_weights(2 * c, mask=mask), optax.sgd(lr))
    updates, _ = decayed.update(jax.grad(ce_only)(state.params), decayed.init(state.params),
                                state.params)
    decoupled = optax.apply_updates(state.params, updates)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 coupled, decoupled)


def numpy_adam(p, m, v, g, t, lr, b1, b2, eps, form):
    """One Adam step in float64: Keras's (eps on the uncorrected sqrt(v), the corrections in
    the step size) or optax's (eps on the bias-corrected sqrt(v_hat))."""
    m = jax.tree.map(lambda m_, g_: b1 * m_ + (1 - b1) * g_, m, g)
    v = jax.tree.map(lambda v_, g_: b2 * v_ + (1 - b2) * g_**2, v, g)
    if form == "keras-adam":
        alpha = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
        p = jax.tree.map(lambda p_, m_, v_: p_ - alpha * m_ / (np.sqrt(v_) + eps), p, m, v)
    else:
        p = jax.tree.map(lambda p_, m_, v_: p_ - lr * (m_ / (1 - b1**t))
                         / (np.sqrt(v_ / (1 - b2**t)) + eps), p, m, v)
    return p, m, v


@pytest.mark.parametrize("form", ["keras-adam", "adam"])
def test_two_train_steps_match_numpy_adam(splits, form):
    """Gradients by hand-written backprop and Adam by hand, in float64."""
    model, state = state_for("l2_dropout", optimizer_name=form)
    state = state.replace(hparams=state.hparams.replace(dropout=jnp.zeros(2)))  # L2, no noise
    model = dataclasses.replace(model, dropout=False)
    l2 = VARIANTS["l2_dropout"].l2_vector(HIDDEN)
    p = np_params(state.params)
    m = jax.tree.map(np.zeros_like, p)
    v = jax.tree.map(np.zeros_like, p)
    for t, start in enumerate((0, 128), start=1):
        b = batch(splits, start=start)
        state, metrics = train_step(state, b, None, model=model, tx=optimizer(form))
        ce, penalty, g = numpy_loss_and_grads(p, b.images, b.labels, b.weights, l2)
        assert float(metrics.loss) == pytest.approx(ce + penalty, rel=1e-5)
        p, m, v = numpy_adam(p, m, v, g, t, 1e-3, 0.9, 0.999, 1e-7, form)
    assert int(state.step) == 2
    # Each step moves a weight by about lr = 1e-3; where a gradient is as small as float32's
    # rounding of it, Adam's g / sqrt(v) amplifies that, hence atol at 0.5% of a step (one
    # weight of 200,704 was 2.8e-6 off on a Zen 3; eps in the wrong place moves thousands).
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-6),
                 np_params(state.params), p)


def test_fit_trains_with_the_config_s_keras_adam(splits):
    """The training path's optimizer, from TrainConfig() to fit: two steps of fit.train
    against NumPy with Keras's Adam and the config's documented defaults (lr 1e-3, b1 0.9,
    b2 0.999, eps 1e-7). A default changed anywhere on the way (an eps of 1e-8 moves weights
    with small gradients by a third of a step) fails here."""
    data = fit.Splits(splits.train_images[:256], splits.train_labels[:256],
                      splits.val_images[:0], splits.val_labels[:0],
                      splits.test_images[:10], splits.test_labels[:10])
    config = TrainConfig(epochs=1, validation_split=0.0)
    result = fit.train(data, "l2", config, seed=2, progress=False)
    init_key, shuffle_key, _ = steps.run_keys(2)
    start = create_train_state(init_key, MLP(), optimizer(), hparams("l2"))
    p = np_params(start.params)
    m = jax.tree.map(np.zeros_like, p)
    v = jax.tree.map(np.zeros_like, p)
    idx, _ = epoch_batches(shuffle_key, jnp.int32(0), 256, 128)
    for t, rows in enumerate(np.asarray(idx), start=1):
        _, _, g = numpy_loss_and_grads(p, data.train_images[rows], data.train_labels[rows],
                                       np.ones(128), VARIANTS["l2"].l2_vector(HIDDEN))
        p, m, v = numpy_adam(p, m, v, g, t, 1e-3, 0.9, 0.999, 1e-7, "keras-adam")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6),
                 np_params(result.params), p)


def test_padding_changes_neither_loss_nor_gradient(splits):
    model, state = state_for("l2")
    small = batch(splits, n=16)
    padded = Batch(jnp.concatenate([small.images, jnp.asarray(splits.train_images[:112])]),
                   jnp.concatenate([small.labels, jnp.asarray(splits.train_labels[:112])]),
                   jnp.concatenate([jnp.ones(16), jnp.zeros(112)]))

    def f(b):
        return jax.value_and_grad(lambda p: loss_fn(p, state.hparams, b, None, model=model,
                                                    train=False)[0])(state.params)

    (l_small, g_small), (l_pad, g_pad) = f(small), f(padded)
    assert float(l_small) == pytest.approx(float(l_pad), rel=1e-6)
    # Equal up to float32 summation order (the padded matmul is blocked differently).
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 g_small, g_pad)


@pytest.mark.parametrize("n", [42000, 60000, 1000, 7])
def test_shuffle_is_jax_random_s_algorithm_with_packed_keys(n):
    """NumPy replays tjablin's shuffle (stable argsort by fresh random keys, round after
    round) from the same random bits; the packed single-array sorts must agree."""
    key = jax.random.key(5)
    index_bits = (n - 1).bit_length()
    rounds = math.ceil(3 * math.log(n) / math.log(2.0 ** (32 - index_bits)))
    perm = np.arange(n)
    for round_key in jax.random.split(key, rounds):
        random = np.asarray(jax.random.bits(round_key, (n,), jnp.uint32)) >> index_bits
        perm = perm[np.argsort(random, kind="stable")]
    got = np.asarray(shuffle_indices(key, n))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, perm)
    assert rounds == {42000: 3, 60000: 3, 1000: 2, 7: 1}[n]


@pytest.mark.parametrize("n", [1, 2, 65536, 65537])
def test_shuffle_is_a_permutation(n):
    np.testing.assert_array_equal(np.sort(np.asarray(shuffle_indices(jax.random.key(1), n))),
                                  np.arange(n))


def test_shuffle_draws_every_order_equally_often():
    """All 24 orders of 4 items over 4800 keys: chi-square against uniform (23 degrees of
    freedom; a fair shuffle lands above 49.7, the 0.1% point, once in a thousand key sets)."""
    draws = jax.vmap(lambda k: shuffle_indices(k, 4))(jax.random.split(jax.random.key(2), 4800))
    counts = {p: 0 for p in itertools.permutations(range(4))}
    for row in np.asarray(draws):
        counts[tuple(row)] += 1
    chi2 = sum((c - 200) ** 2 / 200 for c in counts.values())
    assert chi2 < 49.7, counts


def test_shuffle_hands_huge_sets_to_jax_random(monkeypatch):
    monkeypatch.setattr(steps, "_MAX_INDEX_BITS", 4)
    key = jax.random.key(3)
    np.testing.assert_array_equal(shuffle_indices(key, 17), jax.random.permutation(key, 17))


@pytest.mark.parametrize("n, batch_size, steps, last", [(42000, 128, 329, 16),
                                                        (1000, 1000, 1, 1000),
                                                        (10, 3, 4, 1)])
def test_every_sample_once_per_epoch(n, batch_size, steps, last):
    key = jax.random.key(0)
    idx0, w0 = map(np.asarray, epoch_batches(key, jnp.int32(0), n, batch_size))
    idx1, _ = map(np.asarray, epoch_batches(key, jnp.int32(1), n, batch_size))
    assert idx0.shape == w0.shape == (steps, batch_size)
    assert int(w0[-1].sum()) == last and w0[:-1].all()
    np.testing.assert_array_equal(np.sort(idx0[w0 == 1]), np.arange(n))
    if n > batch_size:
        assert not np.array_equal(idx0, idx1), "a fresh permutation every epoch"


@pytest.fixture(scope="module")
def small(splits):
    """A small but real split: 2,000 training and 500 validation images."""
    return fit.Splits(splits.train_images[:2000], splits.train_labels[:2000],
                      splits.val_images[:500], splits.val_labels[:500],
                      splits.test_images[:500], splits.test_labels[:500])


def test_epoch_visits_each_training_sample_exactly_once(small):
    """With a learning rate of 0 nothing moves, so the epoch's mean loss must equal the loss
    of the training set evaluated in one pass: a sample skipped or repeated would show."""
    config = TrainConfig(epochs=1, learning_rate=0.0, batch_size=96)
    result = fit.train(small, "l2", config, progress=False)
    n = len(small.train_images)
    full = evaluate_rows(result.state, jnp.asarray(small.train_images),
                         jnp.asarray(small.train_labels), 0, n, model=result.model, batch_size=700)
    assert result.history["loss"][0] == pytest.approx(float(full["loss"]), rel=1e-5)
    assert result.history["accuracy"][0] == pytest.approx(float(full["accuracy"]), abs=1e-6)


def test_same_seed_same_numbers_other_seed_other_numbers(small):
    config = TrainConfig(epochs=2)
    a = fit.train(small, "dropout", config, seed=3, progress=False)
    b = fit.train(small, "dropout", config, seed=3, progress=False)
    c = fit.train(small, "dropout", config, seed=4, progress=False)
    assert a.history == b.history
    jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
    assert a.history["loss"] != c.history["loss"]
    assert set(a.history) == {"loss", "accuracy", "val_loss", "val_accuracy", "cross_entropy",
                              "penalty", "val_cross_entropy"}
    for key in a.history:
        assert len(a.history[key]) == 2


def numpy_metrics(params, images, labels, l2):
    """Cross-entropy, penalty and accuracy of a whole set by a NumPy forward pass, float64."""
    p = np_params(params)
    h = np.asarray(images, np.float64)
    for name in NAMES[:-1]:
        h = np.maximum(h @ p[name]["kernel"] + p[name]["bias"], 0)
    z = h @ p["output"]["kernel"] + p["output"]["bias"]
    z = z - z.max(1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
    ce = -(labels * log_p).sum(1).mean()
    penalty = sum(c * (p[n]["kernel"] ** 2).sum() for c, n in zip(l2, NAMES, strict=True))
    return ce, penalty, (z.argmax(1) == labels.argmax(1)).mean()


def test_every_history_entry_against_numpy(small):
    """With a learning rate of 0 the weights stay the initial ones, so each of an epoch's
    history entries is a NumPy forward pass over the training or validation set."""
    result = fit.train(small, "l2", TrainConfig(epochs=2, learning_rate=0.0, batch_size=96),
                       seed=1, progress=False)
    l2 = VARIANTS["l2"].l2_vector(HIDDEN)
    ce, penalty, acc = numpy_metrics(result.params, small.train_images, small.train_labels, l2)
    val_ce, _, val_acc = numpy_metrics(result.params, small.val_images, small.val_labels, l2)
    assert penalty > 0.3  # 0.001 * sum(W1**2) of a 784x256 Glorot kernel: about 0.39
    h = result.history
    expected = {"loss": ce + penalty, "cross_entropy": ce, "penalty": penalty, "accuracy": acc,
                "val_loss": val_ce + penalty, "val_cross_entropy": val_ce,
                "val_accuracy": val_acc}
    assert set(h) == set(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(h[key], [value, value], rtol=2e-5, atol=1e-6, err_msg=key)


def same_image_splits(splits, n: int) -> fit.Splits:
    """n copies of one training image: every batch is the same, whatever the order."""
    x = np.repeat(splits.train_images[:1], n, 0)
    y = np.repeat(splits.train_labels[:1], n, 0)
    return fit.Splits(x, y, x[:0], y[:0], x[:1], y[:1])


def test_dropout_masks_change_from_step_to_step(splits):
    """One step per epoch on identical images with the weights frozen (lr 0): the two epochs'
    losses differ only through their dropout masks. A key not folded with the step draws the
    same mask every step and gives equal losses."""
    data = same_image_splits(splits, 64)
    config = TrainConfig(epochs=2, batch_size=64, learning_rate=0.0, validation_split=0.0)
    loss = fit.train(data, "dropout", config, progress=False).history["loss"]
    assert abs(loss[0] - loss[1]) > 1e-3 * loss[0], loss


@pytest.mark.parametrize("placement", ["stack", "concurrent"])
def test_dropout_masks_differ_from_seed_to_seed(splits, placement):
    """Two seeds given the same weights, frozen: their losses differ only through their masks
    (a dropout key shared by the seeds gives equal losses)."""
    data = same_image_splits(splits, 64)
    config = TrainConfig(epochs=1, batch_size=64, learning_rate=0.0, validation_split=0.0,
                         placement=placement)
    stack = fit.new_stack([VARIANTS["dropout"]], (0, 1), config, n_train=64)
    stack.state = stack.state.replace(params=jax.tree.map(
        lambda a: jnp.broadcast_to(a[:1], a.shape), stack.state.params))
    fit.fit(stack, data, progress=False)
    a, b = (h["loss"][0] for h in stack.histories["dropout"])
    assert abs(a - b) > 1e-3 * a, (a, b)


@pytest.mark.parametrize(("placement", "seeds"), [("stack", (0, 5)), ("stack", (3,)),
                                                  ("sequential", (0, 5)),
                                                  ("concurrent", (0, 5))])
def test_stack_equals_models_trained_alone(small, placement, seeds):
    """Vmapped, a stack matches models trained alone up to float32 summation order; run one
    model at a time with the same program, or several such programs at once from threads,
    it matches them bit for bit. One seed is the accelerators' study."""
    variants = [VARIANTS[n] for n in VARIANTS]
    stack = fit.train_stack(small, variants, seeds, TrainConfig(epochs=1, placement=placement),
                            progress=False)
    for seed_index, seed in enumerate(seeds):
        for name in ("baseline", "l2_dropout"):
            # Alone, but compiled with the stack's structure (dropout layers present).
            alone = fit.new_stack([VARIANTS[name]], (seed,), TrainConfig(epochs=1))
            alone.model = stack.model
            fit.fit(alone, small, progress=False)
            params = stack.params(name, seed_index)
            if placement in ("sequential", "concurrent"):
                jax.tree.map(np.testing.assert_array_equal, params, alone.params(name))
                assert stack.histories[name][seed_index] == alone.histories[name][0]
                continue
            # Adam divides by sqrt(v): where a gradient is near zero, summation-order noise is
            # a visible part of a step (lr 1e-3), so the floor is 1% of one step.
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                         params, alone.params(name))
            for key, values in alone.histories[name][0].items():
                np.testing.assert_allclose(stack.histories[name][seed_index][key], values,
                                           rtol=1e-4)


def test_auto_schedule():
    """Concurrent (sequential when data-parallel) on CPU, the vmapped stack elsewhere."""
    on_cpu = jax.default_backend() == "cpu"
    assert placement.resolve(TrainConfig()) == ("concurrent" if on_cpu else "stack")
    assert placement.resolve(TrainConfig(data_parallel=2)) == ("sequential" if on_cpu else "stack")
    assert placement.resolve(TrainConfig(placement="stack")) == "stack"
    assert 1 <= placement.workers(8) <= 8 and placement.workers(1) == 1


def test_concurrent_schedule_runs_models_at_once(small, monkeypatch):
    """Two workers run two models' programs at the same time: each call waits at a barrier
    for the other (run one after another, the first would time out there)."""
    monkeypatch.setattr(placement, "workers", lambda n: min(n, 2))
    meet = threading.Barrier(2, timeout=30)
    threads = set()
    real = programs.train_epoch_jit

    class Spy:
        def lower(self, *args, **kwargs):
            compiled = real.lower(*args, **kwargs).compile()

            class Compiled:
                def compile(self, **options):
                    return self

                def __call__(self, *a):
                    threads.add(threading.get_ident())
                    meet.wait()
                    return compiled(*a)
            return Compiled()

    monkeypatch.setattr(programs, "train_epoch_jit", Spy())
    # Fresh threads for this test.
    monkeypatch.setattr(placement, "pool", placement.pool.__wrapped__)
    variants = [VARIANTS["baseline"], VARIANTS["l2"]]
    fit.train_stack(small, variants, (0, 1), TrainConfig(epochs=2, placement="concurrent"),
                    progress=False)
    assert len(threads) == 2 and threading.get_ident() not in threads


def test_divergence_stops_within_the_epoch_and_names_the_model(small):
    seen = []
    stack = fit.new_stack([VARIANTS["l2"]], (0,), TrainConfig(epochs=3, learning_rate=1e3),
                          n_train=2500)
    with pytest.raises(TrainingDiverged) as info:
        fit.fit(stack, small, progress=False, on_epoch_end=seen.append)
    e = info.value
    assert (e.variant, e.epoch) == ("l2", 1) and 1 <= e.step <= 16
    assert "'l2'" in str(e) and "epoch 1" in str(e) and "--lr" in str(e)
    assert seen == [] and stack.epochs_done == 0  # nothing of the bad epoch was kept


def test_validation_split_zero_has_no_val_history(splits):
    data = fit.Splits(splits.train_images[:1000], splits.train_labels[:1000],
                      splits.val_images[:0], splits.val_labels[:0],
                      splits.test_images[:10], splits.test_labels[:10])
    result = fit.train(data, "baseline", TrainConfig(epochs=1, validation_split=0.0),
                       progress=False)
    assert set(result.history) == {"loss", "accuracy", "cross_entropy", "penalty"}


@pytest.mark.parametrize("variants", [("l2_dropout",), tuple(VARIANTS)])
def test_epoch_updates_the_weights_in_place(small, variants):
    """With programs.compiler_options() XLA's loop updates the kernels in place; without them
    XLA:CPU copied the first two kernels every step (6% of a lone model's step, measured).
    XLA:GPU updates them in place either way (seen on an H200). A stack's loop carries one
    models axis: carried as (1, V, ...) and reshaped each step, its kernels were copied too,
    and its first kernels were transposed for one (784, V * 256) matmul (1.44x slower)."""
    stack = fit.new_stack([VARIANTS[n] for n in variants], (0,), TrainConfig())
    data = stacks.epoch_data(small)
    static = dict(model=stack.model, tx=optim.for_config(stack.config), batch_size=128,
                  batch_sharding=None)
    copies = r"f32\[(\d+,)*(784,256|256,256)\]\{[\d,]+\} copy\("
    if jax.default_backend() == "cpu" and len(variants) == 1:  # the pattern finds copies
        plain = programs.train_epoch_jit.lower(stack.state, stack.keys, data, jnp.int32(0),
                                               **static)
        assert re.search(copies, plain.compile().as_text())
    tuned = programs.compile_epoch(stack.state, stack.keys, data, jnp.int32(0), **static).as_text()
    assert not re.search(copies, tuned)
    if len(variants) > 1:
        wide = len(variants) * 256
        loop = [line for line in tuned.splitlines() if "train_epoch)/while/body" in line]
        assert loop and not [line for line in loop if f"[784,{wide}]" in line
                             or f"[{wide},784]" in line]


def test_a_second_fit_of_the_same_kind_reuses_the_compiled_epoch(small):
    """Compiled once per process: another seed, variant or learning rate reuses the programs;
    another batch size (other shapes) compiles its own epoch, and shares the evaluation (an
    evaluation batch no other test uses, so that this test compiles it first)."""
    before = programs.program_slot.cache_info()
    a = fit.train(small, "l2", TrainConfig(epochs=1, batch_size=80, eval_batch_size=1234),
                  progress=False)
    b = fit.train(small, "baseline", TrainConfig(epochs=1, batch_size=80, learning_rate=3e-3,
                                                 eval_batch_size=1234),
                  seed=7, progress=False)
    c = fit.train(small, "l2", TrainConfig(epochs=1, batch_size=112, eval_batch_size=1234),
                  progress=False)
    after = programs.program_slot.cache_info()
    # misses: a's epoch and evaluation, c's epoch; hits: b's two, c's evaluation
    assert (after.misses - before.misses, after.hits - before.hits) == (3, 3)
    losses = [a.history["loss"], b.history["loss"], c.history["loss"]]
    assert all(x != y for x, y in itertools.combinations(losses, 2))


@pytest.mark.parametrize("dropout", [False, True])
def test_stack_initialiser_gives_each_model_the_default_compilation_s_state(dropout):
    """fit's initialiser (one program for the whole stack, on CPU compiled at LLVM level 2,
    for a third of the compile time) gives each model (s, v) bitwise the state that
    create_train_state, compiled with XLA's defaults, gives from seed s's init key and
    variant v's hyperparameters and learning rate; and each seed's run_keys."""
    variants = [VARIANTS["l2_dropout" if dropout else "l2"],
                dataclasses.replace(VARIANTS["baseline"], learning_rate=0.01, name="fast")]
    config, seeds = TrainConfig(), (3, 7)
    model, state, keys = stacks.init_stack(variants, seeds, config)
    assert model.dropout == dropout
    tx = optim.for_config(config)
    default = jax.jit(create_train_state, static_argnames=("model", "tx"))
    for s, seed in enumerate(seeds):
        init_key, shuffle_key, dropout_key = steps.run_keys(seed)
        for got, expected in ((keys.shuffle[s], shuffle_key), (keys.dropout[s], dropout_key)):
            np.testing.assert_array_equal(jax.random.key_data(got), jax.random.key_data(expected))
        for v, variant in enumerate(variants):
            h = Hyperparams(jnp.asarray(variant.l2_vector(HIDDEN)),
                            jnp.asarray(variant.dropout_vector(HIDDEN)))
            expected = default(init_key, model=model, tx=tx, hparams=h,
                               learning_rate=variant.learning_rate_or(config.learning_rate))
            got = jax.tree.map(lambda a, s=s, v=v: a[s, v], state)
            assert jax.tree.structure(got) == jax.tree.structure(expected)
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_stack_params_picks_the_model_and_refuses_a_seed_it_lacks():
    """Stack.params (one compiled slice, whose traced index would clamp) gives model (s, v)
    as indexing gives it, negative indices too, and an IndexError past the last seed."""
    stack = fit.new_stack([VARIANTS["baseline"], VARIANTS["l2"]], (0, 1), TrainConfig())
    for seed_index, s in ((0, 0), (1, 1), (-1, 1)):
        got = stack.params("l2", seed_index)
        expected = jax.tree.map(lambda a, s=s: a[s, 1], stack.state.params)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(IndexError, match="seed_index 2"):
        stack.params("l2", 2)


def test_one_evaluation_program_reads_any_range_of_rows_as_numpy_does(splits):
    """`evaluate_rows` with traced bounds: chunks of 200 rows, a last chunk that reaches back
    from the array's end (the rows before it must not count twice), a range shorter than a
    chunk, a chunk larger than the array, and no rows at all (NaN). One compiled program
    per array and chunk size, whatever the range."""
    model, state = state_for("l2", seed=2)
    images, labels = jnp.asarray(splits.train_images[:1000]), jnp.asarray(
        splits.train_labels[:1000])
    l2 = VARIANTS["l2"].l2_vector(HIDDEN)
    run = jax.jit(steps.evaluate_rows, static_argnames=("model", "batch_size"))
    for start, count in [(0, 1000), (130, 457), (995, 5), (700, 300), (0, 1), (250, 0)]:
        out = run(state, images, labels, np.int32(start), np.int32(count), model=model,
                  batch_size=200)
        if not count:
            assert all(np.isnan(float(out[k])) for k in ("loss", "cross_entropy", "accuracy"))
            continue
        ce, penalty, acc = numpy_metrics(state.params, splits.train_images[start:start + count],
                                         splits.train_labels[start:start + count], l2)
        np.testing.assert_allclose(float(out["cross_entropy"]), ce, rtol=2e-6)
        np.testing.assert_allclose(float(out["loss"]), ce + penalty, rtol=2e-6)
        assert float(out["accuracy"]) == pytest.approx(acc, abs=1e-7), (start, count)
    assert run._cache_size() == 1
    wide = run(state, images[:150], labels[:150], np.int32(10), np.int32(140), model=model,
               batch_size=200)  # the chunk is the whole array
    ce, _, acc = numpy_metrics(state.params, splits.train_images[10:150],
                               splits.train_labels[10:150], l2)
    np.testing.assert_allclose(float(wide["cross_entropy"]), ce, rtol=2e-6)
    assert float(wide["accuracy"]) == pytest.approx(acc, abs=1e-7)


@pytest.mark.parametrize("placement", ["stack", "concurrent"])
def test_stack_evaluate_reads_fit_s_rows_with_fit_s_programs(small, placement, caplog):
    """After `fit`, every model's test and training metrics come from the rows already on
    the device and the evaluation program compiled with the epoch: nothing compiles, and each
    model's numbers are a NumPy forward pass's."""
    names = ("baseline", "l2")
    chunk = {"stack": 300, "concurrent": 310}[placement]  # programs no other test compiled
    stack = fit.new_stack([VARIANTS[n] for n in names], (0, 3),
                          TrainConfig(epochs=1, placement=placement, eval_batch_size=chunk), 2500)
    with pytest.raises(ValueError, match=r"call stack.place\(splits\) \(fit does\)"):
        stack.evaluate("test")
    fit.fit(stack, small, progress=False)
    with jax.log_compiles(), caplog.at_level("WARNING"):
        test, train = stack.evaluate("test"), stack.evaluate("train")
    assert not [r for r in caplog.records if "Compiling" in r.getMessage()]
    for v, name in enumerate(names):
        l2 = VARIANTS[name].l2_vector(HIDDEN)
        for s in range(2):
            params = stack.params(name, s)
            for got, images, labels in ((test, small.test_images, small.test_labels),
                                        (train, small.train_images, small.train_labels)):
                ce, penalty, acc = numpy_metrics(params, images, labels, l2)
                np.testing.assert_allclose(got["loss"][s, v], ce + penalty, rtol=2e-6)
                assert got["accuracy"][s, v] == pytest.approx(acc, abs=1e-7)
    with pytest.raises(ValueError, match="unknown split 'val'"):
        stack.evaluate("val")


def test_prepared_rows_reach_the_cpu_device_without_a_copy(mnist, splits):
    """`prepare` leaves the rows back to back in one read-only, 64-byte aligned buffer, which
    XLA:CPU uses in place; the rows are Keras's, train, validation, test in order. A Splits of
    separate arrays is copied into one, in the same order."""
    data = stacks.epoch_data(splits)
    assert not splits.train_images.flags.writeable and not splits.test_labels.flags.writeable
    if jax.default_backend() == "cpu":
        assert data.images.unsafe_buffer_pointer() == splits.train_images.ctypes.data
        assert data.labels.unsafe_buffer_pointer() == splits.train_labels.ctypes.data
    keras = np.concatenate([mnist.train_images, mnist.test_images]).reshape(70000, 784)
    np.testing.assert_array_equal(np.asarray(data.images), keras.astype("float32") / 255)
    labels = np.concatenate([mnist.train_labels, mnist.test_labels])
    np.testing.assert_array_equal(np.asarray(data.labels).argmax(1), labels)
    assert [data.rows(s) for s in ("train", "validation", "test")] == [
        (0, 42000), (42000, 18000), (60000, 10000)]
    own = fit.Splits(*(np.array(a[:7]) for a in (
        splits.train_images, splits.train_labels, splits.val_images, splits.val_labels,
        splits.test_images, splits.test_labels)))
    placed = stacks.epoch_data(own)
    np.testing.assert_array_equal(np.asarray(placed.images), np.concatenate(
        [splits.train_images[:7], splits.val_images[:7], splits.test_images[:7]]))
    assert (placed.n_train, placed.n_val, len(placed.images)) == (7, 7, 21)
