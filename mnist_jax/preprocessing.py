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
