"""Pure preprocessing: flatten, scale, one-hot, and Keras's `validation_split` rule."""

from __future__ import annotations

import math

import numpy as np

from mnist_jax.errors import ConfigError


def flatten(images_u8: np.ndarray) -> np.ndarray:
    """(N, 28, 28) -> (N, 784), same dtype, row-major like Keras's `reshape(-1, 784)`."""
    return images_u8.reshape(images_u8.shape[0], -1)


def scale(images_u8: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 in 0..255 -> float32 in [0, 1], Keras's `x.astype("float32") / 255` bit for bit,
    into `out` if given (one pass, no temporary)."""
    return np.divide(images_u8, np.float32(255), out=out, dtype=np.float32)


def one_hot(labels: np.ndarray, num_classes: int = 10) -> np.ndarray:
    """(N,) integer labels -> (N, num_classes) float32 one-hot rows."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}")
    return np.eye(num_classes, dtype=np.float32)[labels]


def split_index(n: int, fraction: float) -> int:
    """Where Keras's `validation_split=fraction` cuts n samples: floor(n * (1 - fraction))."""
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"--validation-split {fraction} must lie in [0, 1)")
    cut = math.floor(n * (1.0 - fraction))
    if cut == 0 or (fraction > 0 and cut == n):
        raise ConfigError(f"--validation-split {fraction} leaves no training or no validation "
                          f"samples out of {n}; choose a fraction between {1 / n:.2g} and "
                          f"{1 - 1 / n:.6g}")
    return cut


def validation_split(x: np.ndarray, y: np.ndarray, fraction: float,
                     ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The last `fraction` of the arrays, taken before any shuffling, becomes validation.

    Returns ((x_train, y_train), (x_val, y_val)); 42,000 / 18,000 for MNIST at 0.3.
    """
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} rows, y has {len(y)}")
    cut = split_index(len(x), fraction)
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


# --- arrays a user gives the API: checked, in the model's form ----------------------------------

def check_images(images: np.ndarray) -> np.ndarray:
    """Images for predict or evaluate, (N, 784) or (N, 28, 28), uint8 0..255 or float in
    [0, 1] -> (N, 784) float32 in [0, 1].

    One image alone, (784,) or (28, 28), is refused rather than given a batch axis, so that
    the output has one row per row given: pass `image[None]`.
    """
    images = np.asarray(images)
    if images.ndim not in (2, 3) or images.shape[1:] not in ((784,), (28, 28)) or not len(images):
        single = images.shape in ((784,), (28, 28))
        raise ConfigError(f"images of shape {images.shape}: give (N, 784) or (N, 28, 28) with "
                          "N >= 1" + ("; for one image, pass image[None]" if single else ""))
    return pixels_in_unit(images, "images").reshape(len(images), -1)


def check_labels(labels: np.ndarray, n: int) -> np.ndarray:
    """Labels for `n` images, integer classes (N,) in 0..9 or one-hot rows (N, 10) (float or
    integer, exactly one 1 per row) -> (N, 10) float32 one-hot."""
    labels = np.asarray(labels)
    integer = np.issubdtype(labels.dtype, np.integer)
    numeric = integer or np.issubdtype(labels.dtype, np.floating)
    classes = labels.ndim == 1 and integer
    rows = labels.ndim == 2 and labels.shape[1] == 10 and numeric
    if not (classes or rows):
        raise ConfigError(f"labels of shape {labels.shape} and dtype {labels.dtype}: give integer "
                          "classes (N,) in 0..9 or one-hot rows (N, 10)")
    if len(labels) != n:
        raise ConfigError(f"{len(labels)} labels for {n} images; give one label per image")
    if classes:
        bad = np.flatnonzero((labels < 0) | (labels > 9))
        if bad.size:
            raise ConfigError(f"label {labels[bad[0]]} (labels[{bad[0]}]) is not a class; "
                              "classes are 0..9")
        return one_hot(labels)
    ok = ((labels == 0) | (labels == 1)).all(1) & ((labels == 1).sum(1) == 1)
    if not ok.all():
        i = np.flatnonzero(~ok)[0]
        raise ConfigError(f"labels[{i}] = {labels[i].tolist()} is not one-hot; each row needs "
                          "exactly one 1 and nine 0s")
    return labels.astype(np.float32)


def pixels_in_unit(array: np.ndarray, what: str) -> np.ndarray:
    """uint8 0..255 scaled by 1/255, or float checked to be finite and in [0, 1]; float32."""
    if array.dtype == np.uint8:
        return scale(array)
    if not np.issubdtype(array.dtype, np.floating):
        raise ConfigError(f"{what} of dtype {array.dtype}: give uint8 0..255 or float in [0, 1] "
                          "(e.g. x.astype(np.uint8) for integer pixels 0..255)")
    if not np.isfinite(array).all():
        raise ConfigError(f"{what} holds NaN or infinite values; give pixels in [0, 1] (float) or "
                          "0..255 (uint8, scaled by 1/255 here)")
    lo, hi = array.min(), array.max()
    if lo < 0 or hi > 1:
        raise ConfigError(f"{what} has values in [{lo:g}, {hi:g}], outside [0, 1]; scale pixels "
                          "0..255 by 1/255 (x / 255), or give them as uint8")
    return array.astype(np.float32)
