"""mnist_jax: MNIST classification with multilayer perceptrons in JAX, Flax and optax.

The public API, imported on first use (so `import mnist_jax` is cheap and has no side
effects):

    from mnist_jax import load_mnist, prepare, train, evaluate, VARIANTS, plots, load_run
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_mnist": "mnist_jax.data", "MNIST": "mnist_jax.data",
    "flatten": "mnist_jax.preprocessing", "scale": "mnist_jax.preprocessing",
    "one_hot": "mnist_jax.preprocessing", "validation_split": "mnist_jax.preprocessing",
    "VARIANTS": "mnist_jax.config", "Variant": "mnist_jax.config",
    "TrainConfig": "mnist_jax.config",
    "MLP": "mnist_jax.model", "summary": "mnist_jax.model",
    "prepare": "mnist_jax.stacks", "Splits": "mnist_jax.stacks", "Stack": "mnist_jax.stacks",
    "train": "mnist_jax.fit", "train_stack": "mnist_jax.fit", "evaluate": "mnist_jax.fit",
    "predict": "mnist_jax.fit", "evaluate_models": "mnist_jax.fit",
    "train_step": "mnist_jax.steps", "create_train_state": "mnist_jax.steps",
    "ExperimentConfig": "mnist_jax.experiment",
    "train_and_evaluate": "mnist_jax.experiment",
    "enable_compilation_cache": "mnist_jax.runtime",
    "SweepConfig": "mnist_jax.sweep", "run_sweep": "mnist_jax.sweep",
    "sweep_and_report": "mnist_jax.sweep",
    "load_run": "mnist_jax.trained", "TrainedRun": "mnist_jax.trained",
    "load_model": "mnist_jax.saving", "SavedModel": "mnist_jax.saving",
    "load_inputs": "mnist_jax.inputs",
}
_MODULES = ("data", "preprocessing", "inputs", "config", "model", "kernels", "optim", "steps",
            "placement", "programs", "stacks", "fit", "results", "plots", "report", "experiment",
            "rundir", "checkpoint", "stats", "runtime", "sweep", "tensorboard", "saving",
            "trained", "export")
__all__ = sorted(_EXPORTS) + list(_MODULES)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _MODULES:
        return importlib.import_module(f"mnist_jax.{name}")
    raise AttributeError(f"module 'mnist_jax' has no attribute {name!r}")


def __dir__():
    return __all__
