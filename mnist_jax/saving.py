"""Trained models a user keeps: each model's float32 parameters in safetensors, and a JSON card
beside them saying what the model is (architecture, the precision it was trained in, the
variant and seed, the preprocessing it expects).

A run directory's models live in models/, one pair of files per model and models/index.json
listing them; the index is written last, so a model it lists is whole. Checkpoints (orbax,
with the optimizer's state) are for resuming; these files are for using.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mnist_jax import files
from mnist_jax.config import TrainConfig, Variant, dense_names
from mnist_jax.errors import ConfigError
from mnist_jax.results import variant_from_json
from mnist_jax.rundir import MODELS

INDEX = "index.json"
FORMAT = "mnist_jax.model/1"
# What a model expects, as the card says it to people and scripts.
PREPROCESSING: Mapping[str, Any] = {
    "input": "(N, 784) float32 in [0, 1]: 28x28 grayscale images flattened row by row and "
             "scaled by 1/255",
    "convention": "MNIST's: a white digit on black, fitted into a 20x20 box and centred by its "
                  "centre of mass in the 28x28 field",
    "output": "logits (N, 10) for the digits 0-9; softmax gives the probabilities",
}

Params = dict[str, dict[str, np.ndarray]]


@dataclasses.dataclass(frozen=True, eq=False)
class SavedModel:
    """One trained model as kept: `params` {"hidden_1": {"kernel", "bias"}, ..., "output":
    {...}} of float32 NumPy arrays, and what it is (`train`: the settings it was trained
    with, its widths and dtype among them)."""

    params: Params
    variant: Variant
    seed: int
    train: TrainConfig

    @property
    def hidden(self) -> tuple[int, ...]:
        return self.train.hidden

    def module(self, dtype: str | None = None):
        """The Flax MLP these parameters were trained in, applied in inference mode (no
        dropout), with matmul operands of `dtype` (default: the precision it was trained
        in): the module that gave the run's reported numbers."""
        from mnist_jax.stacks import model_for

        train = self.train if dtype is None else dataclasses.replace(self.train, dtype=dtype)
        return model_for(train, dropout=False)


def slug(name: str) -> str:
    """A file-system-safe form of a variant's name, one per name: 'baseline' stays, and a name
    with other characters gets a digest of itself ('l2=0.001 dropout=0.2' ->
    'l2_0.001_dropout_0.2-1a2b3c4d'), so that 'a b' and 'a_b' never share a file."""
    safe = re.sub(r"[^A-Za-z0-9.+-]+", "_", name).strip("_") or "model"
    if safe == name:
        return safe
    return f"{safe}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def flat(params: Mapping[str, Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """{"hidden_1.kernel": (784, w1), ...}: safetensors' flat names, float32, C order."""
    return {f"{layer}.{leaf}": np.ascontiguousarray(np.asarray(value, np.float32))
            for layer, leaves in params.items() for leaf, value in leaves.items()}


def nested(tensors: Mapping[str, np.ndarray]) -> Params:
    """The inverse of `flat`."""
    out: Params = {}
    for key, value in tensors.items():
        layer, leaf = key.rsplit(".", 1)
        out.setdefault(layer, {})[leaf] = value
    return out


def card(variant: Variant, seed: int, train: TrainConfig, n_params: int) -> dict[str, Any]:
    """The JSON beside a model's weights."""
    return {"format": FORMAT, "variant": dataclasses.asdict(variant), "seed": seed,
            "architecture": {"input": 784, "hidden": list(train.hidden), "classes": 10,
                             "activation": "relu", "layers": list(dense_names(train.hidden))},
            "parameters": n_params, "trained_dtype": train.dtype,
            "train": dataclasses.asdict(train), "preprocessing": dict(PREPROCESSING)}


def save_model(path: str | Path, params: Mapping, variant: Variant, seed: int,
               train: TrainConfig) -> tuple[Path, Path]:
    """Writes `<path>.safetensors` and `<path>.json` atomically; returns both paths."""
    from safetensors.numpy import save

    path = Path(path)
    tensors = flat(params)
    weights, meta = path.with_suffix(".safetensors"), path.with_suffix(".json")
    # As bytes, written by us: safetensors' save_file makes its file 0600 whatever the umask.
    files.write_bytes(weights, save(tensors, metadata={"format": FORMAT}))
    n = sum(int(t.size) for t in tensors.values())
    files.write_json(meta, card(variant, seed, train, n))
    return weights, meta


def load_model(path: str | Path) -> SavedModel:
    """A model from its `.safetensors` file (or its `.json` card, or the path without either
    suffix); its card must lie beside it."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    weights, meta = path.with_suffix(".safetensors"), path.with_suffix(".json")
    try:
        info = json.loads(meta.read_text())
        tensors = load_file(str(weights))
    except FileNotFoundError as e:
        raise ConfigError(f"{e.filename}: no such file; a saved model is a .safetensors file "
                          "with its .json card beside it") from None
    except (OSError, ValueError, SafetensorError) as e:
        raise ConfigError(f"{weights}: not a readable saved model ({e})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        found = info.get("format") if isinstance(info, dict) else type(info).__name__
        raise ConfigError(f"{meta}: not a model card of this version ({found!r}, expected "
                          f"{FORMAT!r})")
    try:
        train = TrainConfig.from_dict(info["train"])
        variant = variant_from_json(info["variant"])
        seed = int(info["seed"])
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{meta} is damaged ({type(e).__name__}: {e}); save the model again, "
                          "or train it again") from None
    params = nested(tensors)
    expected = {f"{n}.{leaf}" for n in dense_names(train.hidden) for leaf in ("kernel", "bias")}
    if set(tensors) != expected:
        raise ConfigError(f"{weights} holds {sorted(tensors)}, not the layers of "
                          f"784-{'-'.join(map(str, train.hidden))}-10 its card describes")
    return SavedModel(params, variant, seed, train)


# --- a run directory's models --------------------------------------------------------------------

def _index_path(out: Path) -> Path:
    return Path(out) / MODELS / INDEX


def read_index(out: str | Path) -> list[dict[str, Any]] | None:
    """models/index.json's entries ({"variant", "seed", "file"}), or None where there is none."""
    path = _index_path(Path(out))
    if not path.is_file():
        return None
    try:
        entries = json.loads(path.read_text())["models"]
        for e in entries:
            if not (isinstance(e["variant"], str) and isinstance(e["seed"], int)
                    and isinstance(e["file"], str)):
                raise TypeError(f"entry {e!r}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path} is damaged ({type(e).__name__}: {e}); the models it lists "
                          "cannot be found: run the training again with --overwrite") from None
    return entries


def model_params(host: Params, s: int, v: int) -> Params:
    """Model (s, v) of a stack's parameters on the host, leaves (S, V, ...)."""
    return {layer: {leaf: a[s, v] for leaf, a in leaves.items()} for layer, leaves in host.items()}


def _write_index(out: Path, entries: list[dict[str, Any]]) -> None:
    files.write_json(_index_path(out), {"format": FORMAT, "models": entries})


def save_stack(out: str | Path, stack, names: Iterable[str] | None = None, *,
               write: bool = True) -> list[dict[str, Any]]:
    """Keeps the final parameters of the stack's models of the variants `names` (default:
    all), every seed, in `out`/models, adding them to its index; returns the new entries.

    Every process calls it (the parameters may be spread over hosts); only where `write` is
    true are files written.
    """
    import jax

    from mnist_jax import placement

    out = Path(out)
    wanted = None if names is None else set(names)
    chosen = [v for v, variant in enumerate(stack.variants)
              if wanted is None or variant.name in wanted]
    if not chosen:
        return []
    # Only the kept models leave the devices (a sweep's chunk may hold a thousand).
    host = placement.to_host(jax.tree.map(lambda a: a[:, np.array(chosen)],
                                          stack.state.params))  # leaves (S, len(chosen), ...)
    entries = []
    for k, v in enumerate(chosen):
        variant = stack.variants[v]
        for s, seed in enumerate(stack.seeds):
            rel = f"{slug(variant.name)}/seed_{seed}"
            params = model_params(host, s, k)
            if write:
                save_model(out / MODELS / rel, params, variant, seed, stack.config)
            entries.append({"variant": variant.name, "seed": seed,
                            "file": f"{rel}.safetensors"})
    if write and entries:
        kept = [e for e in read_index(out) or []
                if (e["variant"], e["seed"]) not in {(n["variant"], n["seed"]) for n in entries}]
        _write_index(out, kept + entries)
    return entries


def keep_only(out: str | Path, names: Iterable[str]) -> None:
    """Removes from `out`/models every model whose variant is not in `names` (a sweep keeps
    its choice and the originals); the index first, so it never lists a missing file."""
    out = Path(out)
    entries = read_index(out)
    if entries is None:
        return
    names = set(names)
    kept = [e for e in entries if e["variant"] in names]
    _write_index(out, kept)
    # Every model file the index does not list goes, those a process stopped between the
    # index and the removals left behind included.
    listed = {(out / MODELS / e["file"]).resolve() for e in kept}
    for weights in (out / MODELS).glob("*/*.safetensors"):
        if weights.resolve() not in listed:
            weights.unlink(missing_ok=True)
            weights.with_suffix(".json").unlink(missing_ok=True)
    for directory in (out / MODELS).iterdir():
        if directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()
