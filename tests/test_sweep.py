"""Sweeps: the points of each search, the choice on validation only, the paired comparisons,
models split over devices, divergence of one model among many, resume, the files, TensorBoard."""

import dataclasses
import json
import math
import re

import jax
import numpy as np
import pytest

from mnist_jax import fit, kernels, optim, placement, programs, saving, stacks, sweep
from mnist_jax.config import VARIANTS, TrainConfig, Variant

from test_cli import run_main

ON_GRID = ("baseline", "dropout", "l2_dropout")  # the original variants the default grid holds


@pytest.fixture(scope="module")
def small(splits):
    """3000 training, 1000 validation and 1000 test images: a sweep in seconds."""
    return fit.Splits(splits.train_images[:3000], splits.train_labels[:3000],
                      splits.val_images[:1000], splits.val_labels[:1000],
                      splits.test_images[:1000], splits.test_labels[:1000])


def test_the_default_grid_holds_the_original_variants_once():
    config = sweep.SweepConfig()
    points = sweep.with_originals(sweep.grid(config), config)
    # 4 L2 x 3 dropout = 12 grid points; baseline (0, 0), dropout (0, 0.45) and l2_dropout
    # (1e-3 on both kernels, 0.45) are three of them; l2 (1e-3 on hidden_1 only) is not.
    assert len(points) == 4 + 12 - 3
    names = [p.name for p in points]
    assert names[:4] == list(VARIANTS) and len(set(names)) == len(names)
    assert "l2=0.001 dropout=0 lr=0.001" in names  # both kernels: not the original l2
    assert "l2=0 dropout=0.45 lr=0.001" not in names  # that one is `dropout`
    assert all(p.learning_rate == 1e-3 for p in points)
    config = dataclasses.replace(config, learning_rate=(1e-3, 3e-3), originals=False)
    assert len(sweep.with_originals(sweep.grid(config), config)) == 24


def test_random_points_are_drawn_from_the_search_seed_within_the_ranges():
    config = sweep.SweepConfig(search="random", l2=(1e-6, 1e-2), dropout=(0.1, 0.5),
                               learning_rate=(1e-4, 1e-2), samples=2000, search_seed=3)
    points = sweep.random_points(config)
    again = sweep.random_points(config)
    other = sweep.random_points(dataclasses.replace(config, search_seed=4))
    assert [p.name for p in points] == [p.name for p in again]
    assert [p.l2 for p in points] != [p.l2 for p in other]
    l2 = np.array([p.l2 for p in points])
    drop = np.array([p.dropout for p in points])
    lr = np.array([p.learning_rate for p in points])
    assert l2.min() >= 1e-6 and l2.max() <= 1e-2 and drop.min() >= 0.1 and drop.max() <= 0.5
    # Log-uniform: each decade of L2 (4 of them) gets a quarter of the points; uniform
    # dropout: each tenth of its range a tenth. A linear L2 draw would put 90% in the top one.
    decades = np.histogram(np.log10(l2), bins=4, range=(-6, -2))[0] / len(l2)
    assert np.all(np.abs(decades - 0.25) < 0.04), decades
    tenths = np.histogram(drop, bins=10, range=(0.1, 0.5))[0] / len(drop)
    assert np.all(np.abs(tenths - 0.1) < 0.03), tenths
    assert abs(np.mean(np.log10(lr)) - (-3)) < 0.05
    fixed = sweep.random_points(dataclasses.replace(config, learning_rate=(2e-3,), samples=5))
    assert {p.learning_rate for p in fixed} == {2e-3}


def _result(name: str, val: list[float], test: list[float], diverged=()):
    return {"variant": dataclasses.asdict(Variant(name)),
            "runs": [{"seed": s, "history": {"accuracy": [0.9], "val_accuracy": [v]},
                      "test": {"accuracy": t, "loss": 0.1}}
                     for s, (v, t) in enumerate(zip(val, test, strict=True))],
            "diverged": list(diverged)}


def test_the_choice_is_made_on_validation_never_on_test():
    results = {"baseline": _result("baseline", [0.970, 0.972], [0.980, 0.982]),
               "a": _result("a", [0.975, 0.977], [0.970, 0.971]),  # best validation, worse test
               "b": _result("b", [0.990, 0.991], [0.999, 0.999], diverged=[{"seed": 1}])}
    chosen = sweep.assemble(sweep.SweepConfig(), results)["selection"]
    assert chosen["configuration"] == "a" and chosen["on"] == "val_accuracy"
    assert chosen["value"] == pytest.approx(0.976)
    assert chosen["excluded_diverged"] == ["b"] and chosen["ranking"] == ["a", "baseline"]


def test_the_chosen_is_compared_with_each_original_present():
    a = [0.981, 0.979, 0.983, 0.983]
    base = [0.978, 0.977, 0.979, 0.980]
    results = {"x": _result("x", a, a), "baseline": _result("baseline", base, base),
               "dropout": _result("dropout", a, base)}
    out = {c["b"]: c for c in sweep.assemble(sweep.SweepConfig(), results)["comparisons"]}
    assert set(out) == {"baseline", "dropout"} and {c["a"] for c in out.values()} == {"x"}
    assert out["baseline"]["mean"] == pytest.approx(0.003)  # by hand: 0.003, 0.002, 0.004, 0.003


def test_models_split_over_four_devices_train_as_on_one(small):
    """The variants axis sharded over the 4 test devices: every model's weights bit for bit
    as unsharded with the same products (split models leave the kernel gradient's transpose
    to XLA, `kernels.Dot`), its history to float rounding, and the compiled
    epoch has no collectives (each device trains its share)."""
    assert jax.device_count() == 4
    config = sweep.SweepConfig(l2=(0.0, 1e-4), dropout=(0.0, 0.2, 0.45, 0.3),
                               learning_rate=(1e-3, 2e-3), originals=False)
    points = sweep.grid(config)  # 16
    runs = {}
    for mp in (1, 4):
        train = TrainConfig(epochs=2, placement="stack", model_parallel=mp)
        stack = fit.new_stack(points, (0, 1), train, 4000)
        assert stack.model.dot_general is (kernels.RowMajorDot if mp == 1 else kernels.Dot)
        stack.model = stack.model.clone(dot_general=kernels.Dot)
        fit.fit(stack, small, progress=False, halt_on_divergence=False)
        runs[mp] = stack
    assert runs[4].state.params["hidden_1"]["kernel"].sharding.spec[1] == placement.MODELS_AXIS
    # The weights bit for bit; the epoch's mean training loss, a sum XLA vectorises over
    # the models a device holds, may differ in its last bit (measured: 1 ulp, one model).
    for a, b in zip(jax.tree.leaves(placement.to_host(runs[4].state)),
                    jax.tree.leaves(runs[1].state), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    for p in points:
        for key, values in runs[1].histories[p.name][1].items():
            assert runs[4].histories[p.name][1][key] == pytest.approx(values, rel=1e-6, abs=0)
    assert runs[1].histories[points[0].name] != runs[1].histories[points[-1].name]

    stack = runs[4]
    mesh = placement.models_mesh(4)
    epoch = programs.compile_epoch(
        placement.place_state(stack.state, stack.config), placement.put(stack.keys, mesh),
        stacks.epoch_data(small, mesh), jax.numpy.asarray(0, jax.numpy.int32), model=stack.model,
        tx=optim.for_config(stack.config), batch_size=128,
        batch_sharding=None, loss_form="logits", halt_on_divergence=False,
        models_sharding=placement.models_sharding(mesh))
    collectives = re.findall(r"all-gather|all-reduce|all-to-all|collective-permute|"
                             r"reduce-scatter", epoch.as_text())
    assert not collectives


def test_a_diverging_model_stops_alone_and_keeps_its_last_good_state(small):
    base = VARIANTS["baseline"]
    points = [base, dataclasses.replace(base, name="hot", learning_rate=1e4)]
    train = TrainConfig(epochs=2, placement="stack")
    stack = fit.new_stack(points, (0,), train, 4000)
    fit.fit(stack, small, progress=False, halt_on_divergence=False)
    alone = fit.new_stack([base], (0,), dataclasses.replace(train, placement="sequential"), 4000)
    fit.fit(alone, small, progress=False)
    assert [d["variant"] for d in stack.diverged] == ["hot"]
    assert stack.diverged[0]["epoch"] == 1 and stack.diverged[0]["step"] >= 1
    assert stack.histories["baseline"][0]["val_accuracy"] == pytest.approx(
        alone.histories["baseline"][0]["val_accuracy"], abs=1e-6)
    # Frozen at its first bad step: the optimizer took only the steps before it (in epoch 2,
    # its first step is bad again); the other model took all 2 x 24.
    steps = np.asarray(stack.state.step)
    assert steps[0, 0] == 2 * 24 and steps[0, 1] == stack.diverged[0]["step"] - 1
    for leaf in jax.tree.leaves(stack.state.params):  # checkpointable: finite
        assert np.isfinite(np.asarray(leaf)).all()
    with pytest.raises(Exception, match="diverged"):  # the study's default: stop
        fit.fit(fit.new_stack(points, (0,), train, 4000), small, progress=False)


def test_tpe_asks_a_batch_and_replays_the_same_points():
    pytest.importorskip("optuna")
    config = sweep.SweepConfig(search="tpe", l2=(1e-6, 1e-2), dropout=(0.0, 0.6), samples=8)
    told = []
    first = sweep.TPE(config)
    for _ in range(3):
        points = first.ask(4)
        assert len({p.name for p in points}) == 4
        assert all(1e-6 <= p.l2 <= 1e-2 and 0 <= p.dropout <= 0.6 for p in points)
        results = {p.name: _result(p.name, [0.9 + p.dropout / 10], [0.9]) for p in points}
        first.tell(points, results)
        told.append((points, results))
    replay = sweep.TPE(config)
    for points, results in told:
        assert [p.name for p in replay.ask(4)] == [p.name for p in points]
        replay.tell(points, results)
    assert [p.name for p in replay.ask(2)] == [p.name for p in first.ask(2)]
    assert len(first.study.trials) == 14


@pytest.fixture(scope="module")
def swept(mnist, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "run"
    config = sweep.SweepConfig(l2=(0.0, 1e-4), dropout=(0.0, 0.45), seeds=(0, 1), chunk=3,
                               train=TrainConfig(epochs=1))
    metrics = sweep.sweep_and_report(config, out, data_dir=mnist.cache_dir, progress=False,
                                     echo=lambda _: None, tensorboard=True)
    return out, config, metrics


def test_a_sweep_writes_its_choice_statistics_and_figures(swept):
    out, config, metrics = swept
    saved = json.loads((out / "metrics.json").read_text())
    confs = saved["configurations"]
    # 4 originals + (0, 1e-4) x (0, 0.45) minus baseline and dropout = 6, in chunks of 3.
    assert list(confs)[:4] == list(VARIANTS) and len(confs) == 6
    assert sorted(p.name for p in (out / "chunks").iterdir()) == ["0000.json", "0001.json"]
    # The choice, recomputed from the histories: the best mean final validation accuracy.
    means = {n: np.mean([r["history"]["val_accuracy"][-1] for r in c["runs"]])
             for n, c in confs.items()}
    assert saved["selection"]["configuration"] == max(means, key=means.get)
    assert all(len(c["runs"]) == 2 and c["stats"]["test_accuracy"]["n"] == 2
               for c in confs.values())
    chosen = saved["selection"]["configuration"]
    best = max((n for n in confs if n not in VARIANTS), key=means.get)
    assert saved["best_searched"] == best
    # The chosen against every other original, then the best non-original against the
    # baseline, unless it is the chosen.
    assert [(c["a"], c["b"]) for c in saved["comparisons"]] == [
        (chosen, n) for n in VARIANTS if n != chosen] + (
        [(best, "baseline")] if best != chosen else [])
    # A sweep keeps the models of the originals and of its choice, no others.
    assert {(e["variant"], e["seed"]) for e in saving.read_index(out)} == {
        (n, s) for n in {*VARIANTS, chosen} for s in (0, 1)}
    report = (out / "report.md").read_text()
    assert f"**Chosen: `{saved['selection']['configuration']}`**" in report
    assert "the test set was not used to choose" in report
    assert "figures/sweep_heatmap_0.png" in report and (out / "figures/sweep_heatmap_0.png"
                                                        ).stat().st_size > 10_000
    rows = (out / "sweep.csv").read_text().splitlines()
    assert len(rows) == 7 and rows[0].startswith("name,l2,")
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    assert not list((out / "checkpoints").glob("chunk_*"))  # dropped once a chunk is saved


def test_tensorboard_events_read_back_with_hparams(swept):
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    from tensorboard.plugins.hparams import plugin_data_pb2

    out, _, metrics = swept
    name = "l2=0.0001 dropout=0.45 lr=0.001"
    run = metrics["configurations"][name]["runs"][1]
    acc = ea.EventAccumulator(str(out / "tensorboard" / "l2=0.0001,dropout=0.45,lr=0.001"
                                  / "seed_1"), size_guidance={ea.SCALARS: 0})
    acc.Reload()
    got = [(e.step, e.value) for e in acc.Scalars("epoch/val_accuracy")]
    assert got == [(1, pytest.approx(run["history"]["val_accuracy"][0], abs=1e-7))]
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_start_info"]).session_start_info.hparams
    assert start["l2"].number_value == pytest.approx(1e-4)
    assert start["dropout"].number_value == pytest.approx(0.45)
    assert start["seed"].number_value == 1
    assert start["l2_layers"].string_value == "hidden_1+hidden_2"
    assert "hparams/val_accuracy" in acc.Tags()["scalars"]


def test_a_damaged_chunk_file_is_set_aside_and_trained_again(swept, tmp_path, small):
    out, _, _ = swept
    config = sweep.SweepConfig(l2=(0.0,), dropout=(0.0,), originals=False,
                               train=TrainConfig(epochs=1))
    first = sweep.run_sweep(config, small, tmp_path, progress=False, echo=lambda _: None)
    path = tmp_path / "chunks" / "0000.json"
    record = json.loads(path.read_text())
    record["results"]["l2=0 dropout=0 lr=0.001"]["runs"][0]["test"]["accuracy"] = 1.0
    path.write_text(json.dumps(record))
    said = []
    again = sweep.run_sweep(config, small, tmp_path, resume=True, progress=False,
                            echo=said.append)
    assert any("does not match its SHA-256 digest" in s for s in said), said
    assert (tmp_path / "chunks" / "0000.json.damaged").exists()
    for name, result in first.items():  # trained again, bit for bit
        assert again[name]["runs"] == result["runs"]


def test_sweep_settings_are_checked_before_any_work(tmp_path, capsys):
    done = run_main(capsys, "sweep", "--l2-layers", "hidden_3", "--out", tmp_path / "o",
                    check=False)
    assert done.returncode == 2 and "--l2-layers hidden_3: name one or more of" in done.stderr
    assert not (tmp_path / "o").exists()


def test_a_sweep_with_weight_decay_gives_every_point_the_same_numbers_in_any_chunk(small,
                                                                                 tmp_path):
    """A decay axis: whether a chunk's optimizer decays is the sweep's decision, not its
    points', so a point without decay (here the originals) gets the same bits whichever
    points share its chunk (one chunk of 6 or chunks of 1, some with no decayed point)."""
    results = []
    for chunk in (0, 1):
        config = sweep.SweepConfig(l2=(0.0,), dropout=(0.0,), weight_decay=(0.0, 0.1),
                                   chunk=chunk, train=TrainConfig(epochs=1))
        results.append(sweep.run_sweep(config, small, tmp_path / str(chunk), progress=False,
                                       echo=lambda _: None))
    assert list(results[0]) == ["baseline", "l2", "dropout", "l2_dropout",
                                "l2=0 dropout=0 lr=0.001 wd=0.1"]
    for name in results[0]:
        assert results[0][name]["runs"] == results[1][name]["runs"], name


def test_auto_chunk_fits_memory_and_the_device_split():
    config = sweep.SweepConfig(seeds=(0, 1, 2), train=TrainConfig(model_parallel=4))
    size = sweep.auto_chunk(config, 1000)
    assert size % 4 == 0 and 4 <= size <= math.ceil(sweep.MAX_MODELS_PER_CHUNK / 3)
    assert sweep.auto_chunk(dataclasses.replace(config, search="tpe"), 1000) == 8


# --- long sweeps survive (slow: each a few CLI runs) ---------------------------------------------

SWEEP = ("sweep", "--l2", "0,1e-4", "--dropout", "0,0.2", "--no-originals", "--chunk", 2,
         "--epochs", 3, "--seeds", "0,1", "--quiet", "--checkpoint-every", 0)


@pytest.fixture(scope="module")
def sweep_env(tmp_path_factory):
    return {"MNIST_JAX_COMPILATION_CACHE": str(tmp_path_factory.mktemp("xla-cache"))}


@pytest.fixture(scope="module")
def sweep_reference(mnist, tmp_path_factory, sweep_env):
    from test_cli import run_cli

    out = tmp_path_factory.mktemp("sweep-reference") / "run"
    run_cli(*SWEEP, "--out", out, "--data-dir", mnist.cache_dir, **sweep_env)
    return out


def _start_sweep(out, mnist, env):
    import subprocess
    import sys

    from conftest import cli_env

    return subprocess.Popen([sys.executable, "-m", "mnist_jax.cli", *map(str, SWEEP), "--out",
                             str(out), "--data-dir", str(mnist.cache_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env(**env))


def _wait_for(path, process, timeout=180):
    import time

    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def _assert_same_sweep(out, reference):
    got, want = (json.loads((d / "metrics.json").read_text()) for d in (out, reference))
    assert list(got["configurations"]) == list(want["configurations"])
    for name, c in want["configurations"].items():
        assert got["configurations"][name]["runs"] == c["runs"], name  # floats exactly
    assert got["selection"] == want["selection"]


@pytest.mark.slow
@pytest.mark.parametrize("wait_for", ["checkpoints/chunk_0000/1", "checkpoints/chunk_0001/2"])
def test_a_sweep_killed_with_sigkill_resumes_bitwise(mnist, tmp_path, sweep_env,
                                                     sweep_reference, wait_for):
    """Killed mid-chunk (in the first chunk, and in the second after the first was saved):
    the resumed sweep ends bit for bit as one never interrupted."""
    import signal

    from test_cli import run_cli

    out = tmp_path / "run"
    process = _start_sweep(out, mnist, sweep_env)
    _wait_for(out / wait_for, process)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    done = run_cli("sweep", "--resume", out, "--data-dir", mnist.cache_dir, **sweep_env)
    if "chunk_0001" in wait_for:
        assert "chunk 1 of 2: finished before" in done.stderr
    assert "resuming after epoch" in done.stderr
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    _assert_same_sweep(out, sweep_reference)


@pytest.mark.slow
def test_sigterm_stops_a_sweep_after_the_epoch_and_it_resumes(mnist, tmp_path, sweep_env,
                                                              sweep_reference):
    import signal

    from test_cli import run_cli

    out = tmp_path / "run"
    process = _start_sweep(out, mnist, sweep_env)
    _wait_for(out / "checkpoints/chunk_0000/1", process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert f"resume with: mnist-jax sweep --resume {out}" in stderr and "Traceback" not in stderr
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "interrupted" and record["signal"] == "SIGTERM"
    run_cli("sweep", "--resume", out, "--data-dir", mnist.cache_dir, "--quiet", **sweep_env)
    _assert_same_sweep(out, sweep_reference)


def test_train_writes_tensorboard_scalars_per_epoch(mnist, tmp_path, capsys):
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    out = tmp_path / "run"
    run_main(capsys, "train", "--variant", "dropout", "--epochs", 2, "--out", out,
             "--data-dir", mnist.cache_dir, "--tensorboard", "--quiet", "--no-compilation-cache")
    history = json.loads((out / "metrics.json").read_text())["variants"]["dropout"]["history"]
    acc = ea.EventAccumulator(str(out / "tensorboard" / "dropout" / "seed_0"),
                              size_guidance={ea.SCALARS: 0})
    acc.Reload()
    for key in ("loss", "val_accuracy"):
        got = [(e.step, e.value) for e in acc.Scalars(f"epoch/{key}")]
        assert got == [(i + 1, pytest.approx(v, abs=1e-7)) for i, v in enumerate(history[key])]


def test_resuming_with_the_wrong_command_names_the_right_one(swept, tmp_path, capsys):
    out, _, _ = swept
    done = run_main(capsys, "experiment", "--resume", out, check=False)
    assert done.returncode == 2
    assert f"holds a run of `mnist-jax sweep`; resume it with: mnist-jax sweep --resume {out}" \
        in done.stderr
    experiment_run = tmp_path / "run"
    experiment_run.mkdir()
    (experiment_run / "run.json").write_text(json.dumps({"command": "train", "config": {}}))
    done = run_main(capsys, "sweep", "--resume", experiment_run, check=False)
    assert done.returncode == 2 and "resume it with: mnist-jax train --resume" in done.stderr


def test_a_sweep_over_architectures_trains_each_shape_as_its_own_sweep(small, tmp_path):
    """Two shapes: a stack per shape (no chunk mixes them), every configuration and original
    at each, named by its shape, and each shape's models bit for bit those of a sweep of that
    shape alone; one choice over both; the chosen compared with the originals of both."""
    both = sweep.SweepConfig(l2=(0.0, 1e-4), dropout=(0.0,), seeds=(0, 1), chunk=3,
                             train=TrainConfig(epochs=1), architectures=((16,), (24, 8)))
    results = sweep.run_sweep(both, small, tmp_path / "both", progress=False,
                              echo=lambda _: None)
    names = [f"{a} {n}" for a in ("16", "24-8") for n in
             ("baseline", "l2", "dropout", "l2_dropout", "l2=0.0001 dropout=0 lr=0.001")]
    assert list(results) == names
    for name, r in results.items():
        assert r["hidden"] == ([16] if name.startswith("16 ") else [24, 8])
    for path in sorted((tmp_path / "both" / "chunks").glob("*.json")):
        shapes = {p.split(" ")[0] for p in json.loads(path.read_text())["points"]}
        assert len(shapes) == 1, path
    alone = sweep.run_sweep(both.at((24, 8)), small, tmp_path / "alone", progress=False,
                            echo=lambda _: None)
    for name, r in alone.items():
        assert results[f"24-8 {name}"]["runs"] == r["runs"], name
    metrics = sweep.assemble(both, results)
    chosen = metrics["selection"]["configuration"]
    assert chosen == max(names, key=lambda n: np.mean(
        [run["history"]["val_accuracy"][-1] for run in results[n]["runs"]]))
    # The baseline is a grid point of each shape (L2 0, dropout 0), named by its shape.
    assert metrics["configurations"]["24-8 baseline"]["grid_point"] == \
        "24-8 l2=0 dropout=0 lr=0.001"
    compared = {c["b"] for c in metrics["comparisons"]}
    assert compared == {n for n in names[:4] + names[5:9] if n != chosen}
    assert sweep.original_of("24-8 l2_dropout") == "l2_dropout"
    assert sweep.original_of("24-8 l2=0.0001 dropout=0 lr=0.001") is None


def test_the_best_searched_point_is_compared_with_the_baseline_even_when_not_chosen():
    """The baseline is chosen on validation; the best point that is no original is still
    compared with it, and every p-value is Holm-adjusted over the comparisons reported."""
    base = [0.981, 0.979, 0.983, 0.983]
    x = [0.978, 0.977, 0.979, 0.980]
    y = [0.970, 0.972, 0.971, 0.969]
    results = {"baseline": _result("baseline", base, base), "x": _result("x", x, x),
               "y": _result("y", y, y), "dropout": _result("dropout", y, base)}
    metrics = sweep.assemble(sweep.SweepConfig(), results)
    assert metrics["selection"]["configuration"] == "baseline"
    pairs = [(c["a"], c["b"]) for c in metrics["comparisons"]]
    assert pairs == [("baseline", "dropout"), ("x", "baseline")]
    p = [c["p"] for c in metrics["comparisons"]]
    low, high = sorted(p)  # Holm for two by hand: the smaller times 2, then the larger
    by_hand = {low: min(1, 2 * low), high: min(1, max(2 * low, high))}
    assert [c["p_holm"] for c in metrics["comparisons"]] == pytest.approx(
        [by_hand[x] for x in p])


def test_a_sweep_keeps_only_the_models_of_its_choice_as_the_best_moves(small, tmp_path):
    """Chunks of one, learning rates rising (the best so far moves from chunk to chunk at one
    epoch): the models kept at the end are the choice's, every seed, none of those it beat."""
    config = sweep.SweepConfig(l2=(0.0,), dropout=(0.0,), learning_rate=(1e-4, 1e-3, 3e-3),
                               seeds=(0, 1), originals=False, chunk=1,
                               train=TrainConfig(epochs=1))
    said = []
    results = sweep.run_sweep(config, small, tmp_path, progress=False, echo=said.append)
    chosen = sweep.assemble(config, results)["selection"]["configuration"]
    assert chosen != next(iter(results))  # the best did move (else this tests nothing)
    assert {(e["variant"], e["seed"]) for e in saving.read_index(tmp_path)} == {
        (chosen, 0), (chosen, 1)}
    kept = sorted(p.relative_to(tmp_path / "models").as_posix()
                  for p in (tmp_path / "models").rglob("*.safetensors"))
    assert kept == [f"{saving.slug(chosen)}/seed_{s}.safetensors" for s in (0, 1)]
    model = saving.load_model(tmp_path / "models" / kept[1])
    assert model.seed == 1 and model.variant.name == chosen and model.hidden == (256, 256)


def test_a_diverged_original_is_not_compared():
    """Its test accuracy is chance (argmax of NaN), not a result: no pair, no p-value."""
    a = [0.981, 0.979, 0.983, 0.983]
    base = [0.978, 0.977, 0.979, 0.980]
    results = {"x": _result("x", a, a), "baseline": _result("baseline", base, base),
               "dropout": _result("dropout", base, [0.1, 0.1, 0.1, 0.1],
                                  diverged=[{"seed": 0}])}
    metrics = sweep.assemble(sweep.SweepConfig(), results)
    assert [(c["a"], c["b"]) for c in metrics["comparisons"]] == [("x", "baseline")]


def test_a_running_sweep_writes_tensorboard_events_after_every_epoch(small, tmp_path):
    """run_sweep alone (no final rewrite): each chunk's models have their epochs already."""
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    from mnist_jax import tensorboard as tb

    config = sweep.SweepConfig(l2=(0.0, 1e-4), dropout=(0.0,), originals=False, chunk=1,
                               train=TrainConfig(epochs=2))
    results = sweep.run_sweep(config, small, tmp_path, progress=False, echo=lambda _: None,
                              tensorboard=True)
    for name, r in results.items():
        acc = ea.EventAccumulator(str(tmp_path / tb.DIRECTORY / tb.run_name(name) / "seed_0"),
                                  size_guidance={ea.SCALARS: 0})
        acc.Reload()
        got = [(e.step, e.value) for e in acc.Scalars("epoch/val_accuracy")]
        want = r["runs"][0]["history"]["val_accuracy"]
        assert got == [(i + 1, pytest.approx(v, abs=1e-7)) for i, v in enumerate(want)]


def test_the_heatmaps_resolution_is_two_binomial_proportions_apart():
    metrics = {"data": {"validation": 18000}, "config": {"seeds": [0, 1, 2]},
               "selection": {"on": "val_accuracy"},
               "configurations": {n: {"diverged": [], "stats": {"val_accuracy": {"mean": m}}}
                                  for n, m in (("a", 0.97), ("b", 0.98))}}
    # By hand: p = 0.975 over 54,000 validation images: 1.96 * sqrt(2 * .975 * .025 / 54000).
    assert sweep._resolution(metrics) == pytest.approx(0.0018623, rel=1e-4)
