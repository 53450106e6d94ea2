"""Results as values: each model's run, each variant's runs and statistics over seeds, the
choice made on validation, and paired comparisons on test. Experiments and sweeps both build
these and choose and compare with the same functions; `to_json` is what metrics.json holds.

Models trained with the same seed share initial weights, batch order and dropout noise, so
two variants are compared seed by seed (a paired design, `stats.paired_difference`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mnist_jax import stats
from mnist_jax.config import Variant

HISTORY_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy", "cross_entropy", "penalty",
                "val_cross_entropy")
History = Mapping[str, Sequence[float | None]]


def finite_or_none(x) -> float | None:
    """A float, or None where it is not finite (a diverged model's: JSON has no NaN)."""
    x = float(x)
    return x if math.isfinite(x) else None


def variant_from_json(d: Mapping[str, Any]) -> Variant:
    """A Variant from its recorded dict (lists back to tuples)."""
    return Variant(**{**d, "l2_layers": tuple(d["l2_layers"]),
                      "dropout_layers": tuple(d["dropout_layers"])})


@dataclasses.dataclass(frozen=True)
class Run:
    """One trained model: a variant with one seed. `test` and `train_full` hold loss,
    cross_entropy, penalty and accuracy (None where a diverged model's are not finite)."""

    seed: int
    history: History
    test: Mapping[str, float | None]
    train_full: Mapping[str, float | None] | None = None

    def final(self, key: str) -> float | None:
        """The last epoch's value of a history key."""
        return self.history[key][-1]

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Run:
        return cls(d["seed"], d["history"], d["test"], d.get("train_full"))

    def to_json(self) -> dict[str, Any]:
        out = {"seed": self.seed, "history": {k: list(v) for k, v in self.history.items()},
               "test": dict(self.test)}
        if self.train_full is not None:
            out["train_full"] = dict(self.train_full)
        return out


@dataclasses.dataclass(frozen=True)
class VariantResult:
    """A variant's runs, one per seed in the stack's order, and the models that diverged
    (each {"variant", "seed", "epoch", "step", "loss"})."""

    variant: Variant
    runs: tuple[Run, ...]
    diverged: tuple[Mapping[str, Any], ...] = ()

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> VariantResult:
        """From metrics.json's (or a sweep chunk's) record of a variant."""
        return cls(variant_from_json(d["variant"]), tuple(Run.from_json(r) for r in d["runs"]),
                   tuple(d.get("diverged", ())))

    @property
    def name(self) -> str:
        return self.variant.name

    def values(self, metric: str) -> list[float | None]:
        """Per seed: a final-epoch history key, or 'test_<key>' / 'train_full_<key>'."""
        for prefix, field in (("test_", "test"), ("train_full_", "train_full")):
            if metric.startswith(prefix):
                return [getattr(r, field)[metric[len(prefix):]] for r in self.runs]
        return [r.final(metric) for r in self.runs]

    def stats(self) -> dict[str, dict[str, float | int | None]]:
        """`stats.summarize` over seeds of every final-epoch history key, then of the test
        and full-training loss and accuracy; a metric some seed has no finite value of is
        left out."""
        keys = list(self.runs[0].history)
        keys += ["test_loss", "test_accuracy"]
        if self.runs[0].train_full is not None:
            keys += ["train_full_loss", "train_full_accuracy"]
        out = {}
        for key in keys:
            values = self.values(key)
            if None not in values:
                out[key] = stats.summarize(values)
        return out

    def mean_history(self) -> dict[str, list[float]]:
        """Each history key averaged over seeds, epoch by epoch."""
        return {key: np.mean([r.history[key] for r in self.runs], axis=0).tolist()
                for key in self.runs[0].history}

    def mean(self, field: str) -> dict[str, float]:
        """The seeds' mean of each of 'test' or 'train_full's metrics."""
        first = getattr(self.runs[0], field)
        return {k: float(np.mean([getattr(r, field)[k] for r in self.runs])) for k in first}


@dataclasses.dataclass(frozen=True)
class Selection:
    """The choice: the candidate with the highest mean final-epoch value of `on` over seeds
    (`val_accuracy`, or `accuracy` without a validation set); the test set is never used.
    `values` holds every candidate's mean, `ranking` the candidates best first, `excluded`
    the variants that diverged (never candidates)."""

    chosen: str
    on: str
    values: Mapping[str, float]
    ranking: tuple[str, ...]
    excluded: tuple[str, ...]
    n_seeds: int

    @property
    def how(self) -> str:
        return (f"highest mean final-epoch {self.on} over {self.n_seeds} seed(s); the test set "
                "is not used")


def select(results: Sequence[VariantResult]) -> Selection:
    """The best variant on validation (see Selection). Raises ValueError when every variant
    diverged."""
    with_val = any("val_accuracy" in r.runs[0].history for r in results)
    on = "val_accuracy" if with_val else "accuracy"
    values = {}
    for r in results:
        finals = r.values(on)
        if not r.diverged and finals and None not in finals:
            values[r.name] = float(np.mean(np.asarray(finals, np.float64)))
    if not values:
        raise ValueError("every variant diverged: lower the learning rate (--lr)")
    ranking = tuple(sorted(values, key=values.get, reverse=True))
    return Selection(max(values, key=values.get), on, values, ranking,
                     tuple(r.name for r in results if r.diverged), len(results[0].runs))


@dataclasses.dataclass(frozen=True)
class Comparison:
    """a - b in `metric` over paired seeds: the mean difference and its 95% t-interval (None
    for one seed); `significant` when the interval excludes 0; `p` the paired t-test's, and
    `p_holm` that p adjusted over the family of comparisons reported with it (`holm`)."""

    a: str
    b: str
    metric: str
    n: int
    mean: float
    ci95_low: float | None
    ci95_high: float | None
    significant: bool | None
    p: float | None = None
    p_holm: float | None = None

    @property
    def real(self) -> bool | None:
        """Whether the difference is shown real at 5%, corrected for the family (Holm)."""
        return None if self.p_holm is None else self.p_holm < 0.05

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "real": self.real}


def holm(comparisons: Sequence[Comparison]) -> list[Comparison]:
    """The comparisons, each with its p-value adjusted for all of them (Holm)."""
    adjusted = stats.holm([c.p for c in comparisons])
    return [dataclasses.replace(c, p_holm=p) for c, p in zip(comparisons, adjusted, strict=True)]


def compare(a: VariantResult, b: VariantResult, metric: str = "test_accuracy") -> Comparison:
    """Paired difference a - b in `metric`, seed by seed (both trained on the same seeds)."""
    if [r.seed for r in a.runs] != [r.seed for r in b.runs]:
        raise ValueError(f"{a.name} and {b.name} were trained on other seeds: no pairs")
    d = stats.paired_difference(a.values(metric), b.values(metric))
    return Comparison(a.name, b.name, metric, **d)


def compare_pairs(results: Sequence[VariantResult],
                  metric: str = "test_accuracy") -> list[Comparison]:
    """Every pair, in order: (0, 1), (0, 2), ..., (1, 2), ..., Holm-adjusted as one family."""
    return holm([compare(a, b, metric) for i, a in enumerate(results) for b in results[i + 1:]])
