"""A trained MLP in the formats users already have, each written atomically to one file.

Every exported model takes images (N, 784) float32 in [0, 1], for any N, and returns the
softmax probabilities (N, 10) float32:

- `to_keras`: a Keras 3 `.keras` file, Keras's own Sequential with a softmax output, as the
  original study's model had: `keras.saving.load_model(path).predict(images)`.
- `to_onnx`: ONNX converted by jax2onnx from `probabilities`, the batch dimension symbolic:
  `onnxruntime.InferenceSession(path).run(None, {"images": images})[0]`.
- `to_jax`: `probabilities` serialized by `jax.export`, the parameters baked in; it needs JAX
  only, not mnist_jax: `jax.export.deserialize(open(path, "rb").read()).call(images)`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import types
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mnist_jax import files
from mnist_jax.config import dense_names
from mnist_jax.errors import ConfigError

# {"hidden_1": {"kernel": (784, w1), "bias": (w1,)}, ..., "output": {...}}: numpy or jax arrays.
Params = Mapping[str, Mapping[str, Any]]

# Where jax.export lowers the function by default, so a file written on a laptop runs on a GPU
# or TPU machine too (JAX lowers for them without their hardware).
JAX_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def layer_sizes(params: Params) -> tuple[int, ...]:
    """(784, *hidden, 10): the widths read from the kernels of hidden_1, hidden_2, ..., output.

    Raises ConfigError when the parameters are not those of such an MLP.
    """
    depth = 0
    while f"hidden_{depth + 1}" in params:
        depth += 1
    names = dense_names((0,) * depth)
    shapes = {name: np.shape(params[name]["kernel"]) for name in names if name in params}
    if set(params) != set(names) or any(len(s) != 2 for s in shapes.values()):
        raise ConfigError(f"not an MLP's parameters: expected the layers {', '.join(names)} "
                          f"with 2-D kernels; got {shapes}")
    sizes = (shapes[names[0]][0], *(shapes[name][1] for name in names))
    expected = {name: ((a, b), (b,)) for name, a, b in zip(names, sizes[:-1], sizes[1:],
                                                             strict=True)}
    got = {name: (shapes[name], np.shape(params[name]["bias"])) for name in names}
    if got != expected:
        raise ConfigError(f"the layers' shapes do not chain: expected {expected}; got {got}")
    return tuple(int(s) for s in sizes)


def hidden_widths(params: Params) -> tuple[int, ...]:
    """The hidden layers' widths, as `MLP(hidden=...)` takes them."""
    return layer_sizes(params)[1:-1]


def probabilities(params: Params, images: jax.Array) -> jax.Array:
    """images (N, 784) float32 -> softmax probabilities (N, 10) float32: the MLP's forward pass
    (Dense, ReLU after each hidden layer) in plain jax.numpy, full float32 matmuls on every
    platform (no TF32 on GPUs)."""
    names = dense_names(hidden_widths(params))
    x = images
    for name in names:
        kernel, bias = params[name]["kernel"], params[name]["bias"]
        x = jnp.dot(x, kernel, precision="highest") + jnp.reshape(bias, (1, -1))
        if name != names[-1]:
            x = jax.nn.relu(x)
    return jax.nn.softmax(x, axis=-1)


def _float32(params: Params) -> dict[str, dict[str, np.ndarray]]:
    """The parameters as float32 NumPy arrays on the host (what a file can hold)."""
    return {name: {k: np.asarray(jax.device_get(a), np.float32) for k, a in layer.items()}
            for name, layer in params.items()}


def _require(module: str, extra: str) -> types.ModuleType:
    """Imports `module`, or raises a ConfigError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:  # the package is there and something it needs is missing
            raise
        raise ConfigError(f"the {extra} export needs {module}: pip install 'mnist_jax[{extra}]'"
                          ) from None


def to_keras(params: Params, path: str | os.PathLike) -> Path:
    """Writes a Keras 3 `.keras` file: Sequential Dense layers named as ours, ReLU, and a
    softmax output. Keras runs on JAX unless KERAS_BACKEND names another backend."""
    path = Path(path)
    if path.suffix != ".keras":
        raise ConfigError(f"{path}: Keras 3 saves models only to '.keras' files; "
                          f"name it {path.with_suffix('.keras').name}")
    os.environ.setdefault("KERAS_BACKEND", "jax")  # read once, when keras is first imported
    keras = _require("keras", "keras")
    weights = _float32(params)
    sizes = layer_sizes(weights)
    names = dense_names(sizes[1:-1])
    layers = [keras.layers.Dense(width, activation="relu", name=name)
              for name, width in zip(names[:-1], sizes[1:-1], strict=True)]
    model = keras.Sequential([keras.Input((sizes[0],)), *layers,
                              keras.layers.Dense(sizes[-1], activation="softmax", name="output")],
                             name="mnist_mlp")
    model.set_weights([weights[name][k] for name in names for k in ("kernel", "bias")])
    # Compiled as the original study's model, so that load_model(path).evaluate(x, y_one_hot)
    # works as it did there; its Adam built (fresh slots), as load_model restores one only so.
    model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    model.optimizer.build(model.trainable_variables)
    with files.atomic_path(path) as tmp:
        model.save(tmp)
    return path


@contextlib.contextmanager
def _quiet_dm_pix_plugins() -> Iterator[None]:
    """Drops jax2onnx's log records (tracebacks) about its dm_pix plugins, which some versions
    cannot import under newer JAX and skip; they convert dm_pix's ops, which we never use."""
    logger = logging.getLogger("jax2onnx.plugins.plugin_system")

    def keep(record: logging.LogRecord) -> bool:
        return "jax2onnx.plugins.dm_pix." not in record.getMessage()

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def to_onnx(params: Params, path: str | os.PathLike, *, opset: int = 17) -> Path:
    """Writes ONNX converted by jax2onnx from `probabilities`: input 'images' (N, 784) float32,
    N symbolic; output 'probabilities' (N, 10). Opset 17 (ONNX Runtime 1.13 and later)."""
    jax2onnx = _require("jax2onnx", "onnx")
    weights = _float32(params)
    sizes = layer_sizes(weights)
    with _quiet_dm_pix_plugins():
        model = jax2onnx.to_onnx(functools.partial(probabilities, weights), [("N", sizes[0])],
                                 model_name="mnist_mlp", opset=opset, input_names=["images"],
                                 output_names=["probabilities"])
    files.write_bytes(path, model.SerializeToString())
    return Path(path)


def to_jax(params: Params, path: str | os.PathLike, *,
           platforms: tuple[str, ...] = JAX_PLATFORMS) -> Path:
    """Writes `probabilities`, the parameters baked in as constants, serialized by `jax.export`
    for a symbolic batch size b: images (b, 784) float32 -> (b, 10). Read it back with
    `jax.export.deserialize(open(path, "rb").read()).call(images)`."""
    weights = _float32(params)
    sizes = layer_sizes(weights)
    images = jax.ShapeDtypeStruct(jax.export.symbolic_shape(f"b, {sizes[0]}"), jnp.float32)
    exported = jax.export.export(jax.jit(functools.partial(probabilities, weights)),
                                 platforms=platforms)(images)
    files.write_bytes(path, exported.serialize())
    return Path(path)


class Format(NamedTuple):
    export: Callable[[Params, str | os.PathLike], Path]
    suffix: str  # the file name's default suffix


FORMATS: Mapping[str, Format] = types.MappingProxyType({
    "keras": Format(to_keras, ".keras"),
    "onnx": Format(to_onnx, ".onnx"),
    "jax": Format(to_jax, ".jax"),
})
