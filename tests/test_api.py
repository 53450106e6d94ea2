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


def test_readme_script_runs(mnist, tmp_path):
    block = re.search(r"## Python API\n\n```python\n(.*?)```", README.read_text(), re.S)[1]
    script = block.replace("TrainConfig(epochs=20)", "TrainConfig(epochs=1)")
    script = script.replace("load_mnist()", f"load_mnist({str(mnist.cache_dir)!r})")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=tmp_path, env=cli_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    # One epoch reaches about 95%; chance is 9.8%, which "test accuracy 9" also matched.
    accuracy = float(re.search(r"test accuracy ([\d.]+)%", done.stdout)[1])
    assert 90 < accuracy < 100, done.stdout
    assert (tmp_path / "dropout.png").stat().st_size > 10000
