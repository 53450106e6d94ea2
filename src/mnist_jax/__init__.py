"""mnist_jax: MNIST classification with multilayer perceptrons in JAX, Flax and optax."""

__version__ = "0.1.0"
