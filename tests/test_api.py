"""The Python API as the README shows it."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mnist_jax import fit
from mnist_jax.config import TrainConfig
from mnist_jax.errors import ConfigError

from conftest import cli_env

README = Path(__file__).parents[1] / "README.md"


def test_import_has_no_side_effects():
    code = "import sys, mnist_jax; assert 'jax' not in sys.modules; print(mnist_jax.__all__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=cli_env(), check=True)
    assert "train" in done.stdout and "load_mnist" in done.stdout


def readme_scripts(mnist) -> list[str]:
    """The Python API section's code blocks, with 1 epoch and the test session's MNIST."""
    section = README.read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    return [b.replace("TrainConfig(epochs=20)", "TrainConfig(epochs=1)")
            .replace("load_mnist()", f"load_mnist({str(mnist.cache_dir)!r})") for b in blocks]


def run_script(script, cwd):
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=cwd, env=cli_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    return done


def test_readme_script_runs(mnist, tmp_path):
    done = run_script(readme_scripts(mnist)[0], tmp_path)
    # One epoch reaches about 95%; chance is 9.8%, which "test accuracy 9" also matched.
    accuracy = float(re.search(r"test accuracy ([\d.]+)%", done.stdout)[1])
    assert 90 < accuracy < 100, done.stdout
    assert (tmp_path / "dropout.png").stat().st_size > 10000


def test_readme_stack_example_compares_l2_values_over_seeds(mnist, tmp_path):
    """The README's answer to 'compare L2 1e-4, 3e-4, 1e-3 over 3 seeds': three named rows,
    each a mean and a spread over the seeds, at a one-epoch level of accuracy."""
    done = run_script(readme_scripts(mnist)[1], tmp_path)
    rows = re.findall(r"^(\S+): test accuracy ([\d.]+)% ± ([\d.]+)%$", done.stdout, re.M)
    assert [r[0] for r in rows] == ["l2[l2=0.0001]", "l2[l2=0.0003]", "l2[l2=0.001]"]
    for _, mean, spread in rows:
        assert 93 < float(mean) < 99 and 0 < float(spread) < 1, done.stdout


# --- what the API checks: the user's own arrays, any form the README accepts ---------------

@pytest.fixture(scope="module")
def own(mnist):
    """A user's own data as users have it: uint8 (N, 28, 28), integer labels."""
    return fit.Splits.from_arrays(mnist.train_images[:2000], mnist.train_labels[:2000],
                                  mnist.test_images[:500], mnist.test_labels[:500])


@pytest.fixture(scope="module")
def stack(own):
    return fit.train_stack(own, [fit.VARIANTS["baseline"], fit.VARIANTS["dropout"]], (4, 7),
                           TrainConfig(epochs=1, batch_size=64), progress=False)


def test_splits_from_arrays_scale_one_hot_and_hold_out_as_keras(own, mnist):
    assert own.train_images.shape == (1400, 784) and own.val_images.shape == (600, 784)
    scaled = mnist.train_images[3].ravel().astype(np.float32) / np.float32(255)
    np.testing.assert_array_equal(own.train_images[3], scaled)
    np.testing.assert_array_equal(np.argmax(own.val_labels, -1), mnist.train_labels[1400:2000])
    assert own.test_labels.dtype == np.float32 and own.test_labels.sum() == 500


@pytest.mark.parametrize("arrays, message", [
    (lambda m: (m.train_images[:10], np.full(10, 10), m.test_images[:5], m.test_labels[:5]),
     "train: .*0..9"),
    (lambda m: (m.train_images[:10] * 1.0, m.train_labels[:10], m.test_images[:5],
                m.test_labels[:5]), "train: .*1/255"),
    (lambda m: (m.train_images[:10], m.train_labels[:10], m.test_images[:5, :27],
                m.test_labels[:5]), "test: "),
    (lambda m: (m.train_images[:10], m.train_labels[:9], m.test_images[:5], m.test_labels[:5]),
     "train: "),
])
def test_splits_from_arrays_refuse_bad_data_in_one_line(mnist, arrays, message):
    with pytest.raises(ConfigError, match=message) as e:
        fit.Splits.from_arrays(*arrays(mnist))
    assert "\n" not in str(e.value)


def test_a_splits_made_by_hand_with_integer_labels_names_the_fix(mnist):
    x = np.zeros((4, 784), np.float32)
    with pytest.raises(ConfigError, match=r"train_labels \(4,\) .*Splits\.from_arrays"):
        fit.Splits(x, np.arange(4), x, np.eye(10, dtype=np.float32)[:4], x,
                   np.eye(10, dtype=np.float32)[:4])


def test_predict_takes_uint8_images_of_either_shape(stack, mnist):
    params = stack.params("baseline", 0)
    as_floats = fit.predict(stack.model, params, mnist.test_images[:300].reshape(-1, 784)
                            / np.float32(255))
    np.testing.assert_array_equal(fit.predict(stack.model, params, mnist.test_images[:300]),
                                  as_floats)
    with pytest.raises(ConfigError, match="1/255"):
        fit.predict(stack.model, params, mnist.test_images[:3] * 1.0)


def test_evaluate_takes_a_stacks_model_by_variant_and_seed(stack, own):
    by_stack = stack.evaluate("test")
    for v, name in enumerate(("baseline", "dropout")):
        for s, seed in enumerate((4, 7)):
            one = fit.evaluate(stack, own.test_images, np.argmax(own.test_labels, -1),
                               variant=name, seed=seed)
            assert one["accuracy"] == by_stack["accuracy"][s, v]
            assert one["loss"] == pytest.approx(by_stack["loss"][s, v], rel=1e-6)
    with pytest.raises(ConfigError, match="pass the Stack itself"):
        fit.evaluate(stack.model, stack.state, own.test_images, own.test_labels)
    with pytest.raises(ConfigError, match="seed 5 is not in the stack; it has 4, 7"):
        fit.evaluate(stack, own.test_images, own.test_labels, variant="dropout", seed=5)
