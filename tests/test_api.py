"""The Python API as the README shows it."""

import re
import subprocess
import sys
from pathlib import Path

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
