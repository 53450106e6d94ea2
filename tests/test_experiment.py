"""The main job end to end, as a user runs it: `mnist-jax experiment`, `train`, `eda`."""

import csv
import json
import re

import matplotlib.image
import numpy as np
import pytest

from mnist_jax import report
from mnist_jax.config import VARIANTS

from test_cli import run_cli, run_main

FIGURES = ["label_distribution", "digits", "comparison", "confusion", "misclassified"]


@pytest.fixture(scope="module")
def one_epoch(mnist, tmp_path_factory):
    out = tmp_path_factory.mktemp("experiment") / "run"
    cache = tmp_path_factory.mktemp("xla-cache")
    done = run_cli("experiment", "--epochs", 1, "--out", out, "--data-dir", mnist.cache_dir,
                   MNIST_JAX_COMPILATION_CACHE=str(cache))
    return out, done


def check_png(path):
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and min(image.shape[:2]) > 100 and image[..., :3].std() > 0.01


def test_experiment_writes_every_file(one_epoch):
    out, done = one_epoch
    names = list(VARIANTS)
    expected = ({"report.md", "metrics.json", "run.json", "figures", "checkpoints", ".lock"}
                | {f"history_{n}.csv" for n in names})
    assert {p.name for p in out.iterdir()} == expected
    figures = {p.stem for p in (out / "figures").iterdir()}
    assert figures == set(FIGURES) | {f"curves_{n}" for n in names}
    for png in (out / "figures").iterdir():
        check_png(png)
    for n in names:
        rows = list(csv.DictReader((out / f"history_{n}.csv").read_text().splitlines()))
        assert len(rows) == 1 and set(rows[0]) == set(report.CSV_COLUMNS)
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    assert "baseline" in done.stdout and "report:" in done.stdout


def test_metrics_json_contract(one_epoch, mnist):
    out, _ = one_epoch
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"config", "environment", "variants"} <= set(metrics)
    assert metrics["config"]["train"]["epochs"] == 1
    assert metrics["environment"]["versions"]["jax"]
    assert metrics["environment"]["device"]["platform"] == "cpu"
    assert metrics["environment"]["cpu"]["cores"] >= 1 and metrics["environment"]["cpu"]["model"]
    assert metrics["data"]["sha256"] == dict(mnist.sha256)
    assert (metrics["data"]["train"], metrics["data"]["validation"]) == (42000, 18000)
    assert metrics["model"]["parameters"] == 269322
    assert list(metrics["variants"]) == list(VARIANTS)
    for name, v in metrics["variants"].items():
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            assert len(v["history"][key]) == 1 and 0 <= v["history"]["accuracy"][0] <= 1
        assert set(v["test"]) >= {"loss", "accuracy"} and v["test"]["accuracy"] > 0.9
        assert v["train_full"]["accuracy"] > 0.9 and v["train_seconds"] > 0
        assert (v["test"]["penalty"] > 0) == (VARIANTS[name].l2 > 0)
        assert v["variant"]["name"] == name


def test_report_embeds_every_figure(one_epoch):
    out, _ = one_epoch
    text = (out / "report.md").read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(linked) == sorted(f"figures/{p.name}" for p in (out / "figures").iterdir())
    for name in VARIANTS:
        assert f"| `{name}` |" in text
    assert "Best variant" in text and "98.0% (0.1009)" in text


def test_train_one_variant_and_eda(mnist, tmp_path, capsys):
    out = tmp_path / "dropout"
    run_main(capsys, "train", "--variant", "dropout", "--epochs", 1, "--out", out,
             "--data-dir", mnist.cache_dir, "--no-compilation-cache", "--quiet")
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["variants"]) == ["dropout"]
    assert (out / "history_dropout.csv").exists() and (out / "figures/curves_dropout.png").exists()
    eda = tmp_path / "eda"
    run_main(capsys, "eda", "--out", eda, "--data-dir", mnist.cache_dir, "--quiet")
    assert sorted(p.name for p in (eda / "figures").iterdir()) == ["digits.png",
                                                                   "label_distribution.png"]


@pytest.mark.slow
def test_full_study_reaches_the_original_accuracy(mnist, tmp_path):
    """The study as the README runs it: 20 epochs, four variants, each at least 97%."""
    out = tmp_path / "study"
    run_cli("experiment", "--out", out, "--data-dir", mnist.cache_dir, "--quiet",
            "--no-compilation-cache")
    metrics = json.loads((out / "metrics.json").read_text())
    accuracies = {n: v["test"]["accuracy"] for n, v in metrics["variants"].items()}
    assert min(accuracies.values()) >= 0.97, accuracies
    assert all(len(v["history"]["loss"]) == 20 for v in metrics["variants"].values())


def test_seeds_give_statistics_and_intervals(mnist, tmp_path, capsys):
    out = tmp_path / "seeds"
    run_main(capsys, "experiment", "--variants", "baseline,dropout", "--seeds", "0-2",
             "--epochs", 1, "--out", out, "--data-dir", mnist.cache_dir, "--quiet",
             "--no-compilation-cache")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["seeds"] == [0, 1, 2] and metrics["timing"]["models"] == 6
    for name, v in metrics["variants"].items():
        accs = [r["test"]["accuracy"] for r in v["runs"]]
        assert [r["seed"] for r in v["runs"]] == [0, 1, 2] and len(set(accs)) == 3
        stats = v["stats"]["test_accuracy"]
        assert stats["n"] == 3 and stats["mean"] == pytest.approx(sum(accs) / 3)
        assert stats["std"] == pytest.approx(float(np.std(accs, ddof=1)))
        assert v["test"]["accuracy"] == pytest.approx(stats["mean"])
        for seed in (0, 1, 2):
            assert (out / f"history_{name}_seed{seed}.csv").exists()
    (comparison,) = metrics["comparisons"]
    diffs = [a["test"]["accuracy"] - b["test"]["accuracy"] for a, b in zip(
        metrics["variants"]["baseline"]["runs"], metrics["variants"]["dropout"]["runs"],
        strict=True)]
    assert comparison["mean"] == pytest.approx(np.mean(diffs))
    assert comparison["ci95_low"] < comparison["mean"] < comparison["ci95_high"]
    text = (out / "report.md").read_text()
    assert "over 3 seeds" in text and "95% interval" in text and "`baseline` − `dropout`" in text
    assert "±" in text
