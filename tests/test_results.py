"""The choice and the paired comparisons, on hand-made results whose answers are computed by
hand here (no training)."""

import math

import pytest

from mnist_jax import results
from mnist_jax.config import Variant


def variant(name: str, val: list[float], test: list[float], *, diverged=(), seeds=None):
    seeds = seeds or list(range(len(val)))
    return results.VariantResult(Variant(name), tuple(
        results.Run(s, {"accuracy": [0.5, 0.9], "val_accuracy": [0.5, v]},
                    {"accuracy": t, "loss": 0.1}) for s, v, t in zip(seeds, val, test,
                                                                      strict=True)),
        tuple(diverged))


def test_pairing_matters():
    """Seed by seed, a beats b by 0.0010, 0.0011, 0.0012: shown real (mean 0.0011, sd 0.0001,
    half-width t(2) 4.3027 x 0.0001 / sqrt 3 = 0.000248). The seeds' own spread (0.01) is
    ten times the difference: paired with another seed's b, the same numbers show nothing."""
    a = variant("a", [0.9] * 3, [0.9710, 0.9811, 0.9922])
    b = variant("b", [0.9] * 3, [0.9700, 0.9800, 0.9910])
    c = results.compare(a, b)
    half = 4.3027 * 0.0001 / math.sqrt(3)
    assert (c.a, c.b, c.metric, c.n) == ("a", "b", "test_accuracy", 3)
    assert c.mean == pytest.approx(0.0011, abs=1e-12)
    assert c.ci95_low == pytest.approx(0.0011 - half, abs=1e-12)
    assert c.ci95_high == pytest.approx(0.0011 + half, abs=1e-12)
    assert c.significant is True
    shuffled = variant("b", [0.9] * 3, [0.9910, 0.9700, 0.9800])  # other seeds' numbers
    assert results.compare(a, shuffled).significant is False


def test_a_real_difference_either_way_and_noise():
    """Shown real when the interval excludes 0, whichever side it lies on."""
    up = variant("up", [0.9] * 4, [0.983, 0.982, 0.984, 0.983])
    base = variant("base", [0.9] * 4, [0.980, 0.980, 0.981, 0.980])
    noisy = variant("noisy", [0.9] * 4, [0.985, 0.975, 0.986, 0.976])
    assert results.compare(up, base).significant is True
    assert results.compare(up, base).mean == pytest.approx(0.00275)
    down = results.compare(base, up)
    assert down.significant is True and down.mean == pytest.approx(-0.00275)
    assert down.ci95_high < 0
    assert results.compare(noisy, base).significant is False


def test_one_seed_gives_a_difference_but_no_interval():
    c = results.compare(variant("a", [0.9], [0.98]), variant("b", [0.9], [0.97]))
    assert c.n == 1 and c.mean == pytest.approx(0.01)
    assert (c.ci95_low, c.ci95_high, c.significant) == (None, None, None)


def test_pairs_need_the_same_seeds():
    with pytest.raises(ValueError, match="other seeds"):
        results.compare(variant("a", [0.9], [0.98], seeds=[0]),
                        variant("b", [0.9], [0.97], seeds=[1]))


def test_selection_is_on_validation_and_skips_the_diverged():
    """'a' has the best test accuracy, 'b' the best validation, 'c' diverged."""
    a = variant("a", [0.970, 0.972], [0.990, 0.992])
    b = variant("b", [0.975, 0.977], [0.970, 0.971])
    c = variant("c", [0.999, 0.999], [0.999, 0.999], diverged=[{"seed": 1}])
    s = results.select([a, b, c])
    assert (s.chosen, s.on, s.ranking, s.excluded) == ("b", "val_accuracy", ("b", "a"), ("c",))
    assert s.values == {"a": pytest.approx(0.971), "b": pytest.approx(0.976)}
    assert "2 seed(s)" in s.how and "test set is not used" in s.how


def test_without_validation_the_choice_is_on_training_accuracy():
    def no_val(name, train, test):
        return results.VariantResult(Variant(name), (results.Run(
            0, {"accuracy": [train]}, {"accuracy": test, "loss": 0.1}),))

    s = results.select([no_val("a", 0.95, 0.99), no_val("b", 0.96, 0.90)])
    assert (s.chosen, s.on) == ("b", "accuracy")


def test_every_variant_diverged_is_an_error():
    with pytest.raises(ValueError, match="every variant diverged"):
        results.select([variant("a", [0.9], [0.9], diverged=[{"seed": 0}])])


def test_statistics_over_seeds_by_hand():
    v = variant("a", [0.96, 0.98], [0.97, 0.99])
    st = v.stats()
    assert st["val_accuracy"]["mean"] == pytest.approx(0.97)
    assert st["val_accuracy"]["std"] == pytest.approx(math.sqrt(2) * 0.01)
    assert st["test_accuracy"] == {"n": 2, "mean": pytest.approx(0.98),
                                   "std": pytest.approx(math.sqrt(2) * 0.01),
                                   "min": 0.97, "max": 0.99}
    assert v.mean_history()["val_accuracy"] == pytest.approx([0.5, 0.97])
    # A metric some seed has no finite value of is left out, not averaged as NaN.
    broken = results.VariantResult(Variant("b"), (
        results.Run(0, {"accuracy": [None]}, {"accuracy": 0.9, "loss": 0.1}),))
    assert "accuracy" not in broken.stats()


def test_json_round_trip():
    v = variant("a", [0.96, 0.98], [0.97, 0.99])
    back = results.VariantResult.from_json(
        {"variant": {"name": "a", "l2": 0.0, "l2_layers": [], "dropout": 0.0,
                     "dropout_layers": [], "learning_rate": None},
         "runs": [r.to_json() for r in v.runs]})
    assert back == v
