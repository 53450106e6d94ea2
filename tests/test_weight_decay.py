"""Decoupled weight decay in a stack: each model decays by its own traced value, a run
decides once whether its optimizer decays, and the decay shrinks what
TrainConfig.weight_decay_on names. Keras's own numbers are replayed in test_fidelity.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mnist_jax import fit, optim, steps
from mnist_jax.config import VARIANTS, TrainConfig, Variant
from mnist_jax.errors import ConfigError
from mnist_jax.model import MLP

CONFIG = TrainConfig(epochs=1, batch_size=128, eval_batch_size=500)


@pytest.fixture(scope="module")
def small(splits):
    return fit.Splits(splits.train_images[:1280], splits.train_labels[:1280],
                      splits.val_images[:500], splits.val_labels[:500],
                      splits.test_images[:500], splits.test_labels[:500])


def leaves(stack, name, seed_index=0):
    return [np.asarray(x) for x in jax.tree.leaves(stack.params(name, seed_index))]


@pytest.mark.parametrize("placement", ["stack", "concurrent"])
def test_each_model_decays_by_its_own_value(small, placement):
    """Catches a decay shared by the stack (one value for every model) and a value read from
    another model's slot: each decayed model equals itself trained alone, bit for bit where
    each model runs the single-model program (concurrent); vmapped ('stack'), XLA may round
    a stack of 3 otherwise than one of 1 (plain Adam too: 9e-8 after 10 steps)."""
    same = (np.testing.assert_array_equal if placement == "concurrent" else
            lambda a, b, err_msg: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7,
                                                             err_msg=err_msg))
    config = dataclasses.replace(CONFIG, placement=placement)
    base = VARIANTS["baseline"]
    mixed = [base, base.with_values(weight_decay=5.0), VARIANTS["l2"].with_values(
        weight_decay=0.5)]
    together = fit.train_stack(small, mixed, (0, 1), config, progress=False)
    assert optim.decays(together.state.opt_state)
    for variant in mixed[1:]:
        alone = fit.train_stack(small, [variant], (0, 1), config, progress=False)
        for s in range(2):
            for a, b in zip(leaves(together, variant.name, s), leaves(alone, variant.name, s),
                            strict=True):
                same(a, b, err_msg=f"{variant.name} seed {s}")
    # A model without decay beside them takes Keras's AdamW step with decay 0, which is
    # Keras's Adam step rounded in Keras's order: within rounding of the plain chain's, not
    # bit for bit (optim.keras_adamw). Measured: 6e-9 apart after 10 steps.
    alone = fit.train_stack(small, [base], (0, 1), config, progress=False)
    assert not optim.decays(alone.state.opt_state)
    for a, b in zip(leaves(together, "baseline"), leaves(alone, "baseline"), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    # And the decay did something: 10 steps of (1 - 5.0 * 1e-3) shrink sum(w**2) by 0.90.
    norm = [sum(float(np.sum(x**2)) for x in leaves(together, n)) for n in
            ("baseline", "baseline[weight_decay=5]")]
    assert norm[1] < 0.93 * norm[0]


def test_a_stack_without_decay_has_no_decay_in_its_optimizer(small):
    """Old runs' checkpoints and the study's programs stay as they were: no weight_decay
    hyperparameter unless some model decays, or the run says its stacks decay (a sweep's
    chunk of only undecayed points in a sweep with decay: every chunk alike)."""
    plain = [VARIANTS["baseline"], VARIANTS["dropout"]]
    stack = fit.new_stack(plain, (0,), CONFIG)
    assert not optim.decays(stack.state.opt_state)
    assert set(stack.state.opt_state.hyperparams) == {"learning_rate"}
    assert optim.decays(fit.new_stack(plain, (0,), CONFIG, decay=True).state.opt_state)
    with pytest.raises(ValueError, match="would not decay it"):
        fit.new_stack([plain[0].with_values(weight_decay=0.1)], (0,), CONFIG, decay=False)
    with pytest.raises(ValueError, match="needs an optimizer that decays"):
        steps.create_train_state(jax.random.key(0), MLP(), optim.optimizer(),
                                 steps.Hyperparams(jnp.zeros(3), jnp.zeros(2)),
                                 weight_decay=0.1)


@pytest.mark.parametrize("on", ["all", "kernels"])
@pytest.mark.parametrize("name", ["keras-adam", "adam"])
def test_with_no_gradient_a_step_is_the_decay_alone(name, on):
    """With zero gradients either Adam's step is 0 / (0 + eps) = 0, so the step is the decay
    by hand: w * (1 - wd * lr) where decayed (every variable, or the kernels), w elsewhere."""
    lr, wd = 0.01, 0.3
    tx = optim.optimizer(name, decay_on=on)
    hparams = steps.Hyperparams(jnp.zeros(3), jnp.zeros(2))
    state = steps.create_train_state(jax.random.key(0), MLP(), tx, hparams, learning_rate=lr,
                                     weight_decay=wd)
    params = jax.tree_util.tree_map_with_path(  # nonzero biases, so their decay shows
        lambda path, x: x + 0.5 if path[-1].key == "bias" else x, state.params)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), state.opt_state, params)
    after = optax.apply_updates(params, updates)
    for layer in params:
        for kind in ("kernel", "bias"):
            w = np.asarray(params[layer][kind], np.float64)
            expected = w * (1 - wd * lr) if kind == "kernel" or on == "all" else w
            np.testing.assert_allclose(np.asarray(after[layer][kind]), expected,
                                       rtol=1e-6, atol=0, err_msg=f"{layer}/{kind}")


def test_weight_decay_values_are_checked_and_named():
    with pytest.raises(ConfigError, match=r"--weight-decay -1 \(variant 'x'\) must be a "
                                          r"finite number >= 0"):
        Variant("x", weight_decay=-1).validate((256, 256))
    with pytest.raises(ConfigError, match="--weight-decay nan"):
        fit.new_stack([Variant("x", weight_decay=float("nan"))], (0,), CONFIG)
    assert VARIANTS["l2"].with_values(weight_decay=1e-3).name == "l2[weight_decay=0.001]"


def test_a_decayed_run_resumes_as_the_uninterrupted_run(small, tmp_path):
    """A decayed stack's optimizer state (its weight decay hyperparameters with the rest)
    goes through the checkpoint: a run stopped after epoch 1 and resumed equals the
    uninterrupted one bit for bit (a restore target built with the plain chain would not
    match the saved tree; one that left any of the state fresh would part)."""
    from mnist_jax import checkpoint

    variants = [VARIANTS["baseline"].with_values(weight_decay=0.3),
                VARIANTS["dropout"].with_values(weight_decay=0.03)]
    config = dataclasses.replace(CONFIG, epochs=2)

    def new(epochs):
        return fit.new_stack(variants, (0,), dataclasses.replace(config, epochs=epochs))

    uninterrupted = fit.fit(new(2), small, progress=False)
    mgr = checkpoint.manager(tmp_path / "checkpoints")
    fit.fit(new(1), small, progress=False, on_epoch_end=lambda s: checkpoint.save(mgr, s))
    restored = checkpoint.restore(mgr, new(2))
    assert np.asarray(restored.state.opt_state.hyperparams["weight_decay"]).ravel().tolist() \
        == pytest.approx([0.3, 0.03])
    resumed = fit.fit(restored, small, progress=False)
    mgr.close()
    for a, b in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(uninterrupted.state),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert resumed.histories == uninterrupted.histories
