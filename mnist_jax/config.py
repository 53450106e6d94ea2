"""Configs are data: frozen dataclasses, validated before any work starts."""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Mapping, Sequence

import numpy as np

from mnist_jax.errors import ConfigError

# Every choice a setting takes, with the line of help the CLI shows for it.
OPTIMIZERS: Mapping[str, str] = types.MappingProxyType({
    "keras-adam": "Adam as Keras computes it: eps added to the uncorrected sqrt(v)",
    "adam": "optax's adam: eps added to the bias-corrected sqrt(v_hat)",
})
LOSS_FORMS: Mapping[str, str] = types.MappingProxyType({
    "logits": "the cross-entropy from the logits, as Keras on TensorFlow computes it",
    "clipped": "from clipped probabilities, as Keras on JAX and PyTorch compute it",
})
PLACEMENTS: Mapping[str, str] = types.MappingProxyType({
    "auto": "concurrent on CPU (sequential with --data-parallel), stack on accelerators",
    "stack": "every model vmapped in one step",
    "sequential": "one model after another, each with the same single-model program",
    "concurrent": "that program for several models at once, from one host thread per core",
})
DTYPES: Mapping[str, str] = types.MappingProxyType({
    "float32": "everything in float32",
    "bfloat16": "matmul operands in bfloat16, products accumulated in float32; weights, "
                "optimizer state and activations float32 (mixed precision)",
})
MATMUL_PRECISIONS: Mapping[str, str] = types.MappingProxyType({
    "default": "XLA's default: TF32 on NVIDIA Ampere and later GPUs, float32 on CPU",
    "highest": "full float32 matmuls everywhere",
})
# What decoupled weight decay shrinks (Keras decays every trainable variable unless its
# `exclude_from_weight_decay` names some).
WEIGHT_DECAY_ON: Mapping[str, str] = types.MappingProxyType({
    "all": "every kernel and bias, as Keras's AdamW does by default",
    "kernels": "the kernels only (Keras: exclude_from_weight_decay(var_names=['bias']))",
})
# `predict`'s image files: when to make a dark digit on light paper white on black.
INVERT: Mapping[str, str] = types.MappingProxyType({
    "auto": "when the image's border (its paper) is lighter than its mid-range",
    "yes": "always",
    "no": "never: the image is a light digit on dark already",
})
# `export`'s formats (mnist_jax.export.FORMATS writes them).
EXPORT_FORMATS: Mapping[str, str] = types.MappingProxyType({
    "keras": "a .keras file: Keras 3's own Sequential, softmax output (the keras extra)",
    "onnx": "ONNX from jax2onnx: images (N, 784) -> probabilities (N, 10) (the onnx extra)",
    "jax": "a serialized jax.export function of the probabilities, any batch size; needs "
           "only JAX to run",
})
DROPOUT_RNGS: Mapping[str, str] = types.MappingProxyType({
    "hash": "a counter-based hash keyed by the explicit key (cheap on CPU)",
    "threefry": "jax.random.bits",
})


def dense_names(hidden: tuple[int, ...]) -> tuple[str, ...]:
    """Names of the Dense layers in order: hidden_1 .. hidden_k, then output."""
    return tuple(f"hidden_{i + 1}" for i in range(len(hidden))) + ("output",)


# Layers named relative to depth, so one recipe means the same at any depth (hidden_1, the
# first hidden layer, and output are names at every depth too).
LAYER_GROUPS: Mapping[str, str] = types.MappingProxyType({
    "hidden": "every hidden layer",
    "all": "every Dense layer, the output's included",
})


def resolve_layers(selectors: Sequence[str], hidden: tuple[int, ...], *,
                   output: bool = True) -> tuple[str, ...]:
    """The Dense layers `selectors` name (layer names or LAYER_GROUPS), in the model's order;
    `output=False` for what only hidden layers have (dropout). Raises ConfigError naming what
    the model does not have."""
    names = dense_names(hidden) if output else dense_names(hidden)[:-1]
    groups = {"hidden": dense_names(hidden)[:-1], "all": names}
    unknown = [s for s in selectors if s not in names and s not in groups]
    if unknown:
        raise ConfigError(f"{', '.join(map(repr, unknown))}: the model's layers are "
                          f"{', '.join(names)} (or {' / '.join(groups)}: "
                          f"{'; '.join(LAYER_GROUPS[g] for g in groups)})")
    chosen = {n for s in selectors for n in groups.get(s, (s,))}
    return tuple(n for n in names if n in chosen)


@dataclasses.dataclass(frozen=True)
class Variant:
    """A regularisation recipe: values, never a branch in the training code.

    `l2` multiplies sum(W**2) of each kernel named in `l2_layers` (Keras's
    `regularizers.l2(l2)`: no factor 1/2, biases never penalised); `dropout` is the rate of
    the dropout layer after each hidden layer named in `dropout_layers`; layers are named as
    `resolve_layers` reads them ('hidden_1', 'hidden': every hidden layer, ...);
    `weight_decay` is decoupled weight decay as Keras 3 computes it (AdamW, or Adam with
    `weight_decay=`): before each Adam step every decayed variable loses
    `variable * weight_decay * learning_rate` (what it decays: TrainConfig.weight_decay_on);
    `learning_rate`, if given, replaces the TrainConfig's for this variant (a sweep's points
    differ in it).
    """

    name: str
    l2: float = 0.0
    l2_layers: tuple[str, ...] = ()
    dropout: float = 0.0
    dropout_layers: tuple[str, ...] = ()
    learning_rate: float | None = None
    weight_decay: float = 0.0

    def with_values(self, *, l2: float | None = None, dropout: float | None = None,
                    weight_decay: float | None = None, name: str | None = None) -> Variant:
        """The same recipe (the same layers) with another L2 coefficient or dropout rate.

        Results are keyed by name, so the values given are named too, unless `name` is:
        `VARIANTS["l2"].with_values(l2=3e-4).name == "l2[l2=0.0003]"`. A value the recipe has
        no layer for is an error (ConfigError): it would change nothing.
        """
        if l2 is not None and not self.l2_layers and l2 != self.l2:
            raise ConfigError(f"variant {self.name!r} has no L2 penalty: l2={l2:g} would "
                              "change nothing")
        if dropout is not None and not self.dropout_layers and dropout != self.dropout:
            raise ConfigError(f"variant {self.name!r} has no dropout: dropout={dropout:g} "
                              "would change nothing")
        new = dataclasses.replace(
            self, l2=self.l2 if l2 is None else l2,
            dropout=self.dropout if dropout is None else dropout,
            weight_decay=self.weight_decay if weight_decay is None else weight_decay)
        given = [f"{k}={v:g}" for k, v in (("l2", l2), ("dropout", dropout),
                                          ("weight_decay", weight_decay)) if v is not None]
        if name is None:
            name = f"{self.name}[{','.join(given)}]" if given else self.name
        return dataclasses.replace(new, name=name)

    def at_depth(self, hidden: tuple[int, ...]) -> Variant:
        """The same recipe with its layers named as the model of `hidden` names them."""
        return dataclasses.replace(
            self, l2_layers=resolve_layers(self.l2_layers, hidden),
            dropout_layers=resolve_layers(self.dropout_layers, hidden, output=False))

    def l2_vector(self, hidden: tuple[int, ...]) -> np.ndarray:
        """(n_dense,) float32: the coefficient for each Dense kernel, 0 where not penalised."""
        layers = resolve_layers(self.l2_layers, hidden)
        return np.array([self.l2 if n in layers else 0.0 for n in dense_names(hidden)],
                        np.float32)

    def dropout_vector(self, hidden: tuple[int, ...]) -> np.ndarray:
        """(n_hidden,) float32: the dropout rate after each hidden layer, 0 where none."""
        layers = resolve_layers(self.dropout_layers, hidden, output=False)
        return np.array([self.dropout if n in layers else 0.0 for n in dense_names(hidden)[:-1]],
                        np.float32)

    def validate(self, hidden: tuple[int, ...]) -> None:
        for field, layers, output in (("l2_layers", self.l2_layers, True),
                                      ("dropout_layers", self.dropout_layers, False)):
            try:
                resolve_layers(layers, hidden, output=output)
            except ConfigError as e:
                raise ConfigError(f"variant {self.name!r}: {field} names {e}") from None
        check_regularisation(self.l2, self.dropout, f" (variant {self.name!r})",
                             self.weight_decay)
        lr = self.learning_rate
        if lr is not None and not (isinstance(lr, int | float) and math.isfinite(lr) and lr >= 0):
            raise ConfigError(f"--lr {lr!r} (variant {self.name!r}) must be a finite number >= 0")

    def describe(self, hidden: tuple[int, ...]) -> str:
        """What this variant does to the model of `hidden`, layer by layer, in words."""
        l2 = resolve_layers(self.l2_layers, hidden)
        dropout = resolve_layers(self.dropout_layers, hidden, output=False)
        parts = [f"L2 {self.l2:g} on {', '.join(l2)}" if l2 and self.l2 else "no L2",
                 f"dropout {self.dropout:g} after {', '.join(dropout)}"
                 if dropout and self.dropout else "no dropout"]
        if self.weight_decay:
            parts.append(f"weight decay {self.weight_decay:g}")
        return "; ".join(parts)

    def learning_rate_or(self, default: float) -> float:
        """This variant's learning rate, or `default` (the TrainConfig's) if it sets none."""
        return default if self.learning_rate is None else self.learning_rate


def check_regularisation(l2: float, dropout: float, where: str = "",
                         weight_decay: float = 0.0) -> None:
    """An L2 coefficient and a weight decay must be finite and >= 0, a dropout rate in [0, 1);
    `where` names the variant in the message, if any."""
    if not (isinstance(l2, int | float) and math.isfinite(l2) and l2 >= 0):
        raise ConfigError(f"--l2 {l2!r}{where} must be a finite number >= 0")
    if not (isinstance(dropout, int | float) and 0.0 <= dropout < 1.0):
        raise ConfigError(f"--dropout {dropout!r}{where} must lie in [0, 1): it is the fraction "
                          "of units dropped")
    if not (isinstance(weight_decay, int | float) and math.isfinite(weight_decay)
            and weight_decay >= 0):
        raise ConfigError(f"--weight-decay {weight_decay!r}{where} must be a finite number >= 0 "
                          "(each step removes weight_decay * learning_rate of every weight)")


def check_decay_used(weight_decay_on: str, decays: bool) -> None:
    """A --weight-decay-on other than the default, in a run that never decays, changes
    nothing: an error, for experiments and sweeps alike."""
    if weight_decay_on != "all" and not decays:
        raise ConfigError(f"--weight-decay-on {weight_decay_on} changes nothing without a "
                          "--weight-decay above 0; give one or leave it out")


L2 = 0.001
DROPOUT = 0.45
VARIANTS: Mapping[str, Variant] = types.MappingProxyType({
    "baseline": Variant("baseline"),
    "l2": Variant("l2", l2=L2, l2_layers=("hidden_1",)),
    "dropout": Variant("dropout", dropout=DROPOUT, dropout_layers=("hidden",)),
    "l2_dropout": Variant("l2_dropout", l2=L2, l2_layers=("hidden",), dropout=DROPOUT,
                          dropout_layers=("hidden",)),
})


def select_variants(names: Sequence[str], *, l2: float | None = None,
                    dropout: float | None = None, weight_decay: float = 0.0,
                    ) -> tuple[Variant, ...]:
    """The named built-in variants, with `l2` / `dropout` replacing their defaults and
    `weight_decay` given to every one."""
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ConfigError(f"unknown variant {', '.join(map(repr, unknown))}; choose from "
                          f"{', '.join(VARIANTS)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"--variants lists a variant twice: {', '.join(names)}")
    if not names:
        raise ConfigError("--variants is empty; name at least one of " + ", ".join(VARIANTS))
    # The study's flags set its variants' values, keeping their names.
    return tuple(VARIANTS[n].with_values(l2=l2 if VARIANTS[n].l2_layers else None,
                                         dropout=dropout if VARIANTS[n].dropout_layers else None,
                                         weight_decay=weight_decay, name=n) for n in names)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train: Keras `fit` semantics, Keras's Adam and its defaults.

    `optimizer`: 'keras-adam' (Adam as Keras computes it) or 'adam' (optax's); `loss`: the
    cross-entropy 'logits' (Keras on TensorFlow) or 'clipped' (Keras on JAX and PyTorch for a
    softmax output), see `steps.cross_entropy`.
    """

    epochs: int = 20
    batch_size: int = 128
    validation_split: float = 0.3
    learning_rate: float = 1e-3
    optimizer: str = "keras-adam"
    loss: str = "logits"
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-7
    hidden: tuple[int, ...] = (256, 256)
    eval_batch_size: int = 2000
    data_parallel: int = 1
    model_parallel: int = 1  # devices the models axis is sharded over (stack placement)
    placement: str = "auto"  # models of a stack: stack, sequential, concurrent or auto
    dropout_rng: str = "hash"  # the dropout masks' generator: 'hash' or 'threefry'
    # 'float32', or 'bfloat16': matmul operands in bfloat16, everything else float32.
    dtype: str = "float32"
    # 'default' (XLA's: TF32 on NVIDIA Ampere and later, float32 on CPU) or 'highest'.
    matmul_precision: str = "default"
    weight_decay_on: str = "all"  # what a variant's weight decay shrinks: WEIGHT_DECAY_ON

    @classmethod
    def from_dict(cls, d: Mapping) -> TrainConfig:
        """A TrainConfig from its recorded dict (run.json), older runs' keys included."""
        d = dict(d)
        d["hidden"] = tuple(d["hidden"])
        # Runs started before the optimizer was a setting trained with optax's Adam.
        d.setdefault("optimizer", "adam")
        for old, new in (("schedule", "placement"), ("precision", "dtype")):  # renamed
            if old in d:
                d.setdefault(new, d.pop(old))
        return cls(**d)

    def validate(self, n_train: int = 60000) -> None:
        """Raises ConfigError naming the flag and its valid range; `n_train` before the split."""
        def integer(flag: str, value, low: int, high: int | None = None) -> None:
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
            if not ok or (high is not None and value > high):
                bound = f"between {low} and {high}" if high is not None else f">= {low}"
                raise ConfigError(f"{flag} {value!r} must be an integer {bound}")

        integer("--epochs", self.epochs, 1)
        if not (isinstance(self.validation_split, int | float)
                and 0.0 <= self.validation_split < 1.0):
            raise ConfigError(f"--validation-split {self.validation_split!r} must lie in [0, 1)")
        n_fit = math.floor(n_train * (1.0 - self.validation_split))
        # Where preprocessing.split_index cuts: refused here, before the run directory exists.
        if n_fit == 0 or (self.validation_split > 0 and n_fit == n_train):
            raise ConfigError(f"--validation-split {self.validation_split!r} leaves no training "
                              f"or no validation samples out of {n_train}; choose a fraction "
                              f"between {1 / n_train:.2g} and {1 - 1 / n_train:.6g}")
        integer("--batch-size", self.batch_size, 1, n_fit)
        if not (math.isfinite(self.learning_rate) and self.learning_rate >= 0):
            raise ConfigError(f"--lr {self.learning_rate!r} must be a finite number >= 0")
        for flag, value, choices in (("--optimizer", self.optimizer, OPTIMIZERS),
                                     ("--loss", self.loss, LOSS_FORMS)):
            if value not in choices:
                raise ConfigError(f"{flag} {value!r} must be one of {', '.join(choices)}")
        for flag, value in (("b1", self.b1), ("b2", self.b2)):
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"Adam {flag} {value!r} must lie in [0, 1)")
        if not self.eps > 0:
            raise ConfigError(f"Adam eps {self.eps!r} must be > 0")
        check_hidden(self.hidden)
        integer("--eval-batch-size", self.eval_batch_size, 1)
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"--placement {self.placement!r} must be one of "
                              f"{', '.join(PLACEMENTS)}")
        if self.dropout_rng not in DROPOUT_RNGS:
            raise ConfigError(f"--dropout-rng {self.dropout_rng!r} must be one of "
                              f"{', '.join(DROPOUT_RNGS)}")
        integer("--data-parallel", self.data_parallel, 1)
        if self.batch_size % self.data_parallel or self.eval_batch_size % self.data_parallel:
            raise ConfigError(f"--batch-size {self.batch_size} and --eval-batch-size "
                              f"{self.eval_batch_size} must be multiples of --data-parallel "
                              f"{self.data_parallel}, so each device gets an equal share")
        for flag, value, choices in (("--dtype", self.dtype, DTYPES),
                                     ("--matmul-precision", self.matmul_precision,
                                      MATMUL_PRECISIONS),
                                     ("--weight-decay-on", self.weight_decay_on,
                                      WEIGHT_DECAY_ON)):
            if value not in choices:
                raise ConfigError(f"{flag} {value!r} must be one of {', '.join(choices)}")
        integer("--model-parallel", self.model_parallel, 1)
        if self.model_parallel > 1 and (self.data_parallel > 1
                                        or self.placement in ("sequential", "concurrent")):
            raise ConfigError(f"--model-parallel {self.model_parallel} shards one vmapped "
                              "stack of models over devices: it needs --placement stack (or "
                              "auto) and --data-parallel 1")
        if self.placement == "concurrent" and self.data_parallel > 1:
            raise ConfigError(f"--placement concurrent runs several programs at once, which "
                              f"cannot share devices with --data-parallel "
                              f"{self.data_parallel} (their collectives could interleave); "
                              f"use --placement sequential or stack")


MAX_DEPTH = 8  # hidden layers
MAX_WIDTH = 8192  # units in a hidden layer


def check_hidden(hidden: Sequence[int]) -> None:
    """1 to MAX_DEPTH hidden layers of 1 to MAX_WIDTH units each."""
    ok = (isinstance(hidden, tuple) and 1 <= len(hidden) <= MAX_DEPTH
          and all(isinstance(h, int) and not isinstance(h, bool) and 1 <= h <= MAX_WIDTH
                  for h in hidden))
    if not ok:
        shown = ",".join(map(str, hidden)) if isinstance(hidden, tuple | list) else repr(hidden)
        raise ConfigError(f"--hidden {shown} must be 1 to {MAX_DEPTH} widths, each an integer "
                          f"from 1 to {MAX_WIDTH}, e.g. 256,256 or 512,512,512")


def parse_hidden(text: str) -> tuple[int, ...]:
    """'512,512' -> (512, 512): the widths of the hidden layers (TrainConfig.validate checks
    them: check_hidden)."""
    try:
        hidden = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"--hidden {text!r} must be widths separated by commas, e.g. "
                          f"256,256 or 512,512,512 (1 to {MAX_DEPTH} of 1 to {MAX_WIDTH})"
                          ) from None
    return hidden


def check_seeds(seeds: Sequence[int]) -> None:
    """Seeds must be distinct integers >= 0, at least one."""
    if not seeds or len(set(seeds)) != len(seeds) or any(
            not isinstance(s, int) or s < 0 for s in seeds):
        raise ConfigError(f"--seeds {seeds} must be distinct integers >= 0")


def parse_seeds(text: str) -> tuple[int, ...]:
    """'0,1,2' or '0-4' -> (0, 1, 2) / (0, 1, 2, 3, 4); distinct integers >= 0."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part[1:]:
                low, high = (int(x) for x in part.split("-", 1))
                if low > high:
                    raise ConfigError(f"--seeds {text!r}: the range {part} is reversed; "
                                      f"write {high}-{low}")
                seeds.extend(range(low, high + 1))
            else:
                seeds.append(int(part))
    except ValueError as e:
        raise ConfigError(f"--seeds {text!r} must be integers like '0,1,2' or '0-4'") from e
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r} must list distinct integers >= 0")
    return tuple(seeds)
