"""A finished run, loaded: `load_run(dir)` reads what `train`, `experiment` or `sweep` left in
their directory (config, every model's history and test metrics, the choice) and gives its
kept models to predict and evaluate with, in any process, on any devices.

Models come from models/ (mnist_jax.saving); a run made before models were kept is read from
its newest intact checkpoint instead.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mnist_jax import results as outcome
from mnist_jax import rundir, saving
from mnist_jax.errors import ConfigError
from mnist_jax.preprocessing import check_images, check_labels

History = Mapping[str, list[float]]


@dataclasses.dataclass(frozen=True, eq=False)
class TrainedRun:
    """A finished run. `results` holds every variant's (a sweep: configuration's) runs, one
    per seed, with histories and test metrics as the report gives them; `chosen` is the
    variant chosen on validation, the default wherever a variant may be named, as the first
    seed is where a seed may be. Seeds are named by their value (`seed=3`), as given to the
    run."""

    directory: Path
    command: str  # the one that made it: train, experiment or sweep
    config: Any  # ExperimentConfig or SweepConfig
    results: tuple[outcome.VariantResult, ...]
    chosen: str
    _models: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def variants(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.results)

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(self.config.seeds)

    @property
    def kept(self) -> tuple[tuple[str, int], ...]:
        """(variant, seed) of every model whose parameters the run kept."""
        entries = saving.read_index(self.directory)
        if entries is None:  # an older run: its checkpoint holds every model
            return tuple((v, s) for v in self.variants for s in self.seeds)
        return tuple((e["variant"], e["seed"]) for e in entries)

    def result(self, variant: str | None = None) -> outcome.VariantResult:
        """A variant's runs (default: the chosen one's)."""
        name = self.chosen if variant is None else variant
        for r in self.results:
            if r.name == name:
                return r
        raise ConfigError(f"variant {name!r} is not in the run in {self.directory}; it has "
                          f"{_listing(self.variants)}")

    def _run(self, variant: str | None, seed: int | None) -> outcome.Run:
        r = self.result(variant)
        seed = self.seeds[0] if seed is None else seed
        for run in r.runs:
            if run.seed == seed:
                return run
        raise ConfigError(f"seed {seed!r} is not in the run in {self.directory}; its seeds are "
                          f"{', '.join(map(str, self.seeds))}")

    def history(self, variant: str | None = None, seed: int | None = None) -> History:
        """The Keras-style per-epoch history of one model."""
        return self._run(variant, seed).history

    def test(self, variant: str | None = None, seed: int | None = None
             ) -> Mapping[str, float | None]:
        """One model's test loss, cross_entropy, penalty and accuracy, as the report gives
        them."""
        return self._run(variant, seed).test

    def model(self, variant: str | None = None, seed: int | None = None) -> saving.SavedModel:
        """One kept model: its parameters and what it is."""
        run = self._run(variant, seed)  # checks both names first
        key = (self.result(variant).name, run.seed)
        if key not in self._models:
            self._models.update(self._load(*key))
        return self._models[key]

    def params(self, variant: str | None = None, seed: int | None = None) -> saving.Params:
        """One model's final parameters: {"hidden_1": {"kernel", "bias"}, ..., "output"}."""
        return self.model(variant, seed).params

    def probabilities(self, images, variant: str | None = None, seed: int | None = None,
                      ) -> np.ndarray:
        """(N, 10) float32: softmax of one model's logits for `images` ((N, 784) or
        (N, 28, 28); uint8 is scaled by 1/255, floats must lie in [0, 1])."""

        model = self.model(variant, seed)
        images = check_images(images)
        return _probabilities(model.module(), model.params, images)

    def predict(self, images, variant: str | None = None, seed: int | None = None) -> np.ndarray:
        """(N,) int: the predicted digit of each image (see `probabilities`)."""
        return np.argmax(self.probabilities(images, variant, seed), axis=-1)

    def evaluate(self, images, labels, variant: str | None = None, seed: int | None = None,
                 ) -> dict[str, float]:
        """Loss (cross-entropy + the variant's L2 penalty, as Keras and the report compute
        it), cross_entropy, penalty and accuracy of one model on `images` (see
        `probabilities`) with `labels` (N,) in 0..9 or one-hot (N, 10)."""
        from mnist_jax import programs
        from mnist_jax.steps import Hyperparams, TrainState

        model = self.model(variant, seed)
        images = check_images(images)
        labels = check_labels(labels, len(images))
        v, hidden = model.variant, model.hidden
        state = TrainState(np.zeros((1, 1), np.int32),
                           _stacked(model.params), None,
                           Hyperparams(v.l2_vector(hidden)[None, None],
                                       v.dropout_vector(hidden)[None, None]))
        out = programs.evaluate_all_rows(state, images, labels, model=model.module(),
                                          batch_size=model.train.eval_batch_size,
                                          loss_form=model.train.loss)
        return {k: float(np.asarray(a)[0, 0]) for k, a in out.items()}

    def _load(self, variant: str, seed: int) -> dict[tuple[str, int], saving.SavedModel]:
        entries = saving.read_index(self.directory)
        if entries is not None:
            for e in entries:
                if (e["variant"], e["seed"]) == (variant, seed):
                    path = self.directory / saving.MODELS / e["file"]
                    model = saving.load_model(path)
                    if (model.variant.name, model.seed) != (variant, seed):
                        raise ConfigError(
                            f"{path} holds {model.variant.name!r} (seed {model.seed}), not "
                            f"{variant!r} (seed {seed}) as {saving.INDEX} says; the run's "
                            "models are mixed up: train it again with --overwrite")
                    return {(variant, seed): model}
            kept = sorted({e["variant"] for e in entries})
            raise ConfigError(f"the run in {self.directory} kept no model of {variant!r} "
                              f"(seed {seed}); it kept {_listing(kept)}"
                              + (" (a sweep keeps its choice and the original variants)"
                                 if self.command == "sweep" else ""))
        return _from_checkpoint(self)


def _listing(names) -> str:
    names = list(names)
    return ", ".join(map(repr, names[:12])) + (f" and {len(names) - 12} more"
                                               if len(names) > 12 else "")


def _stacked(params: saving.Params):
    return {layer: {leaf: np.asarray(a)[None, None] for leaf, a in leaves.items()}
            for layer, leaves in params.items()}


@functools.cache
def _probability_program():
    import jax

    @functools.partial(jax.jit, static_argnames=("model",))
    def run(model, params, images):
        return jax.nn.softmax(model.apply({"params": params}, images), axis=-1)

    return run


def _probabilities(model, params, images: np.ndarray, batch_size: int = 2000) -> np.ndarray:
    run = _probability_program()
    out = [np.asarray(run(model, params, images[i:i + batch_size]))
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 10), np.float32)


def _from_checkpoint(run: TrainedRun) -> dict[tuple[str, int], saving.SavedModel]:
    """Every model of an experiment made before models were kept, from its newest intact
    checkpoint, on this process's devices whatever the run was trained on."""
    from mnist_jax import checkpoint, placement, stacks

    if run.command == "sweep":
        raise ConfigError(f"the sweep in {run.directory} was made before sweeps kept their "
                          "models, and its checkpoints are gone; run it again to keep them")
    train = dataclasses.replace(run.config.train, data_parallel=1, model_parallel=1,
                                placement="auto")
    fresh = stacks.new_stack(run.config.resolve(), run.config.seeds, train)
    mgr = checkpoint.manager(run.directory / rundir.CHECKPOINTS)
    try:
        stack = checkpoint.restore(mgr, fresh)
    finally:
        mgr.close()
    if stack is None or stack.epochs_done != train.epochs:
        raise ConfigError(f"the run in {run.directory} has no checkpoint of its last epoch to "
                          "read its models from; resume it (--resume) to finish it")
    host = placement.to_host(stack.state.params)
    return {(variant.name, seed): saving.SavedModel(
        saving.model_params(host, s, v),
        variant, seed, run.config.train)
        for v, variant in enumerate(stack.variants) for s, seed in enumerate(stack.seeds)}


def load_run(directory: str | Path) -> TrainedRun:
    """The finished `train`, `experiment` or `sweep` run in `directory`. Raises ConfigError
    with one line saying what is wrong when it is not one (no run, not finished, damaged)."""
    from mnist_jax.experiment import ExperimentConfig
    from mnist_jax.sweep import SweepConfig

    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"{directory} is not a directory; give a run's directory (the --out "
                          "of train, experiment or sweep)")
    try:
        record = json.loads((directory / rundir.RUN_FILE).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{directory} holds no run (no {rundir.RUN_FILE}); give the --out of "
                          "a train, experiment or sweep") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{directory / rundir.RUN_FILE} is unreadable ({e})") from None
    command = record.get("command", "experiment")
    status = record.get("status")
    metrics_path = directory / "metrics.json"
    if status != "complete" or not metrics_path.is_file():
        raise ConfigError(f"the run in {directory} is not finished (status: {status}); finish "
                          f"it with: mnist-jax {command} --resume {directory}")
    try:
        metrics = json.loads(metrics_path.read_text())
        if command == "sweep":
            config = SweepConfig.from_dict(record["config"])
            found = metrics["configurations"]
            chosen = metrics["selection"]["configuration"]
        else:
            config = ExperimentConfig.from_dict(record["config"])
            found = metrics["variants"]
            chosen = metrics["best_variant"]
        outcomes = tuple(outcome.VariantResult.from_json(r) for r in found.values())
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{metrics_path} is unreadable or damaged ({type(e).__name__}: {e}); "
                          f"run it again with --overwrite") from None
    return TrainedRun(directory, command, config, outcomes, chosen)
