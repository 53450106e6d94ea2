"""Kept models: safetensors files any reader opens, their cards, a run's index of them."""

import json
import os

import numpy as np
import pytest
from safetensors import safe_open

from mnist_jax import saving
from mnist_jax.config import TrainConfig, Variant, dense_names
from mnist_jax.errors import ConfigError


def random_params(hidden, seed=0):
    rng = np.random.default_rng(seed)
    sizes = (784, *hidden, 10)
    return {name: {"kernel": rng.normal(size=(a, b)).astype(np.float32),
                   "bias": rng.normal(size=(b,)).astype(np.float32)}
            for name, a, b in zip(dense_names(hidden), sizes[:-1], sizes[1:], strict=True)}


VARIANT = Variant("l2[l2=0.0003]", l2=3e-4, l2_layers=("hidden_1",))


def test_weights_are_plain_safetensors_any_reader_opens(tmp_path):
    params = random_params((32, 16))
    weights, card = saving.save_model(tmp_path / "m", params, VARIANT, 7,
                                      TrainConfig(hidden=(32, 16), dtype="bfloat16"))
    # safetensors' own reader, not ours: the layer.leaf names, float32, the same bytes.
    with safe_open(str(weights), framework="numpy") as f:
        assert set(f.keys()) == {f"{n}.{leaf}" for n in ("hidden_1", "hidden_2", "output")
                                 for leaf in ("kernel", "bias")}
        for key in f.keys():
            layer, leaf = key.split(".")
            got = f.get_tensor(key)
            assert got.dtype == np.float32
            assert got.tobytes() == params[layer][leaf].tobytes()
    info = json.loads(card.read_text())
    assert info["architecture"]["hidden"] == [32, 16]
    assert info["trained_dtype"] == "bfloat16" and info["seed"] == 7
    assert info["parameters"] == 784 * 32 + 32 + 32 * 16 + 16 + 16 * 10 + 10
    assert "1/255" in info["preprocessing"]["input"]
    assert "centre of mass" in info["preprocessing"]["convention"]


def test_a_saved_model_is_its_float32_parameters_and_little_else(tmp_path):
    params = random_params((256, 256))  # the study's 269,322
    weights, _ = saving.save_model(tmp_path / "m", params, VARIANT, 0, TrainConfig())
    assert 4 * 269322 < weights.stat().st_size < 4 * 269322 + 1024


def test_load_model_gives_back_what_was_saved(tmp_path):
    params = random_params((8, 8, 8))
    train = TrainConfig(hidden=(8, 8, 8), loss="clipped")
    saving.save_model(tmp_path / "m", params, VARIANT, 3, train)
    model = saving.load_model(tmp_path / "m.safetensors")
    assert model.variant == VARIANT and model.seed == 3 and model.train == train
    for layer in params:
        for leaf in ("kernel", "bias"):
            np.testing.assert_array_equal(model.params[layer][leaf], params[layer][leaf])
    assert model.module().hidden == (8, 8, 8)


def test_load_model_refuses_a_card_that_does_not_fit(tmp_path):
    saving.save_model(tmp_path / "m", random_params((8,)), VARIANT, 0, TrainConfig(hidden=(8,)))
    card = json.loads((tmp_path / "m.json").read_text())
    card["train"]["hidden"] = [8, 8]
    (tmp_path / "m.json").write_text(json.dumps(card))
    with pytest.raises(ConfigError, match="not the layers of 784-8-8-10"):
        saving.load_model(tmp_path / "m.safetensors")
    (tmp_path / "m.json").unlink()
    with pytest.raises(ConfigError, match=r"m\.json: no such file"):
        saving.load_model(tmp_path / "m.safetensors")


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_keep_the_users_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        weights, card = saving.save_model(tmp_path / "m", random_params((4,)), VARIANT, 0,
                                          TrainConfig(hidden=(4,)))
    finally:
        os.umask(old)
    for path in (weights, card):  # as open(..., "w") makes them, colleagues can read a run
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_keep_only_leaves_the_index_listing_whole_files(tmp_path):
    out = tmp_path / "run"
    entries = []
    for name in ("baseline", "l2=0.001 dropout=0.2"):
        for seed in (0, 1):
            rel = f"{saving.slug(name)}/seed_{seed}"
            saving.save_model(out / "models" / rel, random_params((4,)), Variant(name), seed,
                              TrainConfig(hidden=(4,)))
            entries.append({"variant": name, "seed": seed, "file": f"{rel}.safetensors"})
    saving._write_index(out, entries)
    saving.keep_only(out, {"baseline"})
    assert [(e["variant"], e["seed"]) for e in saving.read_index(out)] == [("baseline", 0),
                                                                           ("baseline", 1)]
    assert sorted(p.name for p in (out / "models").iterdir()) == ["baseline", "index.json"]
    # One file per name: a name with characters a file name cannot hold gets its digest.
    assert saving.slug("baseline") == "baseline"
    assert saving.slug("l2=0.001 dropout=0.2").startswith("l2_0.001_dropout_0.2-")
    assert len({saving.slug(n) for n in ("a b", "a=b", "a_b")}) == 3


def test_keep_only_removes_what_an_interrupted_prune_left(tmp_path):
    """A process stopped between writing the index and removing the files: the next prune
    removes the files the index no longer lists."""
    out = tmp_path / "run"
    for name in ("baseline", "dropout"):
        saving.save_model(out / "models" / name / "seed_0", random_params((4,)), Variant(name),
                          0, TrainConfig(hidden=(4,)))
    saving._write_index(out, [{"variant": "baseline", "seed": 0,
                               "file": "baseline/seed_0.safetensors"}])  # dropout's left over
    saving.keep_only(out, {"baseline"})
    assert sorted(p.name for p in (out / "models").iterdir()) == ["baseline", "index.json"]


def test_a_damaged_index_or_card_gets_one_line(tmp_path):
    out = tmp_path / "run"
    (out / "models").mkdir(parents=True)
    (out / "models" / "index.json").write_text('{"models": [{"variant": 1}]}')
    with pytest.raises(ConfigError, match=r"index.json is damaged \(TypeError"):
        saving.read_index(out)
    saving.save_model(tmp_path / "m", random_params((4,)), VARIANT, 0, TrainConfig(hidden=(4,)))
    card = json.loads((tmp_path / "m.json").read_text())
    del card["train"]
    (tmp_path / "m.json").write_text(json.dumps(card))
    with pytest.raises(ConfigError, match=r"m\.json is damaged \(KeyError"):
        saving.load_model(tmp_path / "m.safetensors")
