"""Preprocessing and the validation split against direct NumPy computations."""

import math

import numpy as np
import pytest

from mnist_jax import preprocessing
from mnist_jax.errors import ConfigError


def test_flatten_is_row_major(mnist):
    flat = preprocessing.flatten(mnist.train_images[:3])
    assert flat.shape == (3, 784)
    assert flat[1, 28 * 5 + 7] == mnist.train_images[1, 5, 7]


def test_scale_to_unit_interval(mnist):
    x = preprocessing.scale(mnist.test_images[:100])
    assert x.dtype == np.float32
    assert x.min() == 0.0 and x.max() == 1.0
    np.testing.assert_array_equal(x, mnist.test_images[:100].astype(np.float32) / 255.0)


def test_one_hot():
    labels = np.array([3, 0, 9], np.uint8)
    expected = np.zeros((3, 10), np.float32)
    expected[0, 3] = expected[1, 0] = expected[2, 9] = 1.0
    np.testing.assert_array_equal(preprocessing.one_hot(labels), expected)
    with pytest.raises(ValueError, match="0..9"):
        preprocessing.one_hot(np.array([10]))


def test_keras_validation_split_of_mnist(mnist):
    x = preprocessing.flatten(mnist.train_images)
    (x_train, y_train), (x_val, y_val) = preprocessing.validation_split(
        x, mnist.train_labels, 0.3)
    assert (len(x_train), len(x_val)) == (42000, 18000)
    np.testing.assert_array_equal(x_val, x[42000:])  # the last 30%, unshuffled
    np.testing.assert_array_equal(y_train, mnist.train_labels[:42000])


@pytest.mark.parametrize("n, fraction", [(60000, 0.3), (60000, 0.1), (1000, 0.25), (7, 0.5),
                                         (10, 0.0), (59999, 0.3)])
def test_split_index_is_kerases_floor(n, fraction):
    assert preprocessing.split_index(n, fraction) == math.floor(n * (1.0 - fraction))


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_split_fraction_out_of_range(fraction):
    with pytest.raises(ConfigError, match=r"--validation-split .* \[0, 1\)"):
        preprocessing.split_index(100, fraction)


def test_split_leaving_nothing_to_train():
    with pytest.raises(ConfigError, match="leaves no training"):
        preprocessing.split_index(3, 0.9)
