"""The study notebook runs, through the public API, with a maintained runner (nbclient): the
documentation that cannot rot."""

import re
from pathlib import Path

import nbformat
import pytest

NOTEBOOK = Path(__file__).parents[1] / "examples" / "study.ipynb"


def test_the_notebook_is_kept_without_outputs_and_with_its_parameter_cell():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and "EPOCHS = 20" in params[0].source


@pytest.mark.slow
def test_the_notebook_runs_and_shows_each_step(mnist, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:  # CI's parameters: one epoch, the test session's MNIST
        if "parameters" in cell.metadata.get("tags", []):
            cell.source = "EPOCHS = 1\nSEED = 0"
    monkeypatch.setenv("MNIST_JAX_DATA", str(mnist.cache_dir))
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # one plain CPU device, as a user has
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if "image/png" in o.get("data", {})]
    assert len(images) == 6  # label distribution, digits, four variants' curves
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.outputs)
    assert "total parameters: 269,322" in text
    table = nb.cells[-1].outputs[0]["data"]["text/markdown"]
    accuracies = re.findall(r"\| `(\w+)` \| [\d.]+% \| [\d.]+ \| ([\d.]+)% \|", table)
    assert [a[0] for a in accuracies] == ["baseline", "l2", "dropout", "l2_dropout"]
    assert all(90 < float(a[1]) < 100 for a in accuracies), table
