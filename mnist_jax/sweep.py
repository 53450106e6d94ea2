"""Sweeps: where the best regularisation lies, and whether the differences are real.

A sweep's configurations are `Variant`s (L2 coefficient, dropout rate, learning rate as
values) trained by the study's machinery: each chunk of configurations, times the seeds, is
one stack (`fit.fit`), so hundreds of models share one compiled program. The searches: a grid,
random points (log-uniform L2 and learning rate, uniform dropout) drawn from an explicit key,
and Optuna's TPE sampler asked and told one chunk at a time. The choice is made on validation
accuracy averaged over seeds; the test set only reports it, with paired intervals against the
original study's four variants, which the sweep trains alongside.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from mnist_jax import files, fit, placement, rundir, saving, stats
from mnist_jax import results as outcome
from mnist_jax.config import (
    VARIANTS,
    TrainConfig,
    Variant,
    check_decay_used,
    check_hidden,
    check_regularisation,
    check_seeds,
    dense_names,
    resolve_layers,
)
from mnist_jax.errors import ConfigError, Interrupted
from mnist_jax.experiment import draw_figures

SEARCHES = ("grid", "random", "tpe")
GRID_L2 = (0.0, 1e-5, 1e-4, 1e-3)
GRID_DROPOUT = (0.0, 0.2, 0.45)
RANGE_L2 = (1e-6, 1e-2)  # random and TPE: log-uniform
RANGE_DROPOUT = (0.0, 0.6)  # uniform
ORIGINAL_LR = 1e-3  # the study's Adam learning rate: the original variants are trained at it
MAX_MODELS_PER_CHUNK = 1024
TPE_BATCH = 8  # trials asked, trained together, then told, by default


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """What to sweep. For `search="grid"`, `l2`, `dropout` and `learning_rate` list values
    (every combination is trained); for 'random' and 'tpe', each is a (low, high) range or
    one fixed value, and `samples` configurations are drawn. `chunk`: configurations per
    compiled program (0: as many as fit the device's memory, see `auto_chunk`)."""

    search: str = "grid"
    l2: tuple[float, ...] = GRID_L2
    dropout: tuple[float, ...] = GRID_DROPOUT
    learning_rate: tuple[float, ...] = (ORIGINAL_LR,)
    weight_decay: tuple[float, ...] = (0.0,)  # a grid axis; one value for random and tpe
    l2_layers: tuple[str, ...] = ("hidden",)  # config.resolve_layers' names
    dropout_layers: tuple[str, ...] = ("hidden",)
    samples: int = 16
    search_seed: int = 0
    seeds: tuple[int, ...] = (0,)
    originals: bool = True  # train the study's four variants as points of the sweep
    chunk: int = 0
    train: TrainConfig = TrainConfig()
    # A sweep over architectures (--hidden repeated): each one's hidden widths; every
    # configuration is trained at each, one stack per shape. Empty: train.hidden alone.
    architectures: tuple[tuple[int, ...], ...] = ()

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        """The architectures swept: `architectures`, or train.hidden alone."""
        return self.architectures or (self.train.hidden,)

    def at(self, hidden: tuple[int, ...]) -> SweepConfig:
        """This sweep at one architecture (what each of its stacks trains)."""
        return dataclasses.replace(self, architectures=(),
                                   train=dataclasses.replace(self.train, hidden=hidden))

    def validate(self, n_train: int = 60000) -> None:
        """Every setting, before any work starts; raises ConfigError naming the flag."""
        if self.search not in SEARCHES:
            raise ConfigError(f"--search {self.search!r} must be one of {', '.join(SEARCHES)}")
        self.train.validate(n_train)
        for shape in self.architectures:
            check_hidden(shape)
        if self.architectures:
            shown = " ".join(f"--hidden {','.join(map(str, h))}" for h in self.architectures)
            if len(set(self.architectures)) != len(self.architectures):
                raise ConfigError(f"{shown}: an architecture is given twice; give each once")
            if self.search == "tpe" and len(self.architectures) > 1:
                raise ConfigError(f"{shown}: --search tpe sweeps one architecture; use --search "
                                  "grid or random to compare several")
        for hidden in self.shapes:
            for flag, layers, output in (("--l2-layers", self.l2_layers, True),
                                         ("--dropout-layers", self.dropout_layers, False)):
                names = dense_names(hidden)[:None if output else -1]
                try:
                    known = bool(layers) and bool(resolve_layers(layers, hidden, output=output))
                except ConfigError:
                    known = False
                if not known:
                    at = f" (architecture {arch_name(hidden)})" if self.architectures else ""
                    raise ConfigError(f"{flag} {','.join(layers) or '(none)'}{at}: name one or "
                                      f"more of {','.join(names)}, or hidden (every hidden "
                                      "layer)")
        if self.search != "grid" and len(self.weight_decay) > 1:
            raise ConfigError(f"--weight-decay {_show(self.weight_decay)}: --search "
                              f"{self.search} takes one weight decay; sweep it with --search "
                              "grid")
        check_decay_used(self.train.weight_decay_on, any(self.weight_decay))
        for flag, values in (("--l2", self.l2), ("--dropout", self.dropout),
                             ("--lr", self.learning_rate), ("--weight-decay", self.weight_decay)):
            if not values:
                raise ConfigError(f"{flag} is empty; give at least one value")
            if self.search != "grid" and len(values) > 2:
                raise ConfigError(f"{flag} {_show(values)}: --search {self.search} takes a "
                                  "range low,high or one fixed value")
            if self.search == "grid" and len(set(values)) != len(values):
                raise ConfigError(f"{flag} {_show(values)} lists a value twice")
        for l2 in self.l2:
            check_regularisation(l2, 0.0)
        for rate in self.dropout:
            check_regularisation(0.0, rate)
        for decay in self.weight_decay:
            check_regularisation(0.0, 0.0, weight_decay=decay)
        for lr in self.learning_rate:
            if not (math.isfinite(lr) and lr > 0):
                raise ConfigError(f"--lr {lr!r} must be a finite number > 0")
        if self.search != "grid":
            for flag, values, log in (("--l2", self.l2, True), ("--dropout", self.dropout, False),
                                      ("--lr", self.learning_rate, True)):
                if len(values) == 2 and not values[0] < values[1]:
                    raise ConfigError(f"--{flag.lstrip('-')} {_show(values)}: the range must "
                                      f"be low,high with low < high")
                if len(values) == 2 and log and values[0] <= 0:
                    raise ConfigError(f"{flag} {_show(values)}: {self.search} search draws it "
                                      f"log-uniformly, so the range must lie above 0 (e.g. "
                                      f"{RANGE_L2[0]:g},{RANGE_L2[1]:g})")
            if not (isinstance(self.samples, int) and self.samples >= 1):
                raise ConfigError(f"--samples {self.samples!r} must be an integer >= 1")
        if not (isinstance(self.chunk, int) and self.chunk >= 0):
            raise ConfigError(f"--chunk {self.chunk!r} must be an integer >= 0 (0: automatic)")
        if self.chunk % self.train.model_parallel:
            raise ConfigError(f"--chunk {self.chunk} must be a multiple of --model-parallel "
                              f"{self.train.model_parallel}")
        if not (isinstance(self.search_seed, int) and self.search_seed >= 0):
            raise ConfigError(f"--search-seed {self.search_seed!r} must be an integer >= 0")
        check_seeds(self.seeds)
        if self.search == "tpe":
            try:
                import optuna  # noqa: F401
            except ImportError as e:
                raise ConfigError("--search tpe needs Optuna: pip install 'mnist_jax[optuna]'"
                                  ) from e

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SweepConfig:
        tuples = ("l2", "dropout", "learning_rate", "weight_decay", "l2_layers",
                  "dropout_layers", "seeds")
        d = {"weight_decay": (0.0,), "architectures": (), **d}  # runs from before either
        return cls(**{**d, **{k: tuple(d[k]) for k in tuples},
                      "architectures": tuple(tuple(h) for h in d["architectures"]),
                      "train": TrainConfig.from_dict(d["train"])})


def arch_name(hidden: Sequence[int]) -> str:
    """'256-256': an architecture by its hidden widths."""
    return "-".join(map(str, hidden))


def original_of(name: str) -> str | None:
    """The original variant a configuration is ('baseline', or '1024-1024 baseline' in a
    sweep over architectures), or None."""
    base = name.split(" ", 1)[1] if " " in name and name[0].isdigit() else name
    return base if base in VARIANTS else None


def _at_shape(points: list[Variant], hidden: tuple[int, ...], config: SweepConfig,
              ) -> list[Variant]:
    """Points named by their architecture too, where a sweep has several."""
    if len(config.shapes) == 1:
        return points
    return [dataclasses.replace(p, name=f"{arch_name(hidden)} {p.name}") for p in points]


def _show(values: Sequence[float]) -> str:
    return ",".join(f"{v:g}" for v in values)


# --- the configurations ------------------------------------------------------------------------

def point(config: SweepConfig, l2: float, dropout: float, learning_rate: float,
          weight_decay: float | None = None, name: str | None = None) -> Variant:
    """One configuration on the sweep's layers, named by its values unless `name` is given
    (its weight decay, the sweep's only one unless given, named where it is not 0)."""
    weight_decay = config.weight_decay[0] if weight_decay is None else weight_decay
    name = name or (f"l2={l2:.3g} dropout={dropout:.3g} lr={learning_rate:.3g}"
                    + (f" wd={weight_decay:.3g}" if weight_decay else ""))
    return Variant(name, l2=float(l2), l2_layers=config.l2_layers, dropout=float(dropout),
                   dropout_layers=config.dropout_layers, learning_rate=float(learning_rate),
                   weight_decay=float(weight_decay)).at_depth(config.train.hidden)


def effective(variant: Variant, config: SweepConfig) -> tuple:
    """What a configuration trains as: per-layer L2 and dropout vectors and its learning rate
    (a point with L2 0 on both kernels is the baseline, whatever layers it names)."""
    hidden = config.train.hidden
    return (tuple(variant.l2_vector(hidden).tolist()),
            tuple(variant.dropout_vector(hidden).tolist()),
            variant.learning_rate_or(config.train.learning_rate), variant.weight_decay)


def originals(config: SweepConfig) -> list[Variant]:
    """The study's four variants at its learning rate, or none."""
    if not config.originals:
        return []
    return [dataclasses.replace(v, learning_rate=ORIGINAL_LR).at_depth(config.train.hidden)
            for v in VARIANTS.values()]


def grid(config: SweepConfig) -> list[Variant]:
    """Every combination of the values, each (learning rate, weight decay) block in L2-major
    order."""
    return [point(config, l2, dropout, lr, wd) for lr in config.learning_rate
            for wd in config.weight_decay for l2 in config.l2 for dropout in config.dropout]


def random_points(config: SweepConfig) -> list[Variant]:
    """`samples` points drawn with jax.random from `search_seed`: log-uniform L2 and learning
    rate, uniform dropout, each between its range's ends (or fixed)."""
    u = np.asarray(jax.random.uniform(jax.random.key(config.search_seed), (config.samples, 3)),
                   np.float64)
    out = []
    for row in u:
        values = [_draw(u, bounds, log) for u, bounds, log in zip(
            row, (config.l2, config.dropout, config.learning_rate), (True, False, True),
            strict=True)]
        out.append(point(config, *values))
    return _unique_names(out)


def _draw(u: float, bounds: Sequence[float], log: bool) -> float:
    if len(bounds) == 1:
        return float(bounds[0])
    low, high = bounds
    if log:
        return float(math.exp(math.log(low) + u * (math.log(high) - math.log(low))))
    return float(low + u * (high - low))


def _unique_names(points: list[Variant]) -> list[Variant]:
    seen: dict[str, int] = {}
    out = []
    for p in points:
        n = seen[p.name] = seen.get(p.name, 0) + 1
        out.append(p if n == 1 else dataclasses.replace(p, name=f"{p.name} #{n}"))
    return out


def with_originals(points: list[Variant], config: SweepConfig) -> list[Variant]:
    """The original variants first, then the points that train as none of them; a point that
    trains as an original takes the original's name."""
    first = originals(config)
    known = {effective(v, config) for v in first}
    return first + [p for p in points if effective(p, config) not in known]


def auto_chunk(config: SweepConfig, n_points: int) -> int:
    """Configurations per compiled program: as many as take half the device's free memory
    (a model's parameters, Adam's two moments and a copy of each, its activations for a
    batch and an evaluation chunk), at most 1024 models, a multiple of --model-parallel."""
    train = config.train
    widths = (784, *train.hidden, 10)
    params = sum(a * b + b for a, b in zip(widths[:-1], widths[1:], strict=True))
    per_model = 4 * (6 * params + 3 * train.batch_size * sum(widths)
                     + 2 * train.eval_batch_size * sum(widths[1:]))
    stats_ = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats_:
        free = stats_["bytes_limit"] - stats_.get("bytes_in_use", 0)
    else:  # CPU: the host's available memory
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    models = min(MAX_MODELS_PER_CHUNK, max(1, int(free * 0.5 // per_model)))
    configs = max(1, models // len(config.seeds))
    if config.search == "tpe":
        configs = min(configs, TPE_BATCH)
    mp = train.model_parallel
    return max(mp, min(configs, n_points) // mp * mp)


def _padded(points: list[Variant], multiple: int) -> list[Variant]:
    """Points made a multiple of `multiple` with copies of the last, named _pad*: the models
    axis is split evenly over devices; their results are dropped."""
    extra = -len(points) % multiple
    return points + [dataclasses.replace(points[-1], name=f"_pad{i}") for i in range(extra)]


# --- results of one chunk ----------------------------------------------------------------------

def chunk_results(stack: fit.Stack) -> dict[str, Any]:
    """Each real configuration's runs (seed, history, test metrics) and divergences."""
    test = stack.evaluate("test")
    out = {}
    for v, variant in enumerate(stack.variants):
        if variant.name.startswith("_pad"):
            continue
        out[variant.name] = {
            "variant": dataclasses.asdict(variant),
            "hidden": list(stack.config.hidden),
            "runs": [{"seed": seed, "history": _finite(stack.histories[variant.name][s]),
                      "test": {k: outcome.finite_or_none(test[k][s, v]) for k in test}}
                     for s, seed in enumerate(stack.seeds)],
            "diverged": [d for d in stack.diverged if d["variant"] == variant.name],
        }
    return out


def _finite(history: Mapping[str, list[float]]) -> dict[str, list[float | None]]:
    """A history with non-finite values (a diverged model's) as None: JSON has no NaN."""
    return {k: [outcome.finite_or_none(x) for x in v] for k, v in history.items()}


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def save_chunk(path: Path, index: int, points: list[Variant], results: dict[str, Any]) -> None:
    """A finished chunk's results, with the SHA-256 of its content (checked when read)."""
    body = {"index": index, "points": [p.name for p in points], "results": results}
    files.write_json(path, {**body, "sha256": _digest(body)})


def load_chunk(path: Path, points: list[Variant],
               warn: Callable[[str], None] = print) -> dict[str, Any] | None:
    """A finished chunk's results if its file is intact and holds these points, else None
    (a damaged file is set aside as .damaged with a warning; the chunk is trained again)."""
    if not path.exists():
        return None
    problem = None
    try:
        record = json.loads(path.read_text())
        body = {k: record[k] for k in ("index", "points", "results")}
        if record.get("sha256") != _digest(body):
            problem = "it does not match its SHA-256 digest"
        elif body["points"] != [p.name for p in points]:
            problem = "it holds other configurations than the sweep asks for"
    except (OSError, ValueError, KeyError, TypeError) as e:
        problem = f"it is unreadable ({type(e).__name__})"
    if problem:
        kept = path.with_name(path.name + ".damaged")
        path.rename(kept)
        warn(f"warning: {path} is damaged ({problem}); set aside as {kept.name}, training "
             "that chunk again")
        return None
    return body["results"]


# --- Optuna's TPE, batched ---------------------------------------------------------------------

class TPE:
    """Optuna's TPE sampler through ask and tell, a batch at a time: the batch's trials are
    asked together (constant liar keeps them apart), trained as one stack, then told their
    mean validation accuracy. Replaying the recorded batches (resume) asks the same points."""

    def __init__(self, config: SweepConfig):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.config = config
        sampler = optuna.samplers.TPESampler(seed=config.search_seed, constant_liar=True)
        self.study = optuna.create_study(direction="maximize", sampler=sampler)
        self.distributions = {}
        for name, bounds, log in (("l2", config.l2, True), ("dropout", config.dropout, False),
                                  ("learning_rate", config.learning_rate, True)):
            if len(bounds) == 2:
                self.distributions[name] = optuna.distributions.FloatDistribution(
                    bounds[0], bounds[1], log=log)
        self.pending: list = []

    def ask(self, n: int) -> list[Variant]:
        self.pending = [self.study.ask(self.distributions) for _ in range(n)]
        fixed = {"l2": self.config.l2[0], "dropout": self.config.dropout[0],
                 "learning_rate": self.config.learning_rate[0]}
        return [point(self.config, **{**fixed, **t.params}) for t in self.pending]

    def tell(self, points: list[Variant], results: Mapping[str, Any]) -> None:
        from optuna.trial import TrialState

        for trial, p in zip(self.pending, points, strict=True):
            value = _objective(results[p.name])
            if value is None:
                self.study.tell(trial, state=TrialState.FAIL)
            else:
                self.study.tell(trial, value)
        self.pending = []


def _objective(result: Mapping[str, Any]) -> float | None:
    """Mean over seeds of the final validation accuracy; None if a seed diverged."""
    if result["diverged"]:
        return None
    finals = [r["history"].get("val_accuracy", r["history"]["accuracy"])[-1]
              for r in result["runs"]]
    return None if any(x is None for x in finals) else float(np.mean(finals))


# --- the run -----------------------------------------------------------------------------------

def run_sweep(config: SweepConfig, splits: fit.Splits, out: Path, *, resume: bool = False,
              progress: bool = True, echo: Callable[[str], None] = print,
              interrupt: Sequence[int] = (), resume_with: str = "",
              checkpoint_every: float | None = None, tensorboard: bool = False,
              ) -> dict[str, Any]:
    """Trains every configuration x seed, a chunk at a time, into `out`; returns the
    configurations' results (name -> variant, runs, diverged), in sweep order. The models of
    the original variants and of the choice are kept in `out`/models (mnist_jax.saving).

    Each chunk checkpoints under checkpoints/chunk_NNNN (every `checkpoint_every` seconds,
    default checkpoint.EVERY_SECONDS, 0: every epoch; the last epoch always) and, once finished,
    writes its results to chunks/NNNN.json (and drops its checkpoints). With `resume`,
    finished chunks are read back and the chunk in flight continues from its newest intact
    checkpoint: the results equal an uninterrupted sweep's bit for bit. A non-empty
    `interrupt` (a signal number, appended by a handler) stops after the epoch in flight,
    checkpointed, raising Interrupted with `resume_with` in its message.
    """
    config.validate(len(splits.train_images) + len(splits.val_images))
    # Each architecture's points in chunks of its own: a stack holds one shape.
    fixed: list[tuple[SweepConfig, list[Variant]]] | None = None
    if config.search != "tpe":
        fixed = []
        for hidden in config.shapes:
            at = config.at(hidden)
            points = _at_shape(with_originals(
                grid(at) if config.search == "grid" else random_points(at), at), hidden, config)
            size = config.chunk or auto_chunk(at, len(points))
            fixed += [(at, points[i:i + size]) for i in range(0, len(points), size)]
    one = config.at(config.shapes[0])  # TPE's one architecture
    tpe = TPE(one) if config.search == "tpe" else None
    if tpe is not None:
        size = config.chunk or auto_chunk(one, config.samples + len(originals(one)))
    (out / rundir.CHUNKS).mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    index, drawn = 0, 0
    n_chunks = len(fixed) if fixed is not None else None
    while True:
        at = one
        if fixed is not None:
            at, points = fixed[index] if index < len(fixed) else (config, [])
        elif index == 0 and originals(one):  # TPE: the originals first, as one chunk
            points, asked = originals(one), False
        else:  # then batches asked of the sampler
            want = min(size, config.samples - drawn)
            points, asked = (tpe.ask(want), True) if want > 0 else ([], False)
            drawn += len(points)
        if not points:
            break
        path = out / rundir.CHUNKS / f"{index:04d}.json"
        done = load_chunk(path, points, echo) if resume else None
        what = f"chunk {index + 1}" + (f" of {n_chunks}" if n_chunks else "")
        if done is None:
            echo(f"{what}: {len(points)} configuration(s) x {len(config.seeds)} seed(s)")
            directory = out / rundir.CHECKPOINTS / f"chunk_{index:04d}"
            done, stack = _train_chunk(at, points, splits, directory, resume=resume,
                                       progress=progress, echo=echo, interrupt=interrupt,
                                       resume_with=resume_with, what=what,
                                       checkpoint_every=checkpoint_every,
                                       tensorboard=tensorboard and jax.process_index() == 0,
                                       out=out)
            primary = jax.process_index() == 0  # with several hosts, one writes the files
            # The models that may be kept, before the chunk counts as done: the originals and
            # the best so far (the final choice is the best so far when its chunk ends).
            keep = kept_models({**results, **done})
            saving.save_stack(out, stack, keep, write=primary)
            del stack
            if primary:
                saving.keep_only(out, keep)
                save_chunk(path, index, points, done)
                shutil.rmtree(directory, ignore_errors=True)
        else:
            echo(f"{what}: finished before, read from {path}")
        if tpe is not None and asked:
            tpe.tell(points, done)
        results.update(done)
        index += 1
        more = index < len(fixed) if fixed is not None else drawn < config.samples
        if not more:
            break
        if interrupt:
            name = signal.Signals(interrupt[0]).name
            raise Interrupted(f"{name}: stopped after {what}, its results saved; resume "
                              f"with: {resume_with}", signum=interrupt[0])
    return results


def _train_chunk(config: SweepConfig, points: list[Variant], splits: fit.Splits,
                 directory: Path, *, resume: bool, progress: bool,
                 echo: Callable[[str], None], interrupt: Sequence[int], resume_with: str,
                 what: str, checkpoint_every: float | None, tensorboard: bool = False,
                 out: Path | None = None) -> dict[str, Any]:
    from mnist_jax import checkpoint  # orbax is slow to import: only when training
    from mnist_jax import tensorboard as tb

    padded = _padded(points, config.train.model_parallel)
    stack = fit.new_stack(padded, config.seeds, config.train,
                          len(splits.train_images) + len(splits.val_images),
                          decay=any(config.weight_decay))  # every chunk alike
    mgr = checkpoint.manager(directory)
    live = None
    try:
        if resume and checkpoint.restore(mgr, stack) is not None:
            echo(f"{what}: resuming after epoch {stack.epochs_done} of {config.train.epochs}")

        save = checkpoint.Saver(mgr, checkpoint.EVERY_SECONDS if checkpoint_every is None
                                else checkpoint_every)
        on_epoch_end = rundir.checkpoint_hook(save, interrupt, config.train.epochs, resume_with,
                                              f" of {what}")
        if tensorboard:  # each epoch as it ends; the sweep's end rewrites all with HParams
            live = tb.Live(out / tb.DIRECTORY, resumed_after=stack.epochs_done if resume
                           else None)
            on_epoch_end = live.before(on_epoch_end)

        t0 = time.perf_counter()
        fit.fit(stack, splits, progress=progress, on_epoch_end=on_epoch_end,
                halt_on_divergence=False)
        for d in stack.diverged:
            echo(f"{d['variant']} (seed {d['seed']}) diverged at epoch {d['epoch']}, step "
                 f"{d['step']}; it is excluded from the choice")
        results = chunk_results(stack)
        seconds = time.perf_counter() - t0
    finally:
        mgr.close()
        if live is not None:
            live.close()
    for r in results.values():
        r["compile_seconds"] = stack.compile_seconds
        r["train_seconds"] = stack.train_seconds
        r["chunk_seconds"] = seconds
    return results, stack


def kept_models(results: Mapping[str, Any]) -> set[str]:
    """The configurations whose models a sweep keeps: the original variants and the choice
    among `results` (none while every configuration diverged)."""
    keep = {name for name in results if original_of(name)}
    try:
        keep.add(outcome.select([outcome.VariantResult.from_json(r)
                                 for r in results.values()]).chosen)
    except ValueError:
        pass
    return keep


# --- the choice and its statistics ---------------------------------------------------------------

# --- the job: a run directory, results, figures, report ------------------------------------------

def assemble(config: SweepConfig, results: Mapping[str, Any]) -> dict[str, Any]:
    """What metrics.json holds of a sweep: every configuration's runs and statistics, the
    choice and why, the paired comparisons with the original variants."""
    outcomes = {name: outcome.VariantResult.from_json(r) for name, r in results.items()}
    try:
        selection = outcome.select(list(outcomes.values()))
    except ValueError:
        raise ConfigError("every configuration diverged: lower the learning rates (--lr)"
                          ) from None
    chosen = selection.chosen
    configurations = {name: {**r, "stats": outcomes[name].stats(),
                             "original": original_of(name) is not None}
                      for name, r in results.items()}
    for name, alias in grid_aliases(config, results).items():
        configurations[name]["grid_point"] = alias
    # Paired with the chosen: each original variant present, of every architecture (same
    # seeds: the same batch order and dropout noise; the same initial weights within one).
    # A diverged model has no test accuracy to compare (its argmax of NaN is chance).
    usable = [n for n in outcomes if not outcomes[n].diverged]
    pairs = [(chosen, name) for name in usable if original_of(name) and name != chosen]
    # And the best configuration that is no original with its architecture's baseline,
    # whatever was chosen: is searching worth it?
    best = next((n for n in selection.ranking if not original_of(n)), None)
    baseline = None if best is None else next(
        (n for n in usable if original_of(n) == "baseline"
         and results[n].get("hidden") == results[best].get("hidden")), None)
    if best is not None and baseline is not None and (best, baseline) not in pairs \
            and best != chosen:
        pairs.append((best, baseline))
    comparisons = [c.to_json() for c in outcome.holm(
        [outcome.compare(outcomes[a], outcomes[b]) for a, b in pairs])]
    return {"kind": "sweep", "config": config.to_dict(), "configurations": configurations,
            "best_searched": best,
            "selection": {"configuration": chosen, "on": selection.on, "how": selection.how,
                          "value": selection.values[chosen],
                          "ranking": list(selection.ranking),
                          "excluded_diverged": list(selection.excluded)},
            "comparisons": comparisons}


def grid_aliases(config: SweepConfig, results: Mapping[str, Any]) -> dict[str, str]:
    """Original variants that are also a point of the grid (the baseline: L2 0, dropout 0),
    trained once under the original's name: original -> the grid point's name."""
    if config.search != "grid":
        return {}
    out = {}
    for hidden in config.shapes:
        at = config.at(hidden)
        named = {effective(p, at): p.name for p in _at_shape(grid(at), hidden, config)}
        for name, r in results.items():
            if original_of(name) and tuple(r.get("hidden", config.train.hidden)) == hidden:
                alias = named.get(effective(outcome.variant_from_json(r["variant"]), at))
                if alias is not None:
                    out[name] = alias
    return out


def _mean_val(metrics: Mapping[str, Any], name: str) -> float:
    r = metrics["configurations"][name]
    on = metrics["selection"]["on"]
    return float("nan") if r["diverged"] or on not in r["stats"] else r["stats"][on]["mean"]


def _resolution(metrics: Mapping[str, Any]) -> float:
    """The smallest difference of two mean validation accuracies the validation set can tell
    from chance at 95% (two binomial proportions near the sweep's mean accuracy, each
    averaged over the seeds): the heatmap's colours never stretch what lies below it."""
    n = metrics.get("data", {}).get("validation", 0) * len(metrics["config"]["seeds"])
    values = [v for name in metrics["configurations"]
              if math.isfinite(v := _mean_val(metrics, name))]
    if not n or not values:
        return 0.0
    p = float(np.mean(values))
    return 1.96 * math.sqrt(2 * p * (1 - p) / n)


def _half_width(metrics: Mapping[str, Any], name: str) -> float:
    """Half-width of the 95% interval of a configuration's mean validation accuracy."""
    r = metrics["configurations"][name]
    s = r["stats"].get(metrics["selection"]["on"])
    if r["diverged"] or s is None or not s.get("std"):
        return float("nan")
    return stats.t_quantile_975(s["n"] - 1) * s["std"] / math.sqrt(s["n"])


def figures(config: SweepConfig, metrics: Mapping[str, Any], out: Path) -> dict[str, str]:
    """Heatmaps (a grid: one per learning rate) or a scatter of the points, and the curves of
    the best five beside the original variants; returns their paths relative to `out`."""
    confs = metrics["configurations"]
    chosen = metrics["selection"]["configuration"]
    n_seeds = len(config.seeds)
    several = len(config.shapes) > 1

    def shape(name: str) -> tuple[int, ...]:
        return tuple(confs[name].get("hidden", config.train.hidden))

    by_effect = {(shape(name), effective(outcome.variant_from_json(c["variant"]),
                                         config.at(shape(name)))): name
                 for name, c in confs.items()}
    made = {}
    if config.search == "grid":
        blocks = [(hidden, lr, wd) for hidden in config.shapes for lr in config.learning_rate
                  for wd in config.weight_decay]
        for k, (hidden, lr, wd) in enumerate(blocks):
            at = config.at(hidden)
            cells = [[by_effect.get((hidden, effective(point(at, l2, d, lr, wd), at)))
                      for d in config.dropout] for l2 in config.l2]
            values = np.array([[_mean_val(metrics, n) if n else np.nan for n in row]
                               for row in cells])
            where = {n: (i, j) for i, row in enumerate(cells) for j, n in enumerate(row) if n}
            marks = {original_of(n): ij for n, ij in where.items() if original_of(n)}
            off = [n for n in confs if original_of(n) and shape(n) == hidden
                   and original_of(n) not in marks
                   and confs[n]["variant"]["learning_rate"] == lr and not wd]
            note = "\noff the grid: " + ", ".join(
                f"{original_of(n)} {_mean_val(metrics, n):.2%}" for n in off) if off else ""
            half = np.array([[_half_width(metrics, n) if n else np.nan for n in row]
                             for row in cells])
            base = next((n for n in confs if original_of(n) == "baseline"
                         and shape(n) == hidden), None)
            made[f"sweep_heatmap_{k}"] = ("sweep_heatmap", (config.l2, config.dropout, values), {
                "n_seeds": n_seeds, "chosen": where.get(chosen), "marks": marks,
                "centre": None if base is None else _mean_val(metrics, base),
                "half_widths": half if n_seeds > 1 else None,
                "resolution": _resolution(metrics),
                "title": (f"{arch_name(hidden)}: " if several else "")
                         + f"learning rate {lr:g}"
                         + (f", weight decay {wd:g}" if any(config.weight_decay) else "")
                         + note})
    else:
        for k, hidden in enumerate(config.shapes):
            names = [n for n in confs if not original_of(n) and shape(n) == hidden]
            v = [confs[n]["variant"] for n in names]
            chosen_index = names.index(chosen) if chosen in names else None
            key = f"sweep_points_{k}" if several else "sweep_points"
            made[key] = ("sweep_scatter", (
                [x["l2"] for x in v], [x["dropout"] for x in v], [x["learning_rate"] for x in v],
                [_mean_val(metrics, n) for n in names]), {
                "n_seeds": n_seeds, "chosen": chosen_index,
                "title": (f"{arch_name(hidden)}: " if several else "")
                         + f"{config.search} search: {len(names)} points"
                         + ("" if chosen in names else f" (chosen: {chosen})")})
    best = metrics["selection"]["ranking"][:5]
    shown = best + [n for n in confs if original_of(n) and n not in best]
    on = metrics["selection"]["on"]
    made["sweep_curves"] = ("top_curves", (
        {n: np.mean([[np.nan if x is None else x for x in r["history"][on]]
                     for r in confs[n]["runs"]], axis=0) for n in shown},), {
        "n_seeds": n_seeds, "references": [n for n in shown if original_of(n)],
        "chosen": chosen})
    return draw_figures(made, out, None)


def table_csv(metrics: Mapping[str, Any]) -> str:
    """One row per configuration: its values, n, mean and sd of validation and test
    accuracy, and whether it diverged."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["name", "l2", "l2_layers", "dropout", "dropout_layers", "learning_rate", "n",
                "val_accuracy_mean", "val_accuracy_sd", "test_accuracy_mean",
                "test_accuracy_sd", "diverged", "chosen", "weight_decay", "hidden"])
    on = metrics["selection"]["on"]
    for name, c in metrics["configurations"].items():
        v, s = c["variant"], c["stats"]
        val, test = s.get(on, {}), s.get("test_accuracy", {})
        w.writerow([name, v["l2"], "+".join(v["l2_layers"]), v["dropout"],
                    "+".join(v["dropout_layers"]), v["learning_rate"], len(c["runs"]),
                    val.get("mean", ""), val.get("std") or "", test.get("mean", ""),
                    test.get("std") or "", bool(c["diverged"]),
                    name == metrics["selection"]["configuration"], v.get("weight_decay", 0.0),
                    arch_name(c.get("hidden", metrics["config"]["train"]["hidden"]))])
    return buf.getvalue()


def sweep_and_report(config: SweepConfig, out_dir: str | Path, *,
                     data_dir: str | Path | None = None, resume: bool = False,
                     overwrite: bool = False, progress: bool = True,
                     echo: Callable[[str], None] = print, tensorboard: bool = False,
                     checkpoint_every: float | None = None) -> dict[str, Any]:
    """The sweep job: validate, hold `out_dir`, train every chunk (checkpointed, resumable,
    Ctrl-C and SIGTERM finish the epoch), then write metrics.json, sweep.csv, report.md,
    figures/ and, with `tensorboard`, event files. Returns what metrics.json holds."""
    import datetime

    from mnist_jax import report, runtime
    from mnist_jax import tensorboard as tb
    from mnist_jax.data import check_data_dir, load_mnist

    config.validate()
    if tensorboard:
        tb.available()
    check_data_dir(data_dir)
    out = Path(out_dir)
    primary = jax.process_index() == 0
    resume_with = f"mnist-jax sweep --resume {out}"
    with rundir.hold(out, config, resume=resume, overwrite=overwrite, command="sweep",
                     primary=primary) as complete:
        if complete is not None:
            echo(f"the sweep in {out} is complete: nothing to resume")
            return json.loads((out / "metrics.json").read_text())
        t_start = time.perf_counter()
        mnist = load_mnist(data_dir)
        echo(f"data: MNIST from {mnist.source} ({mnist.origin}), verified")
        if note := runtime.bfloat16_note(config.train.dtype):
            echo(note)
        splits = fit.prepare(mnist, config.train.validation_split)

        def saved() -> tuple[dict[str, Any], str]:
            done = len(list((out / rundir.CHUNKS).glob("*.json")))
            return {"chunks_done": done}, f"{done} chunk(s) finished and saved"

        with rundir.deferred_interrupt(echo) as interrupt:
            with rundir.recording_outcome(out, primary, resume_with, lambda: saved()[0], saved):
                results = run_sweep(config, splits, out, resume=resume, progress=progress,
                                    echo=echo, interrupt=interrupt, resume_with=resume_with,
                                    checkpoint_every=checkpoint_every, tensorboard=tensorboard)
                metrics = assemble(config, results)
                metrics.update(
                    created=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                    environment=runtime.environment(),
                    data={"source": mnist.source, "sha256": dict(mnist.sha256),
                          "train": len(splits.train_images),
                          "validation": len(splits.val_images),
                          "test": len(splits.test_images)},
                    timing={"wall_seconds": time.perf_counter() - t_start,
                            "models": len(results) * len(config.seeds),
                            "placement": placement.resolve(config.train)})
                if primary:
                    metrics["figures"] = figures(config, metrics, out)
                    files.write_text(out / "sweep.csv", table_csv(metrics))
                    if tensorboard:
                        tb.write(out / tb.DIRECTORY,
                                 {n: c["runs"] for n, c in metrics["configurations"].items()},
                                 hparams={n: _hparams(c["variant"], c.get("hidden", ()))
                                          for n, c in metrics["configurations"].items()})
                    metrics["timing"]["wall_seconds"] = time.perf_counter() - t_start
                    report.write_sweep(out, metrics)
            if primary:
                rundir.set_status(out, "complete", chunks_done=saved()[0]["chunks_done"])
    return metrics


def _hparams(variant: Mapping[str, Any], hidden: Sequence[int]) -> dict[str, Any]:
    """A configuration's values for the HParams dashboard (numbers and strings only)."""
    return {"hidden": arch_name(hidden), "l2": variant["l2"],
            "l2_layers": "+".join(variant["l2_layers"]) or "none",
            "dropout": variant["dropout"],
            "dropout_layers": "+".join(variant["dropout_layers"]) or "none",
            "learning_rate": variant["learning_rate"],
            "weight_decay": variant.get("weight_decay", 0.0)}
