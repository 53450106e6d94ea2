"""Statistics over seeds against hand computation and published t tables."""

import math

import pytest

from mnist_jax import stats


@pytest.mark.parametrize("df, t", [(1, 12.7062), (4, 2.7764), (10, 2.2281), (30, 2.0423),
                                   (40, 2.0211), (60, 2.0003), (120, 1.9799), (1000, 1.9623)])
def test_t_quantiles_match_tables(df, t):
    assert stats.t_quantile_975(df) == pytest.approx(t, abs=2e-4)


def test_summarize():
    s = stats.summarize([0.97, 0.98, 0.99])
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.98)
    assert s["std"] == pytest.approx(0.01)
    assert stats.summarize([0.5])["std"] is None


def test_paired_difference_by_hand():
    a = [0.980, 0.978, 0.982, 0.979]
    b = [0.975, 0.976, 0.977, 0.973]
    d = [x - y for x, y in zip(a, b, strict=True)]
    mean = sum(d) / 4
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 3)
    half = 3.1824 * sd / 2
    out = stats.paired_difference(a, b)
    assert out["mean"] == pytest.approx(mean)
    assert out["ci95_low"] == pytest.approx(mean - half, abs=1e-6)
    assert out["ci95_high"] == pytest.approx(mean + half, abs=1e-6)
    assert out["significant"] is True
    noisy = stats.paired_difference([0.98, 0.97, 0.99], [0.975, 0.985, 0.98])
    assert noisy["significant"] is False
    assert stats.paired_difference([0.9], [0.8])["ci95_low"] is None


def test_paired_p_value_by_a_published_table():
    # d = 1, 2, 3: t = 2 / (1 / sqrt(3)) = 3.4641 on 2 df; two-sided p = 0.0742.
    assert stats.paired_p_value([1.0, 2.0, 3.0]) == pytest.approx(0.07418, abs=1e-4)
    assert stats.paired_difference([3.0, 4.0, 5.0], [2.0, 2.0, 2.0])["p"] == pytest.approx(
        0.07418, abs=1e-4)
    assert stats.paired_p_value([0.0, 0.0]) == 1.0 and stats.paired_p_value([1.0, 1.0]) == 0.0


def test_holm_by_hand():
    # Sorted 0.01, 0.03, 0.04 times 3, 2, 1: 0.03, 0.06, 0.04 -> kept monotone: 0.06.
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.5, None, 0.01]) == [pytest.approx(0.5), None, pytest.approx(0.02)]
    assert stats.holm([0.9, 0.8]) == [1.0, 1.0]  # capped at 1


def test_holm_refuses_what_is_no_p_value():
    with pytest.raises(ValueError, match="must lie in"):
        stats.holm([0.01, float("nan"), 0.02])
