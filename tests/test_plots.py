"""Figures: each one renders, saves atomically as a readable PNG, and counts correctly."""

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
    saved(plots.label_distribution(mnist.train_labels, mnist.test_labels), tmp_path / "l.png")
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


def test_comparison(tmp_path):
    fig = plots.compare_variants({"a": [HISTORY], "b": [HISTORY]}, {"a": [0.97], "b": [0.98]})
    saved(fig, tmp_path / "c.png")
    fig = plots.compare_variants({"a": [HISTORY, HISTORY], "b": [HISTORY, HISTORY]},
                                 {"a": [0.97, 0.975], "b": [0.98, 0.981]})
    saved(fig, tmp_path / "c2.png")


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
    saved(plots.confusion(true, pred), tmp_path / "cm.png")
    fig = plots.misclassified(mnist.test_images[:200], true, pred)
    titles = captions(fig)
    assert titles[0] == f"{true[0]} → {pred[0]}" and len(titles) == 25
    saved(fig, tmp_path / "mis.png")


def test_failed_save_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "fig.png"
    saved(plots.history_curves(HISTORY), path)
    before = path.read_bytes()
    fig = plots.history_curves(HISTORY)

    def broken(*args, **kwargs):
        with open(args[0], "wb") as f:
            f.write(b"half a png")
        raise OSError("disk full")

    monkeypatch.setattr(fig, "savefig", broken)
    with pytest.raises(OSError, match="disk full"):
        plots.save(fig, path)
    assert path.read_bytes() == before
    assert not list(tmp_path.glob(".*tmp*"))
