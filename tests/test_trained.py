"""A finished run, loaded as a user loads it: `load_run` in a fresh process, `predict`,
`evaluate` and `export` from the command line; numbers checked against the report and a NumPy
forward pass."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from mnist_jax import saving
from mnist_jax.config import dense_names
from mnist_jax.errors import ConfigError
from mnist_jax.trained import load_run

from conftest import cli_env
from test_cli import run_cli, run_main


@pytest.fixture(scope="module")
def study(mnist, tmp_path_factory):
    """Two variants x two seeds, one epoch, as the CLI makes them."""
    out = tmp_path_factory.mktemp("trained") / "run"
    run_cli("experiment", "--epochs", 1, "--variants", "baseline,dropout", "--seeds", "3,5",
            "--out", out, "--data-dir", mnist.cache_dir,
            MNIST_JAX_COMPILATION_CACHE=str(tmp_path_factory.mktemp("xla-cache")))
    return out


def numpy_logits(params, images):
    """The MLP's forward pass in NumPy float64: ReLU after each hidden Dense, logits out."""
    x = np.asarray(images, np.float64)
    names = [n for n in dense_names(tuple(range(len(params) - 1)))]
    for name in names[:-1]:
        x = np.maximum(x @ params[name]["kernel"] + params[name]["bias"], 0.0)
    return x @ params["output"]["kernel"] + params["output"]["bias"]


def run_jax_export_alone(path, x: np.ndarray) -> np.ndarray:
    """A jax.export file called in a fresh, isolated process where importing mnist_jax
    fails: what it gives for `x`."""
    np.save(path.parent / "x.npy", x)
    code = ("import sys, numpy as np, jax\n"
            "sys.modules['mnist_jax'] = None  # importing it would now fail\n"
            f"f = jax.export.deserialize(open({path.name!r}, 'rb').read())\n"
            "np.save('p.npy', np.asarray(f.call(np.load('x.npy'))))\n")
    subprocess.run([sys.executable, "-I", "-c", code], cwd=path.parent, check=True,
                   env=cli_env())
    return np.load(path.parent / "p.npy")


def test_every_model_is_kept_and_listed(study):
    entries = saving.read_index(study)
    assert sorted((e["variant"], e["seed"]) for e in entries) == [
        ("baseline", 3), ("baseline", 5), ("dropout", 3), ("dropout", 5)]
    for e in entries:
        assert (study / "models" / e["file"]).is_file()


def test_load_run_in_a_fresh_process_gives_the_reports_test_numbers(study, mnist):
    code = f"""
import json, sys
from mnist_jax import load_mnist, load_run
run = load_run({str(study)!r})
m = load_mnist({str(mnist.cache_dir)!r})
out = {{f"{{v}}/{{s}}": run.evaluate(m.test_images, m.test_labels, v, s)
       for v in run.variants for s in run.seeds}}
print(json.dumps({{"out": out, "chosen": run.chosen, "seeds": run.seeds}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=cli_env(), check=True)
    got = json.loads(done.stdout)
    metrics = json.loads((study / "metrics.json").read_text())
    assert got["chosen"] == metrics["best_variant"] and got["seeds"] == [3, 5]
    for name, v in metrics["variants"].items():
        for run in v["runs"]:
            mine = got["out"][f"{name}/{run['seed']}"]
            assert mine == run["test"], (name, run["seed"])  # the same program: the same bits


def test_predict_and_probabilities_match_a_numpy_forward_pass(study, mnist):
    run = load_run(study)
    params = run.params("dropout", 5)
    reference = numpy_logits(params, mnist.test_images.reshape(-1, 784) / 255.0)
    probabilities = run.probabilities(mnist.test_images, "dropout", 5)  # uint8 (N, 28, 28)
    expected = np.exp(reference - reference.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    predicted = run.predict(mnist.test_images, "dropout", 5)
    assert np.mean(predicted == np.argmax(reference, -1)) > 0.999  # float32 vs float64 ties
    correct = int(np.sum(predicted == mnist.test_labels))
    assert correct == round(run.test("dropout", 5)["accuracy"] * 10000)  # the report's count


def test_defaults_are_the_chosen_variant_and_the_first_seed(study):
    run = load_run(study)
    metrics = json.loads((study / "metrics.json").read_text())
    assert run.model().variant.name == metrics["best_variant"] and run.model().seed == 3
    assert run.history()["val_accuracy"] == metrics["variants"][run.chosen]["runs"][0][
        "history"]["val_accuracy"]


def test_a_run_without_kept_models_is_read_from_its_checkpoint(study, tmp_path, mnist):
    old = tmp_path / "old"
    shutil.copytree(study, old)
    shutil.rmtree(old / "models")  # as a run made before models were kept
    then, now = load_run(study), load_run(old)
    for v in then.variants:
        for s in then.seeds:
            for layer, leaves in then.params(v, s).items():
                for leaf, value in leaves.items():
                    np.testing.assert_array_equal(now.params(v, s)[layer][leaf], value)


@pytest.mark.parametrize("damage, message", [
    ("no-run", "holds no run"),
    ("running", "is not finished .status: running.; finish it with: mnist-jax experiment "
                "--resume"),
    ("metrics", "metrics.json is unreadable or damaged"),
])
def test_a_directory_that_is_not_a_finished_run_gets_one_line(study, tmp_path, damage,
                                                              message):
    bad = tmp_path / "bad"
    shutil.copytree(study, bad)
    if damage == "no-run":
        (bad / "run.json").unlink()
    elif damage == "running":
        record = json.loads((bad / "run.json").read_text())
        (bad / "run.json").write_text(json.dumps({**record, "status": "running"}))
    else:
        (bad / "metrics.json").write_text("{")
    with pytest.raises(ConfigError, match=message):
        load_run(bad)


def test_unknown_variant_or_seed_names_what_there_is(study):
    run = load_run(study)
    with pytest.raises(ConfigError, match="variant 'l2' is not in the run.*'baseline', "
                                          "'dropout'"):
        run.params("l2", 3)
    with pytest.raises(ConfigError, match="seed 0 is not in the run.*its seeds are 3, 5"):
        run.params("baseline", 0)


def test_cli_evaluate_prints_the_reports_test_numbers(study, capsys, mnist):
    done = run_main(capsys, "evaluate", "--run", study, "--variant", "baseline",
                    "--data-dir", mnist.cache_dir)
    metrics = json.loads((study / "metrics.json").read_text())["variants"]["baseline"]
    rows = done.stdout.strip().splitlines()[1:]
    assert len(rows) == len(metrics["runs"]) + 1  # every seed, then their mean
    for row, run in zip(rows, metrics["runs"], strict=False):
        _, seed, loss, acc = row.split()
        assert int(seed) == run["seed"]
        assert loss == f"{run['test']['loss']:.4f}" and acc == f"{run['test']['accuracy']:.2%}"
    _, mean, loss, acc = rows[-1].split()
    assert mean == "mean" and acc == f"{metrics['test']['accuracy']:.2%}"
    assert loss == f"{metrics['test']['loss']:.4f}"


def test_cli_predict_classifies_arrays_as_the_model_does(study, tmp_path, capsys, mnist):
    np.save(tmp_path / "digits.npy", mnist.test_images[:20])
    done = run_main(capsys, "predict", "--run", study, "--seed", 5, "--json",
                    tmp_path / "digits.npy")
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    run = load_run(study)
    probabilities = run.probabilities(mnist.test_images[:20], None, 5)
    assert [r["digit"] for r in rows] == np.argmax(probabilities, -1).tolist()
    assert [r["input"] for r in rows] == [f"{tmp_path / 'digits.npy'}[{i}]" for i in range(20)]
    np.testing.assert_allclose([r["probability"] for r in rows], probabilities.max(-1),
                               rtol=1e-6)


def test_cli_export_jax_runs_without_this_project(study, tmp_path, capsys, mnist):
    target = tmp_path / "model.jax"
    run_main(capsys, "export", "--run", study, "--variant", "baseline", "--seed", 3,
             "--format", "jax", "--out", target)
    got = run_jax_export_alone(target, mnist.test_images[:300].reshape(-1, 784)
                               / np.float32(255))
    expected = load_run(study).probabilities(mnist.test_images[:300], "baseline", 3)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    again = run_main(capsys, "export", "--run", study, "--format", "jax", "--out", target,
                     check=False)
    assert again.returncode == 2 and "exists; choose another --out or add --overwrite" in \
        again.stderr


@pytest.mark.slow
def test_a_run_trained_on_four_devices_loads_on_one(mnist, tmp_path):
    """Data parallel over four (forced CPU) devices; loaded in a fresh one-device process,
    from its kept models and, as an older run, from its checkpoint: the same parameters, and
    the report's test accuracy to the image."""
    out = tmp_path / "run"
    run_cli("train", "--variant", "dropout", "--epochs", 1, "--data-parallel", 4, "--out", out,
            "--data-dir", mnist.cache_dir, "--quiet",
            XLA_FLAGS="--xla_force_host_platform_device_count=4")
    old = tmp_path / "old"
    shutil.copytree(out, old)
    shutil.rmtree(old / "models")
    code = f"""
import json, jax, numpy as np
from mnist_jax import load_mnist, load_run
assert jax.device_count() == 1
m = load_mnist({str(mnist.cache_dir)!r})
new, old = load_run({str(out)!r}), load_run({str(old)!r})
same = all(np.array_equal(new.params()[l][k], old.params()[l][k])
           for l in new.params() for k in ("kernel", "bias"))
print(json.dumps({{"same": same, "test": new.evaluate(m.test_images, m.test_labels)}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=cli_env(), check=True)
    got = json.loads(done.stdout)
    report = json.loads((out / "metrics.json").read_text())["variants"]["dropout"]["runs"][0]
    assert got["same"]
    assert round(got["test"]["accuracy"] * 10000) == round(report["test"]["accuracy"] * 10000)
    assert got["test"]["loss"] == pytest.approx(report["test"]["loss"], rel=1e-5)


def test_cli_predict_reads_digits_drawn_as_people_draw_them(study, tmp_path, capsys, mnist):
    """MNIST test digits drawn black on white, large and off-centre (PNG, JPEG, a
    transparent PNG): each classified as the model classifies the original digit."""
    from PIL import Image

    run = load_run(study)
    probabilities = run.probabilities(mnist.test_images[:200], None, 5)
    sure = [i for i in range(200) if probabilities[i].max() > 0.99][:3]
    paths = []
    for k, i in enumerate(sure):
        big = np.kron(mnist.test_images[i], np.ones((7, 7), np.uint8))  # 196 x 196
        page = np.full((320, 260), 255, np.uint8)
        page[20 + 30 * k:216 + 30 * k, 40:236] = 255 - big  # black ink on white paper
        path = tmp_path / f"digit{k}.{('png', 'jpg', 'png')[k]}"
        if k == 2:  # ink in the alpha channel, no paper at all
            rgba = np.zeros((320, 260, 4), np.uint8)
            rgba[..., 3] = 255 - page
            Image.fromarray(rgba, "RGBA").save(path)
        else:
            Image.fromarray(page).save(path)
        paths.append(path)
    done = run_main(capsys, "predict", "--run", study, "--seed", 5, *paths)
    lines = done.stdout.strip().splitlines()
    expected = np.argmax(probabilities[sure], -1)
    for line, path, digit in zip(lines, paths, expected, strict=True):
        assert line.startswith(f"{path}: {digit} (")


def test_the_readmes_python_example_runs(study, mnist, tmp_path):
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Your trained models", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.S)
    script = (block.replace('"runs/study"', repr(str(study)))
              .replace("load_mnist()", f"load_mnist({str(mnist.cache_dir)!r})")
              .replace('"dropout", 0', '"dropout", 3').replace("seed=0", "seed=3"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=tmp_path, env=cli_env())
    assert done.returncode == 0, done.stderr
    assert "'loss'" in done.stdout and "'accuracy'" in done.stdout


@pytest.fixture(scope="module")
def bf16_run(mnist, tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16") / "run"
    run_cli("train", "--variant", "baseline", "--epochs", 1, "--dtype", "bfloat16",
            "--out", out, "--data-dir", mnist.cache_dir, "--quiet")
    return out


def float32_probabilities(run_dir, images, variant=None, seed=None):
    """This project's own float32 prediction from the saved weights, as NumPy softmax of
    the logits of the MLP in float32 (also for a model trained with bfloat16 matmuls)."""
    model = load_run(run_dir).model(variant, seed)
    logits = np.asarray(model.module("float32").apply({"params": model.params}, images),
                        np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


@pytest.mark.slow
# Keras 3.15's Variable.__array__ takes no `copy` argument, which NumPy 2 deprecates; Keras
# converts each weight with np.array() when it saves a model.
@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:"
                            "DeprecationWarning:keras")
@pytest.mark.parametrize("fmt", ["keras", "onnx", "jax"])
@pytest.mark.parametrize("which", ["float32", "bfloat16"])
def test_cli_exports_are_read_back_by_their_own_runtime(fmt, which, study, bf16_run, mnist,
                                                        tmp_path, capsys):
    """`mnist-jax export` of a saved model, read by Keras 3, onnxruntime, or jax alone: the
    classes of our float32 prediction on every test image, probabilities within 1e-5; Keras's
    own `evaluate` gives the accuracy of those classes to the image."""
    run_dir, variant, seed = (study, "dropout", 5) if which == "float32" else (bf16_run, None,
                                                                               None)
    target = tmp_path / f"model.{'keras' if fmt == 'keras' else fmt}"
    run_main(capsys, "export", "--run", run_dir, "--format", fmt, "--out", target,
             *(("--variant", variant, "--seed", seed) if variant else ()))
    x = mnist.test_images.reshape(-1, 784).astype(np.float32) / np.float32(255)
    expected = float32_probabilities(run_dir, x, variant, seed)
    if fmt == "keras":
        import os

        os.environ.setdefault("KERAS_BACKEND", "jax")
        import jax
        import keras

        model = keras.saving.load_model(target)
        with jax.numpy_rank_promotion("allow"):  # Keras's own code broadcasts ranks
            got = model.predict(x, batch_size=2000, verbose=0)
            _, accuracy = model.evaluate(x, np.eye(10, dtype=np.float32)[mnist.test_labels],
                                         batch_size=2000, verbose=0)
        correct = int(np.sum(np.argmax(expected, -1) == mnist.test_labels))
        assert round(accuracy * 10000) == correct
    elif fmt == "onnx":
        import onnxruntime

        got = onnxruntime.InferenceSession(str(target)).run(None, {"images": x})[0]
    else:
        got = run_jax_export_alone(target, x)
    np.testing.assert_array_equal(np.argmax(got, -1), np.argmax(expected, -1))
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_models_swapped_on_disk_are_refused_not_returned(study, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(study, mixed)
    a, b = mixed / "models" / "baseline" / "seed_3", mixed / "models" / "dropout" / "seed_3"
    for suffix in (".safetensors", ".json"):
        tmp = a.with_suffix(".swap")
        a.with_suffix(suffix).rename(tmp)
        b.with_suffix(suffix).rename(a.with_suffix(suffix))
        tmp.rename(b.with_suffix(suffix))
    with pytest.raises(ConfigError, match="holds 'dropout' .seed 3., not 'baseline'"):
        load_run(mixed).params("baseline", 3)
