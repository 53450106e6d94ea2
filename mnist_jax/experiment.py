"""The study: explore MNIST, train every variant (and seed) together, evaluate, report."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from mnist_jax import fit, placement, report, results, rundir, runtime, saving
from mnist_jax.config import (
    DROPOUT,
    L2,
    VARIANTS,
    TrainConfig,
    Variant,
    check_decay_used,
    check_regularisation,
    check_seeds,
    select_variants,
)
from mnist_jax.data import MNIST
from mnist_jax.errors import ConfigError
from mnist_jax.model import count_params, summary
from mnist_jax.render import Renderer


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """What to train: built-in variants by name, seeds, and the shared training settings."""

    variants: tuple[str, ...] = tuple(VARIANTS)
    seeds: tuple[int, ...] = (0,)
    l2: float = L2
    dropout: float = DROPOUT
    train: TrainConfig = TrainConfig()
    weight_decay: float = 0.0  # every variant's (Variant.weight_decay)

    def resolve(self) -> tuple[Variant, ...]:
        """The variants with this config's L2 coefficient, dropout rate and weight decay,
        validated, their layers named as the model of `train.hidden` names them."""
        variants = select_variants(self.variants, l2=self.l2, dropout=self.dropout,
                                   weight_decay=self.weight_decay)
        for variant in variants:
            variant.validate(self.train.hidden)
        return tuple(v.at_depth(self.train.hidden) for v in variants)

    def validate(self, n_train: int = 60000) -> None:
        """Every setting, before any work starts; raises ConfigError naming the flag."""
        # Checked here too, since a value no chosen variant uses is still a wrong flag.
        check_regularisation(self.l2, self.dropout, weight_decay=self.weight_decay)
        self.train.validate(n_train)
        self.resolve()
        if self.weight_decay and self.train.learning_rate == 0:
            raise ConfigError(f"--weight-decay {self.weight_decay:g} changes nothing with --lr 0 "
                              "(each step removes weight_decay * learning_rate of a weight); "
                              "give a learning rate > 0 or leave --weight-decay out")
        check_decay_used(self.train.weight_decay_on, self.weight_decay > 0)
        check_seeds(self.seeds)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ExperimentConfig:
        return cls(variants=tuple(d["variants"]), seeds=tuple(d["seeds"]), l2=d["l2"],
                   dropout=d["dropout"], train=TrainConfig.from_dict(d["train"]),
                   weight_decay=d.get("weight_decay", 0.0))


@contextlib.contextmanager
def timed(parts: dict[str, float], name: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        parts[name] = time.perf_counter() - t0


def run_eda(mnist: MNIST, out_dir: str | Path, seed: int = 0,
            renderer: Renderer | None = None) -> dict[str, str]:
    """The label distributions and 25 random digits as PNGs; returns their relative paths.
    With a `renderer`, they are queued there and written by its `finish`."""
    return draw_figures({
        "label_distribution": ("label_distribution", (mnist.train_labels, mnist.test_labels),
                               {}),
        "digits": ("random_digits", (mnist.train_images, mnist.train_labels), {"seed": seed}),
    }, Path(out_dir), renderer)


def draw_figures(jobs: Mapping[str, tuple[str, tuple, dict]], out: Path,
          renderer: Renderer | None) -> dict[str, str]:
    """`jobs[key] = (function, args, kwargs)`: `plots.<function>(*args, **kwargs)` queued as
    figures/<key>.png under `out` (or, without a renderer, drawn and written now); returns
    the paths relative to `out`."""
    paths = {key: f"{rundir.FIGURES}/{key}.png" for key in jobs}
    now = renderer is None
    renderer = Renderer(workers=0) if now else renderer
    for key, (function, args, kwargs) in jobs.items():
        renderer.draw(out / paths[key], function, *args, **kwargs)
    if now:
        renderer.finish()
    return paths


def collect(stack: fit.Stack) -> tuple[results.VariantResult, ...]:
    """Every variant's runs (history, test and full-training metrics, per seed) of a trained
    stack."""
    test = stack.evaluate("test")
    full = _all_training_images(stack)
    return tuple(results.VariantResult(variant, tuple(
        results.Run(seed, stack.histories[variant.name][s],
                    {k: float(test[k][s, v]) for k in test},
                    {k: float(full[k][s, v]) for k in full})
        for s, seed in enumerate(stack.seeds))) for v, variant in enumerate(stack.variants))


def variants_json(variants: Sequence[results.VariantResult], train_seconds: float,
                  ) -> dict[str, Any]:
    """metrics.json's "variants": each one's recipe, seed-mean history and metrics, statistics
    over seeds and runs; `train_seconds` is each model's share of the training time."""
    return {r.name: {"variant": dataclasses.asdict(r.variant), "history": r.mean_history(),
                     "test": r.mean("test"), "train_full": r.mean("train_full"),
                     "train_seconds": train_seconds, "stats": r.stats(),
                     "runs": [run.to_json() for run in r.runs]} for r in variants}


def _all_training_images(stack: fit.Stack) -> dict[str, np.ndarray]:
    """Every model's metrics on all 60k training images, the validation part included.

    The validation part's are the last epoch's, computed with the final weights; so only the
    training part is evaluated here, on the rows `fit` left on the devices, rather than all 60k
    concatenated and sent again.
    """
    train = stack.evaluate("train")
    n_train, n_val = stack.data.n_train, stack.data.n_val
    if not n_val:
        return train
    val = {key: np.array([[stack.histories[v.name][s][f"val_{key}"][-1] for v in stack.variants]
                          for s in range(len(stack.seeds))], np.float64)
           for key in ("cross_entropy", "accuracy")}
    full = {key: (n_train * train[key].astype(np.float64) + n_val * val[key]) / (n_train + n_val)
            for key in ("cross_entropy", "accuracy")}
    full["penalty"] = train["penalty"].astype(np.float64)
    full["loss"] = full["cross_entropy"] + full["penalty"]
    return full


def history_figures(stack: fit.Stack, out_dir: Path,
                    renderer: Renderer | None = None) -> dict[str, str]:
    """Each variant's loss and accuracy per epoch (all seeds), every figure on the same
    scales so that they compare at a glance: needs only the histories."""
    every = [h for v in stack.variants for h in stack.histories[v.name]]
    return draw_figures({f"curves_{v.name}": ("history_curves", (stack.histories[v.name],),
                                              {"title": v.name, "share_with": every})
                         for v in stack.variants}, out_dir, renderer)


def figures(stack: fit.Stack, splits: fit.Splits, mnist: MNIST,
            variants: Sequence[results.VariantResult], best: str, out_dir: Path,
            renderer: Renderer | None = None) -> dict[str, str]:
    """The comparison, and the best model's confusion matrix and mistakes."""
    predicted = fit.predict(stack.model, stack.params(best, 0), splits.test_images,
                            mesh=placement.batch_mesh(stack.config))
    true = mnist.test_labels.astype(np.int64)
    seed = stack.seeds[0]
    return draw_figures({
        "comparison": ("compare_variants", (
            {v.name: [r.history for r in v.runs] for v in variants},
            {v.name: v.values("test_accuracy") for v in variants}),
            {}),
        "confusion": ("confusion", (true, predicted), {
            "title": f"{best} (seed {seed}): test accuracy {np.mean(true == predicted):.2%}"}),
        "misclassified": ("misclassified", (mnist.test_images, true, predicted), {}),
    }, out_dir, renderer)


def run_experiment(config: ExperimentConfig, mnist: MNIST, out_dir: str | Path, *,
                   progress: bool = True, echo: Callable[[str], None] = print,
                   on_epoch_end: Callable[[fit.Stack], None] | None = None,
                   stack: fit.Stack | None = None,
                   parts: Mapping[str, float] | None = None,
                   renderer: Renderer | None = None) -> dict[str, Any]:
    """Runs the whole study into `out_dir` and returns what metrics.json holds.

    `stack` continues a restored run; `on_epoch_end` sees the stack after every epoch
    (checkpoints hook in there); `parts` are earlier stages' seconds (loading the data, say),
    recorded with this run's in timing's `parts_seconds` (wall_seconds is this call's).
    """
    with contextlib.ExitStack() as held:
        if renderer is None:
            primary = jax.process_index() == 0
            renderer = held.enter_context(Renderer(runtime.usable_cores() if primary else 0))
        return _run_experiment(config, mnist, out_dir, progress, echo, on_epoch_end, stack,
                               parts, renderer)


def _run_experiment(config, mnist, out_dir, progress, echo, on_epoch_end, stack, parts,
                    renderer: Renderer) -> dict[str, Any]:
    t_start = time.perf_counter()
    parts = dict(parts or {})  # seconds of each stage, for metrics.json's timing
    config.validate(len(mnist.train_images))
    out = Path(out_dir)
    primary = jax.process_index() == 0  # with several hosts, one writes the files
    variants = config.resolve()
    with timed(parts, "eda"):  # queued: drawn by the renderer's workers while we compile
        eda = run_eda(mnist, out, seed=config.seeds[0], renderer=renderer) if primary else {}
    with timed(parts, "prepare"):
        splits = fit.prepare(mnist, config.train.validation_split)
        if stack is None:
            stack = fit.new_stack(variants, config.seeds, config.train,
                                  len(mnist.train_images))
    devices = config.train.data_parallel
    n_models = len(config.variants) * len(config.seeds)
    echo(f"training {len(config.variants)} variant(s) x {len(config.seeds)} seed(s) = "
         f"{n_models} model(s) with one compiled program, "
         f"{config.train.epochs} epochs, {placement.resolve(config.train)} placement; batch "
         f"{config.train.batch_size} on {devices} device(s), "
         f"{config.train.batch_size // devices} per device")
    with timed(parts, "fit"):  # compile + train + checkpoints
        fit.fit(stack, splits, progress=progress, on_epoch_end=on_epoch_end)
    echo(f"compiled in {stack.compile_seconds:.1f} s, trained in {stack.train_seconds:.1f} s")
    curves = history_figures(stack, out, renderer) if primary else {}  # drawn as we evaluate

    with timed(parts, "evaluate"):  # test set and all 60k training images, every model
        outcomes = collect(stack)
    selection = results.select(outcomes)
    best = selection.chosen
    with timed(parts, "save_models"):  # every model's final parameters, for load_run
        saving.save_stack(out, stack, write=primary)
    with timed(parts, "figures"):  # the rest drawn, and all written
        figure_paths = ({**eda, **curves, **figures(stack, splits, mnist, outcomes,
                                                    best, out, renderer)}
                        if primary else {})
        renderer.finish()
    metrics = {
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "config": config.to_dict(),
        "environment": runtime.environment(),
        "data": {"source": mnist.source, "origin": mnist.origin,
                 "cache_dir": str(mnist.cache_dir) if mnist.cache_dir else None,
                 "sha256": dict(mnist.sha256), "train": len(splits.train_images),
                 "validation": len(splits.val_images), "test": len(splits.test_images)},
        "model": {"architecture": "-".join(map(str, (784, *config.train.hidden, 10))),
                  "parameters": count_params(stack.params(variants[0].name)),
                  "dropout_layers": stack.model.dropout},
        "timing": {"compile_seconds": stack.compile_seconds,
                   "train_seconds": stack.train_seconds,
                   "models": n_models,
                   "placement": placement.resolve(config.train),
                   "wall_seconds": None,
                   "parts_seconds": parts},
        "parallel": {"devices": devices, "processes": jax.process_count(),
                     "global_batch": config.train.batch_size,
                     "per_device_batch": config.train.batch_size // devices},
        "variants": variants_json(outcomes, stack.train_seconds / n_models),
        "comparisons": [c.to_json() for c in results.compare_pairs(outcomes)],
        "best_variant": best,
        "selection": {"variant": best, "on": selection.on, "values": dict(selection.values)},
        "figures": figure_paths,
    }
    metrics["timing"]["wall_seconds"] = time.perf_counter() - t_start
    # The whole process so far (start-up and imports included), where the OS tells it.
    metrics["timing"]["process_seconds"] = runtime.process_seconds()
    if primary:
        report.write(out, metrics)
    return metrics


def train_and_evaluate(config: ExperimentConfig, out_dir: str | Path, *,
                       data_dir: str | Path | None = None, resume: bool = False,
                       overwrite: bool = False, progress: bool = True,
                       echo: Callable[[str], None] = print,
                       command: str = "experiment", tensorboard: bool = False,
                       checkpoint_every: float | None = None) -> dict[str, Any]:
    """The main job: validate everything, then run the study into `out_dir`, checkpointed as
    it trains; with `resume`, continue the run there from its newest intact checkpoint.

    One process at a time holds `out_dir` (a lock; a second is refused). Raises ConfigError
    before any work for bad settings, CheckpointError when no checkpoint is intact,
    TrainingDiverged (the last good checkpoint kept), Interrupted (after checkpointing, on
    Ctrl-C or SIGTERM) and WriteError (disk full, I/O error) otherwise; `run.json` records
    the outcome. `command` is the CLI command that resumes the run, for messages;
    `tensorboard` also writes TensorBoard event files (per-epoch scalars per model, after
    every epoch) to <out>/tensorboard. A checkpoint is saved after an epoch when
    `checkpoint_every` seconds (default checkpoint.EVERY_SECONDS; 0: every epoch) have passed
    since the last, after the last epoch and on a stop signal.
    """
    from mnist_jax.data import check_data_dir

    config.validate()
    if tensorboard:
        from mnist_jax import tensorboard as tb

        tb.available()
    check_data_dir(data_dir)
    primary = jax.process_index() == 0
    out = Path(out_dir)
    with rundir.hold(out, config, resume=resume, overwrite=overwrite, command=command,
                     primary=primary) as complete:
        if complete is not None:
            echo(f"the run in {out} is complete ({complete.get('epochs_done')} of "
                 f"{config.train.epochs} epochs): nothing to resume")
            return json.loads((out / "metrics.json").read_text())
        results = _train_into(config, out, data_dir, resume, progress, echo, command, primary,
                              checkpoint_every, tensorboard)
    return results


def _train_into(config: ExperimentConfig, out: Path, data_dir, resume: bool, progress: bool,
                echo: Callable[[str], None], command: str, primary: bool,
                checkpoint_every: float | None, tensorboard: bool) -> dict[str, Any]:
    """train_and_evaluate's work once the run directory is held."""
    from mnist_jax import checkpoint  # orbax is slow to import; only the main job needs it
    from mnist_jax.data import load_mnist

    if checkpoint_every is None:
        checkpoint_every = checkpoint.EVERY_SECONDS
    parts: dict[str, float] = {}
    with timed(parts, "load_data"):
        mnist = load_mnist(data_dir)
    echo(f"data: MNIST from {mnist.source} ({mnist.origin}), verified")
    if note := runtime.bfloat16_note(config.train.dtype):
        echo(note)
    # Its workers start now, importing matplotlib while the initialiser compiles.
    with Renderer(runtime.usable_cores() if primary else 0) as renderer:
        mgr = checkpoint.manager(out / rundir.CHECKPOINTS)
        with timed(parts, "init"):  # compiling and running the initialiser
            stack = fit.new_stack(config.resolve(), config.seeds, config.train,
                                  len(mnist.train_images))
        echo(summary(stack.model))
        for v in stack.variants:
            echo(f"  {v.name}: {v.describe(config.train.hidden)}")
        if resume:
            if checkpoint.restore(mgr, stack) is None:
                echo(f"no checkpoint in {out / rundir.CHECKPOINTS} yet: starting from epoch 1")
            else:
                echo(f"resuming after epoch {stack.epochs_done} of {config.train.epochs}")
        resume_with = f"mnist-jax {command} --resume {out}"

        def saved() -> tuple[dict[str, Any], str]:  # what the newest checkpoint holds
            mgr.reload()  # a failed save leaves the previous one newest
            kept = mgr.latest_step() or 0
            return ({"epochs_done": kept},
                    f"the newest checkpoint is of epoch {kept}" if kept else "no checkpoint yet")

        with rundir.deferred_interrupt(echo) as interrupt, contextlib.ExitStack() as held:
            on_epoch_end = rundir.checkpoint_hook(checkpoint.Saver(mgr, checkpoint_every),
                                                  interrupt, config.train.epochs, resume_with)
            if tensorboard and primary:  # each epoch's scalars as it ends, to watch the run
                from mnist_jax import tensorboard as tb

                live = tb.Live(out / tb.DIRECTORY,
                               resumed_after=stack.epochs_done if resume else None)
                held.callback(live.close)
                on_epoch_end = live.before(on_epoch_end)
            try:
                with rundir.recording_outcome(out, primary, resume_with,
                                              lambda: {"epochs_done": stack.epochs_done},
                                              saved):
                    results = run_experiment(config, mnist, out, progress=progress, echo=echo,
                                             on_epoch_end=on_epoch_end, stack=stack, parts=parts,
                                             renderer=renderer)
            finally:
                mgr.close()
            # Still inside the handler: a signal after the last epoch lets the run complete.
            if primary:
                rundir.set_status(out, "complete", epochs_done=stack.epochs_done)
            if interrupt:
                echo(f"{signal.Signals(interrupt[0]).name} came after the last epoch: the run "
                     "completed")
    return results
