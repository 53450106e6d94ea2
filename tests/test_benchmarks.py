"""The benchmark suite runs end to end and writes what it promises (no timing thresholds:
timings belong in benchmarks/ and its JSON, not in assertions)."""

import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import matplotlib.image
import pytest

from conftest import cli_env

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_quick_benchmark_run_writes_json_and_plot(mnist, tmp_path):
    out = tmp_path / "bench"
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(out),
                           "--data-dir", str(mnist.cache_dir), "--skip", "scaling"],
                          capture_output=True, text=True, cwd=ROOT, timeout=900,
                          env=cli_env(MNIST_JAX_COMPILATION_CACHE=str(tmp_path / "xla")))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["environment"]["versions"]["jax"]
    names = {r["name"] for r in results["records"]}
    assert names >= {"matmul_peak", "train_step", "epoch", "cost_vs_baseline",
                     "optimizer_cost", "stack", "study"}
    for record in results["records"]:
        assert record["backend"] == "cpu" and record["device_kind"]
        if "samples_per_s" in record:
            assert record["samples_per_s"] > 0 and record["min_s"] <= record["median_s"]
    epochs = [r for r in results["records"] if r["name"] == "epoch"]
    assert {r["batch"] for r in epochs} >= {128, 1024}
    assert all(0 < r["flop_utilisation"] for r in epochs)
    assert all(r["flop_utilisation_in_window"] == pytest.approx(
        r["gflop_per_s"] / r["peak_in_window_gflop_per_s"]) for r in epochs)
    optimizers = {r["optimizer"]: r for r in results["records"] if r["name"] == "optimizer_cost"}
    assert set(optimizers) == {"keras-adam", "adam", "sgd"}
    assert optimizers["keras-adam"]["ratio_to_study"] == 1.0
    for other in ("adam", "sgd"):
        assert optimizers[other]["ratio_to_study"] == pytest.approx(
            optimizers[other]["min_s"] / optimizers["keras-adam"]["min_s"])
    peaks = [r for r in results["records"] if r["name"] == "matmul_peak"]
    assert [r["n"] for r in peaks] == [1024, 2048]
    best = max(r["gflop_per_s"] for r in peaks)
    assert all(r["flop_utilisation"] == pytest.approx(r["gflop_per_s"] / best) for r in epochs)
    stacks = {(r["placement"], r["models"]) for r in results["records"] if r["name"] == "stack"}
    assert stacks == {("sequential", 1), ("stack", 2), ("sequential", 2), ("concurrent", 2)}
    study = {r["run"]: r for r in results["records"] if r["name"] == "study"}
    assert set(study) == {"cold_cache", "warm_cache"}
    assert study["warm_cache"]["test_accuracy"] == study["cold_cache"]["test_accuracy"]
    image = matplotlib.image.imread(out / "benchmarks.png")
    assert image.shape[0] > 500 and image[..., :3].std() > 0.01


@pytest.mark.slow  # a benchmark subprocess end to end (14 s); the fast suite is near 5 min
def test_data_parallel_benchmark_process(mnist):
    done = subprocess.run([sys.executable, "-m", "benchmarks.scaling", "--devices", "2",
                           "--data-parallel", "2", "--repeats", "1", "--data-dir",
                           str(mnist.cache_dir)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600, env=cli_env())
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert (record["devices"], record["data_parallel"]) == (2, 2)
    assert (record["global_batch"], record["per_device_batch"]) == (128, 64)


def test_between_runs_around_every_timed_repeat():
    from benchmarks import harness

    calls = []
    t = harness.time_calls(lambda: calls.append("call") or jnp.zeros(()), 3,
                           between=lambda: calls.append("between"))
    assert calls == ["call"] + ["between", "call"] * 3 + ["between"]
    assert len(t["times_s"]) == 3


def test_yardstick_reports_the_best_matmul_of_its_window():
    from benchmarks import harness

    yardstick = harness.Yardstick(64)
    assert yardstick.window().close() == 0.0
    yardstick.sample()
    yardstick.sample()
    assert yardstick.close() > 0
    assert yardstick.window().close() == 0.0, "a new window forgets the last one"


def test_peers_report_each_missing_stack_and_save_after_each(monkeypatch):
    import importlib.util

    from benchmarks import harness, suite

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    results, saved = harness.Results(), []
    suite.peers(results, None, None, 1, after_each=lambda: saved.append(len(results.records)))
    records = results.find("peer")
    assert [r["stack"] for r in records] == list(suite.PEERS)
    assert all(r["skipped"].startswith("not installed: keras") for r in records[:2])
    assert records[1]["skipped"] == ("not installed: keras, tensorflow "
                                     "(pip install -e '.[peers]')")
    assert saved == [1, 2, 3, 4], "saved after every peer, the skipped ones too"


@pytest.mark.slow  # four one-epoch studies in fresh processes (40 s)
def test_ab_runs_each_version_s_own_code_cold_then_warm(mnist, tmp_path):
    """`benchmarks.ab` against HEAD: every run imports the version it is recorded as (the
    other revision from its worktree, which is removed afterwards), cold before warm, the
    order alternating, and the rest is what compile and train leave of the process."""
    out = tmp_path / "ab.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.ab", "HEAD", "--rounds", "1",
                           "--epochs", "1", "--data-dir", str(mnist.cache_dir), "--out",
                           str(out)], capture_output=True, text=True, cwd=ROOT, timeout=900,
                          env=cli_env())
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["cache"], r["version"]) for r in rows] == [
        ("cold", "HEAD"), ("cold", "this tree"), ("warm", "HEAD"), ("warm", "this tree")]
    for r in rows:
        module = Path(r["module"])
        assert module.is_relative_to(ROOT) == (r["version"] == "this tree")
        assert r["rest_s"] == pytest.approx(r["wall_s"] - r["compile_s"] - r["train_s"])
        assert 0 < r["compile_s"] and 0 < r["train_s"] < r["wall_s"]
    warm = [r for r in rows if r["cache"] == "warm"]
    assert all(w["compile_s"] < c["compile_s"] for w, c in zip(warm, rows[:2], strict=True))
    assert set(result["medians"]) == {"cold/HEAD", "cold/this tree", "warm/HEAD",
                                      "warm/this tree"}
    assert "mnist-jax-ab-" not in subprocess.run(["git", "-C", str(ROOT), "worktree", "list"],
                                                 capture_output=True, text=True).stdout


def test_the_speed_table_is_the_one_its_results_make(tmp_path):
    """README and docs/benchmarks.md show the table benchmarks.table renders from the
    results files (a hand-edited number fails here); a new results file adds its row."""
    import json
    import shutil

    from benchmarks import table

    rendered = table.render()
    root = table.ROOT
    assert rendered in (root / "README.md").read_text()
    assert rendered in (root / "docs" / "benchmarks.md").read_text()
    # A row's ratio is the peer's process over our cold one, from the file: by hand.
    zen5 = json.loads((root / "docs" / "benchmarks-zen5-process.json").read_text())["records"]
    ours = next(r["process_wall_s"] for r in zen5 if r.get("run") == "cold_cache")
    keras = next(r["process_wall_s"] for r in zen5 if r.get("stack") == "keras-jax")
    (zen5_row,) = [line for line in rendered.splitlines() if line.startswith("| AMD EPYC Zen 5")]
    assert f"**{keras / ours:.2f}x**" in zen5_row
    manifest = tmp_path / "speed.json"
    shutil.copy(table.MANIFEST, manifest)
    row = table.add_row(root / "docs" / "benchmarks-h200.json", "a GPU", manifest)
    assert row["files"] == ["docs/benchmarks-h200.json"]
    assert "| a GPU |" in table.render(manifest)
