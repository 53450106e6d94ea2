"""Figures: each renders and saves atomically as a readable PNG, and draws the numbers it
should (checked on the figure's own data: bar heights, points, intervals, cell texts)."""

import matplotlib.image
import numpy as np
import pytest

from mnist_jax import plots

HISTORY = {"loss": [0.5, 0.3, 0.2], "accuracy": [0.85, 0.9, 0.93],
           "val_loss": [0.4, 0.3, 0.28], "val_accuracy": [0.88, 0.91, 0.92]}


def saved(fig, path):
    plots.save(fig, path)
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0.01, "blank figure"
    assert not list(path.parent.glob(".*tmp*")), "temporary file left behind"
    return image


def captions(fig):
    return [text.get_text() for ax in fig.axes for text in ax.texts]


def test_digit_grid_places_each_image_under_its_caption():
    images = np.zeros((6, 28, 28), np.uint8)
    for i in range(6):
        images[i, i, :] = 255 - i  # a different row lit in each digit
    fig = plots.digit_grid(images, np.arange(6), rows=2, cols=3)
    canvas = fig.axes[0].get_images()[0].get_array()
    for i, text in enumerate(fig.axes[0].texts):
        x, y = text.get_position()  # the caption's bottom centre, just above the digit
        left, top = int(x - 14), int(y + 1)
        np.testing.assert_array_equal(canvas[top:top + 28, left:left + 28], images[i])
        assert text.get_text() == f"label {i}"
    assert canvas.sum() == images.astype(np.int64).sum(), "a digit drawn twice or lost"


def test_label_distribution_and_digits(mnist, tmp_path):
    fig = plots.label_distribution(mnist.train_labels, mnist.test_labels)
    for ax, labels in zip(fig.axes, (mnist.train_labels, mnist.test_labels), strict=True):
        heights = [bar.get_height() for bar in ax.patches]
        assert heights == np.bincount(labels, minlength=10).tolist()  # 5923, 6742, ...
        assert [t.get_text() for t in ax.texts] == [str(h) for h in heights]
    saved(fig, tmp_path / "l.png")
    fig = plots.random_digits(mnist.train_images, mnist.train_labels, seed=1)
    titles = captions(fig)
    assert len(titles) == 25 and all(t.startswith("label ") for t in titles)
    idx = np.random.default_rng(1).choice(len(mnist.train_images), size=25, replace=False)
    assert titles == [f"label {label}" for label in mnist.train_labels[idx]]
    assert titles == captions(plots.random_digits(mnist.train_images, mnist.train_labels, seed=1))
    saved(fig, tmp_path / "d.png")


def test_history_curves_one_run_and_several(tmp_path):
    saved(plots.history_curves(HISTORY, title="baseline"), tmp_path / "one.png")
    shifted = {k: [x + 0.01 for x in v] for k, v in HISTORY.items()}
    fig = plots.history_curves([HISTORY, shifted], title="baseline")
    assert "2 seeds" in fig.texts[0].get_text()
    saved(fig, tmp_path / "two.png")


def test_comparison_shows_test_accuracy_as_points_with_95_intervals_in_percent(tmp_path):
    """Points at the mean with Student-t intervals over seeds (n stated), an axis in %, no
    bars cut off at 96%; the loss panel plots the cross-entropy without the penalty."""
    runs = {"a": [0.970, 0.975, 0.972], "b": [0.980, 0.981, 0.979]}
    penalised = {**HISTORY, "val_cross_entropy": [0.3, 0.2, 0.18], "penalty": [0.1] * 3}
    fig = plots.compare_variants({"a": [penalised] * 3, "b": [penalised] * 3}, runs)
    ax_loss, ax_acc, ax_test = fig.axes
    assert "cross-entropy" in ax_loss.get_title() and "%" in ax_acc.get_ylabel()
    np.testing.assert_allclose(ax_loss.lines[0].get_ydata(), [0.3, 0.2, 0.18])
    np.testing.assert_allclose(ax_acc.lines[0].get_ydata(), [88, 91, 92])
    assert ax_test.get_ylabel() == "test accuracy (%)" and "n = 3 seeds" in ax_test.get_title()
    assert not ax_test.patches, "bars"
    low, high = ax_test.get_ylim()
    assert high - low >= 2.0 and low < 97.0 and high > 98.1  # no 0.3-point axis
    for container, name in zip(ax_test.containers, runs, strict=True):
        values = 100 * np.asarray(runs[name])
        half = 4.3027 * values.std(ddof=1) / np.sqrt(3)  # t_0.975(2) = 4.3027
        (point,), (bar,) = container.lines[0].get_ydata(), container.lines[2]
        assert point == pytest.approx(values.mean())
        np.testing.assert_allclose(bar.get_segments()[0][:, 1],
                                   [values.mean() - half, values.mean() + half])
    saved(fig, tmp_path / "c.png")
    one = plots.compare_variants({"a": [HISTORY], "b": [HISTORY]}, {"a": [0.97], "b": [0.98]})
    assert "one seed: no interval" in one.axes[2].get_title()
    assert one.axes[2].containers[0].lines[0].get_ydata()[0] == pytest.approx(97.0)
    saved(one, tmp_path / "c1.png")


def test_a_one_epoch_run_draws_visible_points_on_whole_epochs(tmp_path):
    """A single point without a marker draws nothing, and the axis read 0.945 ... 1.050."""
    one = {k: v[:1] for k, v in HISTORY.items()}
    for fig in (plots.history_curves(one),
                plots.compare_variants({"a": [one], "b": [one]}, {"a": [0.9], "b": [0.91]})):
        for ax in fig.axes[:2]:
            assert ax.lines and all(line.get_marker() == "o" for line in ax.lines)
            assert ax.get_xlim() == (0.5, 1.5)
            ticks = [t for t in ax.get_xticks() if 0.5 <= t <= 1.5]
            assert ticks == [1.0]
    long = {k: v * 10 for k, v in HISTORY.items()}  # 30 epochs: lines without markers
    assert plots.history_curves(long).axes[0].lines[0].get_marker() in (None, "None", "")


def test_curves_say_what_their_loss_is():
    assert plots.history_curves(HISTORY).axes[0].get_title() == "loss (cross-entropy)"
    with_l2 = {**HISTORY, "penalty": [0.2, 0.15, 0.1]}
    assert plots.history_curves(with_l2).axes[0].get_title() == \
        "loss (cross-entropy + L2 penalty)"


def test_confusion_matrix_counts():
    true = np.array([0, 0, 1, 2, 2, 2, 9])
    pred = np.array([0, 1, 1, 2, 0, 2, 9])
    expected = np.zeros((10, 10), int)
    for t, p in zip(true, pred, strict=True):
        expected[t, p] += 1
    np.testing.assert_array_equal(plots.confusion_matrix(true, pred), expected)


def test_confusion_and_misclassified_figures(mnist, tmp_path):
    true = mnist.test_labels[:200].astype(np.int64)
    pred = true.copy()
    pred[::7] = (pred[::7] + 1) % 10
    fig = plots.confusion(true, pred)
    counts = np.array([int(t.get_text()) for t in fig.axes[0].texts]).reshape(10, 10)
    np.testing.assert_array_equal(counts, plots.confusion_matrix(true, pred))
    assert counts.sum() == 200 and np.trace(counts) == 200 - len(pred[::7])
    saved(fig, tmp_path / "cm.png")
    fig = plots.misclassified(mnist.test_images[:200], true, pred)
    titles = captions(fig)
    assert titles[0] == f"{true[0]} → {pred[0]}" and len(titles) == 25
    saved(fig, tmp_path / "mis.png")


def test_failed_save_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "fig.png"
    saved(plots.history_curves(HISTORY), path)
    before = path.read_bytes()
    fig = plots.history_curves(HISTORY)

    def broken(target, *args, **kwargs):  # half a PNG into wherever savefig writes
        if hasattr(target, "write"):
            target.write(b"half a png")
        else:
            with open(target, "wb") as f:
                f.write(b"half a png")
        raise OSError("disk full")

    monkeypatch.setattr(fig, "savefig", broken)
    with pytest.raises(OSError, match="disk full"):
        plots.save(fig, path)
    assert path.read_bytes() == before
    assert not list(tmp_path.glob(".*tmp*"))


def test_figures_drawn_by_worker_processes_are_the_figures_drawn_here(tmp_path):
    """The renderer's workers return PNG bytes equal to drawing in this process; nothing is
    written before `finish`, which writes each to its own path and re-raises a failure."""
    from mnist_jax.render import Renderer

    labels = np.arange(100) % 10
    history = {"loss": [1.0, 0.5], "accuracy": [0.8, 0.9]}
    with Renderer(workers=2) as workers, Renderer(workers=0) as here:
        for r, name in ((workers, "w"), (here, "h")):
            r.draw(tmp_path / name / "a.png", "label_distribution", labels, labels[:50])
            r.draw(tmp_path / name / "b.png", "history_curves", [history], title="x")
        assert workers.pool is not None and not (tmp_path / "w").exists()
        workers.finish()
        here.finish()
        for png in ("a.png", "b.png"):
            assert (tmp_path / "w" / png).read_bytes() == (tmp_path / "h" / png).read_bytes()
        assert (tmp_path / "w" / "a.png").read_bytes() != (tmp_path / "w" / "b.png").read_bytes()
        workers.draw(tmp_path / "w" / "c.png", "history_curves", "not a history")
        with pytest.raises((TypeError, AttributeError, KeyError, ValueError)):
            workers.finish()


HOLD_RENDERER = """
import sys, time
from mnist_jax.render import Renderer
r = Renderer(workers=2)
r.draw("/nonexistent/never.png", "history_curves", [{"loss": [1.0]}])
time.sleep(0.5)
print(" ".join(str(p) for p in r.pool._processes), flush=True)
time.sleep(120)
"""


def test_a_killed_main_process_leaves_no_renderer_behind():
    """SIGKILL gives the main process no chance to stop its workers: they notice and exit,
    and hold none of its output pipes meanwhile (a caller waiting on them would hang)."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    process = subprocess.Popen([sys.executable, "-c", HOLD_RENDERER], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    workers = [int(p) for p in process.stdout.readline().split()]
    assert len(workers) == 2
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=10)  # no worker keeps the pipes open
    def running(pid):  # a zombie (exited, not yet reaped by its parent) does not count
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 5
    while any(running(p) for p in workers):
        assert time.monotonic() < deadline, "a worker outlived the main process"
        time.sleep(0.1)


def test_figure_workers_run_below_the_main_process():
    """The workers yield the cores to the compiler and the evaluation (os.nice)."""
    import os

    from mnist_jax.render import NICENESS, Renderer

    with Renderer(workers=1) as r:
        assert r.pool is not None
        assert r.pool.submit(os.nice, 0).result() == min(19, os.nice(0) + NICENESS)


def test_curves_meant_side_by_side_share_their_scales():
    low = {"loss": [0.5, 0.1], "val_loss": [0.4, 0.3], "accuracy": [0.9, 0.95],
           "val_accuracy": [0.91, 0.93]}
    high = {"loss": [2.0, 1.5], "val_loss": [1.8, 1.6], "accuracy": [0.6, 0.8],
            "val_accuracy": [0.7, 0.75]}
    both = [low, high]
    a = plots.history_curves(low, share_with=both)
    b = plots.history_curves(high, share_with=both)
    for i in (0, 1):
        assert a.axes[i].get_ylim() == b.axes[i].get_ylim()
    # Every value inside: loss 0.1..2.0, accuracy 60..95 %.
    lo, hi = a.axes[0].get_ylim()
    assert lo < 0.1 and hi > 2.0 and hi - lo < 2.2
    lo, hi = a.axes[1].get_ylim()
    assert lo < 60 and hi > 95 and hi - lo < 40
    alone = plots.history_curves(low)
    assert alone.axes[0].get_ylim()[1] < 1.0  # on its own, its own scale


def test_a_heatmap_does_not_stretch_noise_over_its_colours():
    """Cells 0.1 points apart with intervals of ±0.3: the colours, centred on the baseline,
    span at least the interval, so the cells stay pale instead of spanning the scale."""
    mean = np.array([[0.9760, 0.9770], [0.9765, 0.9755]])  # [l2, dropout]
    half = np.full((2, 2), 0.003)
    fig = plots.sweep_heatmap((0.0, 1e-4), (0.0, 0.2), mean, n_seeds=5, centre=0.9760,
                              half_widths=half)
    image = fig.axes[0].images[0]
    low, high = image.get_clim()
    assert low == -high and high == pytest.approx(0.3)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert "97.70\n± 0.30" in texts
    wide = plots.sweep_heatmap((0.0, 1e-4), (0.0, 0.2), mean, n_seeds=1, centre=0.9700)
    assert wide.axes[0].images[0].get_clim()[1] == pytest.approx(0.7)  # 97.70 - 97.00


def test_one_seeds_heatmap_does_not_stretch_what_the_validation_set_cannot_resolve():
    """Two cells 0.06 points apart, one seed: the colours span the resolution given (0.32
    points), so the cells stay pale, not one red and one blue."""
    mean = np.array([[0.9760, 0.9766]])
    fig = plots.sweep_heatmap((0.0,), (0.0, 0.2), mean, n_seeds=1, centre=0.9760,
                              resolution=0.0032)
    assert fig.axes[0].images[0].get_clim() == (pytest.approx(-0.32), pytest.approx(0.32))
