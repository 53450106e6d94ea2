"""The exporters, each file read back by the tool that will read it (Keras, onnxruntime, a fresh
Python process that has JAX but cannot import mnist_jax) and compared with our own float32
prediction, `MLP.apply`, and a softmax in NumPy."""

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")  # before keras is imported, as to_keras does

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import onnxruntime  # noqa: E402
import pytest  # noqa: E402

from mnist_jax import export  # noqa: E402
from mnist_jax.config import TrainConfig, dense_names  # noqa: E402
from mnist_jax.data import load_mnist  # noqa: E402
from mnist_jax.errors import ConfigError  # noqa: E402
from mnist_jax.fit import prepare, train  # noqa: E402
from mnist_jax.model import MLP  # noqa: E402

from conftest import cli_env  # noqa: E402

pytestmark = [
    # Keras 3.15's Variable.__array__ takes no `copy` argument, which NumPy 2 deprecates; Keras
    # converts each weight with np.array() when it saves a model.
    pytest.mark.filterwarnings(
        "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning:"
        "keras"),
]

# A square hidden layer (24 -> 24): there a transposed kernel has the right shape.
HIDDEN = [(32, 16), (24, 24, 12)]


def random_params(hidden: tuple[int, ...], seed: int = 0) -> dict:
    """He-scaled kernels and biases that are not zero: activations of order one, so ReLU cuts
    about half of them and the probabilities are far from uniform."""
    rng = np.random.default_rng(seed)
    sizes = (784, *hidden, 10)
    return {name: {"kernel": rng.normal(0, np.sqrt(2 / a), (a, b)).astype(np.float32),
                   "bias": rng.normal(0, 0.5, b).astype(np.float32)}
            for name, a, b in zip(dense_names(hidden), sizes[:-1], sizes[1:], strict=True)}


def images(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 784), dtype=np.float32)


def ours(params, x: np.ndarray) -> np.ndarray:
    """Our prediction: the MLP's float32 logits, their softmax in float64."""
    logits = np.asarray(MLP(hidden=export.hidden_widths(params)).apply({"params": params}, x))
    e = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def assert_same_predictions(probs: np.ndarray, expected: np.ndarray) -> None:
    assert probs.shape == expected.shape and probs.dtype == np.float32
    np.testing.assert_allclose(probs, expected, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(probs.argmax(axis=1), expected.argmax(axis=1))


def keras_predict(path, x: np.ndarray) -> np.ndarray:
    # Keras's Dense adds its bias (units,) to (batch, units) by rank promotion.
    with jax.numpy_rank_promotion("allow"):
        return keras.saving.load_model(path).predict(x, verbose=0)


def onnx_predict(path, x: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(["probabilities"], {"images": x})[0]


FRESH_PROCESS = """
import sys
sys.modules["mnist_jax"] = None  # installed here: any import of it now fails
import jax, numpy as np
exported = jax.export.deserialize(open("model.jax", "rb").read())
inputs = np.load("inputs.npz")
np.savez("outputs.npz", **{k: np.asarray(exported.call(inputs[k])) for k in inputs.files})
"""


def jax_predict_fresh(path, batches: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Runs the exported function in a fresh `python -I` (no PYTHONPATH, no current directory
    on the path) that cannot import mnist_jax."""
    assert path.name == "model.jax"
    np.savez(path.parent / "inputs.npz", **batches)
    subprocess.run([sys.executable, "-I", "-c", FRESH_PROCESS], cwd=path.parent, env=cli_env(),
                   check=True, timeout=120)
    with np.load(path.parent / "outputs.npz") as out:
        return {k: out[k] for k in out.files}


def test_layer_sizes_read_the_kernels():
    for hidden in [(7,), (32, 16), (9, 8, 7, 6, 5, 4, 3, 2)]:
        params = random_params(hidden)
        assert export.layer_sizes(params) == (784, *hidden, 10)
        assert export.hidden_widths(jax.device_put(params)) == hidden
    params = random_params((32, 16))
    params["hidden_2"]["bias"] = params["hidden_2"]["bias"][:15]
    with pytest.raises(ConfigError, match="do not chain"):
        export.layer_sizes(params)
    del params["hidden_1"]
    with pytest.raises(ConfigError, match="expected the layers output"):
        export.layer_sizes(params)


@pytest.mark.parametrize("hidden", HIDDEN, ids=str)
def test_keras_file_gives_our_probabilities(hidden, tmp_path):
    params = random_params(hidden)
    path = export.to_keras(params, tmp_path / "model.keras")
    layers = keras.saving.load_model(path).layers
    assert [(layer.name, layer.activation.__name__) for layer in layers] == [
        *((name, "relu") for name in dense_names(hidden)[:-1]), ("output", "softmax")]
    x = images(50)
    assert_same_predictions(keras_predict(path, x), ours(params, x))


@pytest.mark.parametrize("hidden", HIDDEN, ids=str)
def test_onnx_file_gives_our_probabilities_at_any_batch_size(hidden, tmp_path):
    params = random_params(hidden)
    path = export.to_onnx(jax.device_put(params), tmp_path / "model.onnx")
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type, out.name, out.type) == (
        "images", "tensor(float)", "probabilities", "tensor(float)")
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [784]  # a symbolic batch
    for n in (1, 37):
        x = images(n, seed=n)
        assert_same_predictions(onnx_predict(path, x), ours(params, x))


@pytest.mark.parametrize("hidden", HIDDEN, ids=str)
def test_jax_file_runs_without_mnist_jax_at_any_batch_size(hidden, tmp_path):
    params = random_params(hidden)
    path = export.to_jax(params, tmp_path / "model.jax")
    exported = jax.export.deserialize(path.read_bytes())
    assert exported.platforms == ("cpu", "cuda", "rocm", "tpu")
    batches = {"three": images(3, seed=3), "forty_one": images(41, seed=41)}
    probs = jax_predict_fresh(path, batches)
    for name, x in batches.items():
        assert_same_predictions(probs[name], ours(params, x))


def test_keras_refuses_a_file_it_could_not_read(tmp_path):
    with pytest.raises(ConfigError, match=r"name it model\.keras"):
        export.to_keras(random_params((8,)), tmp_path / "model.h5")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("name", sorted(export.FORMATS))
def test_files_are_replaced_atomically_with_the_umask(name, tmp_path):
    fn, suffix = export.FORMATS[name]
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"an older export")
    old = os.umask(0o027)
    try:
        assert fn(random_params((8,)), path) == path
    finally:
        os.umask(old)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left beside it
    assert path.stat().st_mode & 0o777 == 0o640
    assert path.read_bytes() != b"an older export"


@pytest.mark.parametrize(("name", "module"), [("keras", "keras"), ("onnx", "jax2onnx")])
def test_a_missing_package_names_the_extra(name, module, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    with pytest.raises(ConfigError, match=rf"pip install 'mnist_jax\[{name}\]'"):
        export.FORMATS[name].export(random_params((8,)), tmp_path / f"model.{name}")


QUIET_ONNX_EXPORT = """
import sys
import numpy as np
from mnist_jax import export
params = {"hidden_1": {"kernel": np.ones((784, 8), np.float32), "bias": np.zeros(8, np.float32)},
          "output": {"kernel": np.ones((8, 10), np.float32), "bias": np.zeros(10, np.float32)}}
export.to_onnx(params, sys.argv[1])
"""


@pytest.mark.slow  # a fresh process: jax2onnx imports its plugins on the first conversion, 8 s
def test_onnx_export_prints_no_tracebacks(tmp_path):
    """jax2onnx 0.13 logs a traceback for each dm_pix plugin it cannot import under JAX 0.10;
    the export needs none of them, and the user should not see them."""
    path = tmp_path / "model.onnx"
    run = subprocess.run([sys.executable, "-c", QUIET_ONNX_EXPORT, path], env=cli_env(),
                         cwd=Path(__file__).parents[1], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and run.stderr == "", run.stderr
    assert onnx_predict(path, images(2)).shape == (2, 10)


@pytest.fixture(scope="module")
def trained():
    """A baseline trained for one epoch on the real MNIST, and the test images."""
    splits = prepare(load_mnist())
    result = train(splits, "baseline", TrainConfig(epochs=1), progress=False)
    return jax.device_get(result.params), splits.test_images, splits.test_labels.argmax(axis=1)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(export.FORMATS))
def test_a_trained_model_keeps_our_accuracy_to_the_last_image(name, trained, tmp_path):
    params, x, labels = trained
    path = export.FORMATS[name].export(params, tmp_path / f"model{export.FORMATS[name].suffix}")
    if name == "keras":
        probs = keras_predict(path, x)
    elif name == "onnx":
        probs = onnx_predict(path, x)
    else:
        probs = jax_predict_fresh(path, {"test": x})["test"]
    expected = ours(params, x)
    assert_same_predictions(probs, expected)
    assert (probs.argmax(axis=1) == labels).sum() == (expected.argmax(axis=1) == labels).sum()
    assert (expected.argmax(axis=1) == labels).mean() > 0.9  # a trained model, not chance
