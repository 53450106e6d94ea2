"""Figures from plain arrays and histories. Each function returns a matplotlib Figure (shown
inline by notebooks); `save` writes it as a PNG atomically. No pyplot, no global state."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle as _Rectangle
from matplotlib.ticker import MaxNLocator

from mnist_jax import files
from mnist_jax.stats import mean_ci95

History = Mapping[str, Sequence[float]]
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2",
          "#7f7f7f")


DPI = 110


def png(fig: Figure, dpi: int = DPI) -> bytes:
    """`fig` as PNG bytes."""
    buffer = io.BytesIO()
    # Every figure lays itself out (constrained layout); a "tight" bounding box would draw it
    # a second time.
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def save(fig: Figure, path: str | os.PathLike, dpi: int = DPI) -> None:
    """Writes `fig` as a PNG atomically (a temporary file, then a rename)."""
    files.write_bytes(path, png(fig, dpi))


def label_distribution(train_labels: np.ndarray, test_labels: np.ndarray) -> Figure:
    """Counts of each digit in train and test, side by side, each bar labelled."""
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    for ax, labels, name, color in zip(fig.subplots(1, 2), (train_labels, test_labels),
                                       ("train", "test"), COLORS[:2], strict=True):
        counts = np.bincount(labels, minlength=10)
        bars = ax.bar(np.arange(10), counts, color=color)
        ax.bar_label(bars, fontsize=7)
        ax.set(title=f"{name}: {len(labels):,} images", xlabel="digit", ylabel="count",
               xticks=np.arange(10))
        ax.set_ylim(0, counts.max() * 1.12)
    fig.suptitle("Label distribution")
    return fig


def digit_grid(images: np.ndarray, labels: np.ndarray, *, titles: Sequence[str] | None = None,
               rows: int = 5, cols: int = 5, title: str = "") -> Figure:
    """The first rows * cols of `images` (N, 28, 28) in a grid, each captioned by its label (or
    `titles`). One image and one axes for the whole grid: 25 axes draw far slower."""
    n = min(rows * cols, len(images))
    height, width = images.shape[1:3]
    head, gap = height // 3, 2  # room for the caption above each digit; space between columns
    cell_h, cell_w = head + height + gap, width + gap
    canvas = np.zeros((rows * cell_h, cols * cell_w), images.dtype)
    fig = Figure(figsize=(1.5 * cols, 1.7 * rows), layout="constrained")
    ax = fig.subplots()
    for i in range(n):
        r, c = divmod(i, cols)
        top, left = r * cell_h + head, c * cell_w
        canvas[top:top + height, left:left + width] = images[i]
        caption = titles[i] if titles is not None else f"label {labels[i]}"
        ax.text(left + width / 2, top - 1, caption, ha="center", va="bottom", fontsize=9)
    ax.imshow(canvas, cmap="gray_r", vmin=0, vmax=255, interpolation="nearest")
    ax.axis("off")
    if title:
        fig.suptitle(title)
    return fig


def random_digits(images: np.ndarray, labels: np.ndarray, seed: int = 0, n: int = 25) -> Figure:
    """`n` digits drawn without replacement by an explicitly seeded generator."""
    idx = np.random.default_rng(seed).choice(len(images), size=n, replace=False)
    return digit_grid(images[idx], labels[idx], title=f"{n} random training digits (seed {seed})")


# Up to this many epochs a curve marks each epoch's point: one point alone draws nothing.
MARKERS_UP_TO = 12


def _band(ax, x, runs: np.ndarray, label: str, color: str, style: str = "-") -> None:
    """Mean curve over runs (rows), with a +-1 standard deviation band when there are several;
    each point marked when there are few."""
    mean = runs.mean(axis=0)
    marker = "o" if len(x) <= MARKERS_UP_TO else None
    ax.plot(x, mean, style, color=color, label=label, marker=marker, markersize=4)
    if len(runs) > 1:
        std = runs.std(axis=0, ddof=1)
        ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)


def _epoch_axis(ax, n_epochs: int) -> None:
    """Whole epochs on the x axis, 1..n with half an epoch of margin (a lone epoch too)."""
    ax.set_xlim(0.5, n_epochs + 0.5)
    if n_epochs <= MARKERS_UP_TO:  # MaxNLocator falls back to fractions below two integers
        ax.set_xticks(range(1, n_epochs + 1))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)


def _loss_title(runs: Sequence[History]) -> str:
    """What a history's loss is: the cross-entropy, plus the L2 penalty where there is one."""
    penalised = any(max(r.get("penalty", [0.0])) > 0 for r in runs)
    return "loss (cross-entropy + L2 penalty)" if penalised else "loss (cross-entropy)"


def history_curves(histories: History | Sequence[History], title: str = "", *,
                   share_with: Sequence[History] = ()) -> Figure:
    """Loss and accuracy (%) per epoch, train vs validation; several runs give mean and band.
    The y-axes hold the values of `share_with` too (the other variants' histories), so that
    figures meant to sit side by side share their scales."""
    runs = [histories] if isinstance(histories, Mapping) else list(histories)
    fig = Figure(figsize=(11, 4), layout="constrained")
    n_epochs = len(runs[0]["loss"])
    epochs = np.arange(1, n_epochs + 1)
    for ax, metric in zip(fig.subplots(1, 2), ("loss", "accuracy"), strict=True):
        scale = 100.0 if metric == "accuracy" else 1.0
        _band(ax, epochs, scale * np.array([r[metric] for r in runs]), "train", COLORS[0])
        if f"val_{metric}" in runs[0]:
            _band(ax, epochs, scale * np.array([r[f"val_{metric}"] for r in runs]),
                  "validation", COLORS[1], "--")
        name = _loss_title(runs) if metric == "loss" else "accuracy (%)"
        ax.set(ylabel=name, title=name)
        if share_with:
            ax.set_ylim(*shared_limits([*runs, *share_with])[metric])
        _epoch_axis(ax, n_epochs)
        ax.legend()
    suffix = f" (mean and ±1 sd over {len(runs)} seeds)" if len(runs) > 1 else ""
    fig.suptitle(title + suffix)
    return fig


def shared_limits(histories: Sequence[History], margin: float = 0.04
                  ) -> dict[str, tuple[float, float]]:
    """y-limits of loss and accuracy (%) holding every train and validation value of every
    history (non-finite ones left out), for `history_curves` figures on one scale."""
    out = {}
    for metric, scale in (("loss", 1.0), ("accuracy", 100.0)):
        values = np.array([scale * v for h in histories for k in (metric, f"val_{metric}")
                           for v in h.get(k, []) if v is not None], np.float64)
        values = values[np.isfinite(values)]
        low, high = (values.min(), values.max()) if values.size else (0.0, 1.0)
        pad = margin * max(high - low, 1e-6)
        out[metric] = (low - pad, high + pad)
    return out


def compare_variants(histories: Mapping[str, Sequence[History]],
                     test_accuracy: Mapping[str, Sequence[float]]) -> Figure:
    """Validation cross-entropy and accuracy of every variant overlaid, and test accuracy per
    variant as a point with its 95% interval over seeds (each seed a small dot), in %."""
    fig = Figure(figsize=(15, 4.2), layout="constrained")
    ax_loss, ax_acc, ax_test = fig.subplots(1, 3)
    names = list(histories)
    first = histories[names[0]][0]
    which = "validation" if "val_loss" in first else "training"
    prefix = "val_" if which == "validation" else ""
    # The cross-entropy alone: with the penalty in, the L2 variants look worse for a reason
    # the accuracy panel does not share.
    loss_key = f"{prefix}cross_entropy" if f"{prefix}cross_entropy" in first else f"{prefix}loss"
    n_epochs = len(first["loss"])
    epochs = np.arange(1, n_epochs + 1)
    for i, name in enumerate(names):
        runs = histories[name]
        color = COLORS[i % len(COLORS)]
        _band(ax_loss, epochs, np.array([r[loss_key] for r in runs]), name, color)
        _band(ax_acc, epochs, 100 * np.array([r[f"{prefix}accuracy"] for r in runs]), name,
              color)
    loss_name = "cross-entropy (no L2 penalty)" if "cross_entropy" in loss_key else "loss"
    ax_loss.set(ylabel=loss_name, title=f"{which} {loss_name}")
    ax_acc.set(ylabel="accuracy (%)", title=f"{which} accuracy (%)")
    for ax in (ax_loss, ax_acc):
        _epoch_axis(ax, n_epochs)
        ax.legend()

    counts = {len(test_accuracy[n]) for n in names}
    for i, name in enumerate(names):
        values = 100 * np.asarray(test_accuracy[name], np.float64)
        mean, half = mean_ci95(values)
        color = COLORS[i % len(COLORS)]
        ax_test.errorbar([i], [mean], yerr=None if half is None else [[half], [half]], fmt="o",
                         color=color, capsize=6, markersize=7, label=name)
        if len(values) > 1:
            ax_test.scatter(np.full(len(values), i + 0.12), values, s=10, color="black",
                            alpha=0.6, zorder=3)
        ax_test.annotate(f"{mean:.2f}%", (i, mean), xytext=(-10, 0), textcoords="offset points",
                         ha="right", va="center", fontsize=8)  # the seeds' dots are right
    # At least two points of accuracy on the axis, so a few tenths do not fill the panel.
    low, high = ax_test.get_ylim()
    middle, half_span = (low + high) / 2, max((high - low) / 2, 1.0)
    ax_test.set_ylim(middle - half_span, middle + half_span)
    n = counts.pop() if len(counts) == 1 else None
    if n == 1:
        what = "one seed: no interval"
    else:
        what = f"mean and 95% interval, n = {n} seeds" if n else "mean and 95% interval"
    ax_test.set(xticks=range(len(names)), xticklabels=names, ylabel="test accuracy (%)",
                title=f"test accuracy ({what})", xlim=(-0.5, len(names) - 0.5))
    ax_test.grid(alpha=0.3, axis="y")
    return fig


def confusion_matrix(true: np.ndarray, predicted: np.ndarray, num_classes: int = 10,
                     ) -> np.ndarray:
    """(num_classes, num_classes) counts: rows are true labels, columns predictions."""
    return np.bincount(true * num_classes + predicted,
                       minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def confusion(true: np.ndarray, predicted: np.ndarray, title: str = "") -> Figure:
    """The confusion matrix as a heatmap with every count written in its cell."""
    matrix = confusion_matrix(true, predicted)
    fig = Figure(figsize=(6.5, 5.5), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(np.log1p(matrix), cmap="Blues")
    for (i, j), count in np.ndenumerate(matrix):
        color = "white" if matrix[i, j] > matrix.max() / 2 else "black"
        ax.text(j, i, str(count), ha="center", va="center", fontsize=7, color=color)
    ax.set(xticks=range(10), yticks=range(10), xlabel="predicted", ylabel="true",
           title=title or f"confusion matrix (accuracy {np.trace(matrix) / matrix.sum():.2%})")
    fig.colorbar(im, ax=ax, label="log(1 + count)")
    return fig


def misclassified(images: np.ndarray, true: np.ndarray, predicted: np.ndarray,
                  title: str = "", n: int = 25) -> Figure:
    """The first `n` misclassified test digits, titled 'true -> predicted'."""
    wrong = np.flatnonzero(true != predicted)[:n]
    titles = [f"{true[i]} → {predicted[i]}" for i in wrong]
    cols = 5
    rows = max(1, -(-len(wrong) // cols))
    return digit_grid(images[wrong], true[wrong], titles=titles, rows=rows, cols=cols,
                      title=title or f"misclassified: {int((true != predicted).sum())} of "
                                     f"{len(true)} (first {len(wrong)} shown, true → predicted)")


def sweep_heatmap(l2_values: Sequence[float], dropout_values: Sequence[float],
                  mean_val: np.ndarray, *, n_seeds: int, chosen: tuple[int, int] | None = None,
                  marks: Mapping[str, tuple[int, int]] | None = None, title: str = "",
                  centre: float | None = None, half_widths: np.ndarray | None = None,
                  resolution: float = 0.0) -> Figure:
    """Mean validation accuracy (%) over an L2 x dropout grid, `mean_val[i_l2, i_dropout]`
    (NaN: diverged or not trained), every cell annotated with its 95% interval's half-width
    (`half_widths`, same shape) where there are several seeds; the chosen cell framed, the
    cells of `marks` (the original variants) labelled with their names.

    Colours are differences from `centre` (the baseline's mean), diverging, and span at
    least the widest interval either way, and at least `resolution` (a difference the
    validation set can tell from chance, as a fraction): differences within the noise stay
    pale rather than spread over the whole colour scale.
    """
    values = np.asarray(mean_val, np.float64).T * 100  # rows: dropout, columns: L2
    half = None if half_widths is None else np.asarray(half_widths, np.float64).T * 100
    fig = Figure(figsize=(1.5 * len(l2_values) + 2.8, 0.8 * len(dropout_values) + 1.8),
                 layout="constrained")
    ax = fig.subplots()
    finite = values[np.isfinite(values)]
    mid = (centre * 100 if centre is not None else
           float(np.median(finite)) if finite.size else 0.0)
    spread = float(np.max(np.abs(finite - mid))) if finite.size else 1.0
    if half is not None and np.isfinite(half).any():
        spread = max(spread, float(np.nanmax(half)))
    spread = max(spread, 100 * resolution, 1e-6)
    cmap = matplotlib.colormaps["RdBu"].with_extremes(bad="#dddddd")
    image = ax.imshow(np.ma.masked_invalid(values - mid), cmap=cmap, origin="lower",
                      vmin=-spread, vmax=spread, aspect="auto")
    what = "baseline" if centre is not None else "median"
    fig.colorbar(image, ax=ax, format="%+.2f", label=f"points from the {what} ({mid:.2f}%)")
    for (r, c), value in np.ndenumerate(values):
        strong = np.isfinite(value) and abs(value - mid) > 0.6 * spread
        text = "diverged"
        if np.isfinite(value):
            text = f"{value:.2f}"
            if half is not None and np.isfinite(half[r, c]):
                text += f"\n± {half[r, c]:.2f}"
        ax.text(c, r, text, ha="center", va="center", fontsize=8,
                color="white" if strong else "black")
    for name, (i, j) in (marks or {}).items():
        ax.text(i, j - 0.36, name, ha="center", va="center", fontsize=7, style="italic",
                color="#444444")
    if chosen is not None:
        i, j = chosen
        ax.add_patch(_Rectangle((i - 0.5, j - 0.5), 1, 1, fill=False, edgecolor="#2ca02c",
                                linewidth=2.5))
        ax.text(i, j + 0.36, "chosen", ha="center", va="center", fontsize=7,
                color="#2ca02c", weight="bold")
    ax.set(xticks=range(len(l2_values)), xticklabels=[f"{v:g}" for v in l2_values],
           yticks=range(len(dropout_values)), yticklabels=[f"{v:g}" for v in dropout_values],
           xlabel="L2 coefficient", ylabel="dropout rate")
    ax.set_title(title + (f"\nvalidation accuracy (%), mean ± 95% interval half-width over "
                          f"{n_seeds} seeds" if half is not None else
                          "\nvalidation accuracy (%), "
                          + ("one seed" if n_seeds == 1 else f"mean of {n_seeds} seeds")),
                 fontsize=9)
    return fig


def sweep_scatter(l2: Sequence[float], dropout: Sequence[float], learning_rate: Sequence[float],
                  mean_val: Sequence[float], *, n_seeds: int, chosen: int | None,
                  title: str = "") -> Figure:
    """Random or TPE points: L2 (log) against dropout, coloured by mean validation accuracy
    (%); beside it, accuracy against the learning rate when that varies. The chosen point is
    circled."""
    val = np.asarray(mean_val, np.float64) * 100
    ok = np.isfinite(val)
    lrs = np.asarray(learning_rate, np.float64)
    panels = 2 if len(set(lrs.tolist())) > 1 else 1
    fig = Figure(figsize=(5.2 * panels + 1, 4.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, panels))
    x = np.asarray(l2, np.float64)
    dots = axes[0].scatter(x[ok], np.asarray(dropout)[ok], c=val[ok], cmap="viridis", s=40,
                           edgecolors="none")
    axes[0].scatter(x[~ok], np.asarray(dropout)[~ok], marker="x", color="#7f7f7f",
                    label="diverged")
    if chosen is not None:  # None: the choice is not among these points
        axes[0].scatter([x[chosen]], [dropout[chosen]], s=160, facecolors="none",
                        edgecolors="#d62728", linewidths=2, label="chosen")
    axes[0].set(xscale="log", xlabel="L2 coefficient", ylabel="dropout rate", title=title)
    axes[0].legend(fontsize=8, loc="best")
    fig.colorbar(dots, ax=axes[0], label="validation accuracy (%), "
                 + (f"mean of {n_seeds} seeds" if n_seeds > 1 else "one seed"))
    if panels == 2:
        axes[1].scatter(lrs[ok], val[ok], s=30)
        if chosen is not None:
            axes[1].scatter([lrs[chosen]], [val[chosen]], s=160, facecolors="none",
                            edgecolors="#d62728", linewidths=2)
        axes[1].set(xscale="log", xlabel="learning rate",
                    ylabel="validation accuracy (%)")
    return fig


def top_curves(curves: Mapping[str, np.ndarray], *, n_seeds: int,
               references: Sequence[str] = (), chosen: str | None = None) -> Figure:
    """Validation accuracy (%) per epoch, mean over seeds, of each configuration in `curves`
    (name -> (epochs,)); the names in `references` (the original variants) dashed, the
    `chosen` one drawn thicker; the legend beside the axes, every line its own colour."""
    fig = Figure(figsize=(10, 4.6), layout="constrained")
    ax = fig.subplots()
    palette = (COLORS if len(curves) <= len(COLORS) else
               [matplotlib.colormaps["tab20"](i % 20) for i in range(len(curves))])
    n_epochs = 1
    for k, (name, curve) in enumerate(curves.items()):
        curve = np.asarray(curve, np.float64) * 100
        n_epochs = len(curve)
        epochs = np.arange(1, len(curve) + 1)
        ax.plot(epochs, curve, "--" if name in references else "-",
                color=palette[k % len(palette)],
                label=f"{name} (chosen)" if name == chosen else name,
                linewidth=3 if name == chosen else 1.5,
                marker="o" if len(curve) <= MARKERS_UP_TO else None, markersize=4)
    _epoch_axis(ax, n_epochs)
    ax.set(xlabel="epoch", ylabel="validation accuracy (%)",
           title="The best configurations (solid) and the original variants (dashed): "
                 + (f"mean of {n_seeds} seeds" if n_seeds > 1 else "one seed"))
    ax.title.set_fontsize(10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig
