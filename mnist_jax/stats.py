"""Statistics over seeds: mean, standard deviation, and paired confidence intervals.

Variants trained with the same seed share initial weights, batch order and dropout noise, so
the difference between two variants is measured seed by seed (a paired design) and its
interval uses Student's t on those per-seed differences.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# Two-sided 95% quantiles of Student's t, t_{0.975}(df), df = 1..30.
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
         2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
         2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)


def t_quantile_975(df: int) -> float:
    """t_{0.975}(df): a table to 30 degrees of freedom, then the Cornish-Fisher expansion
    around z = 1.959964 (error below 1e-4 there)."""
    if df < 1:
        raise ValueError("need at least one degree of freedom")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959963985
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def summarize(values: Sequence[float]) -> dict[str, float | int | None]:
    """n, mean, sample standard deviation (None for one value), min and max."""
    x = np.asarray(values, np.float64)
    return {"n": len(x), "mean": float(x.mean()),
            "std": float(x.std(ddof=1)) if len(x) > 1 else None,
            "min": float(x.min()), "max": float(x.max())}


def mean_ci95(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95% Student-t interval (None for a single value)."""
    x = np.asarray(values, np.float64)
    if len(x) < 2:
        return float(x.mean()), None
    return float(x.mean()), t_quantile_975(len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, float | int | None]:
    """Mean of a - b over paired runs with its 95% t-interval (None for fewer than 2 pairs).

    `significant` is True when the interval excludes 0.
    """
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    mean, half = mean_ci95(d)
    out: dict[str, float | int | None] = {"n": len(d), "mean": mean, "ci95_low": None,
                                          "ci95_high": None, "significant": None, "p": None}
    if half is not None:
        out.update(ci95_low=mean - half, ci95_high=mean + half,
                   significant=bool(half < abs(mean)), p=paired_p_value(d))
    return out


def paired_p_value(d: Sequence[float]) -> float:
    """Two-sided p-value of the paired t-test on the differences `d` (at least 2): 0 where
    they are equal and not 0, 1 where all are 0."""
    from scipy import stats as st

    d = np.asarray(d, np.float64)
    sd = d.std(ddof=1)
    if sd == 0:
        return 1.0 if d[0] == 0 else 0.0
    t = abs(d.mean()) / (sd / math.sqrt(len(d)))
    return float(2 * st.t.sf(t, len(d) - 1))


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of a family of p-values (None, for no test, stays None and
    does not count): rejecting where the adjusted value is below alpha keeps the chance of
    any false 'real' at most alpha over the whole family."""
    tested = [(p, i) for i, p in enumerate(p_values) if p is not None]
    if any(not 0 <= p <= 1 for p, _ in tested):  # NaN too: it would reorder the family
        raise ValueError(f"p-values must lie in [0, 1]: {list(p_values)}")
    out: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(tested)):
        running = max(running, min(1.0, (len(tested) - rank) * p))
        out[i] = running
    return out
