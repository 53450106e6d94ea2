"""Results as files a person opens: report.md with the figures, metrics.json, CSV histories."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mnist_jax import files
from mnist_jax.config import DROPOUT, L2, WEIGHT_DECAY_ON, TrainConfig, resolve_layers
from mnist_jax.fit import HISTORY_KEYS

CSV_COLUMNS = ("epoch", *HISTORY_KEYS)
# The original Keras study's single-run test results: (accuracy, loss).
ORIGINAL = {"baseline": (0.980, 0.1009), "l2": (0.977, 0.1253), "dropout": (0.979, 0.0776),
            "l2_dropout": (0.972, 0.2111)}


OPTIMIZER_NAMES = {"keras-adam": "Adam as Keras computes it (eps on the uncorrected sqrt(v))",
                   "adam": "optax's Adam (eps on the bias-corrected sqrt(v))"}
LOSS_NAMES = {"logits": "softmax cross-entropy from the logits (as Keras on TensorFlow)",
              "clipped": "cross-entropy of the probabilities clipped to [1e-7, 1 - 1e-7] (as "
                         "Keras on JAX and PyTorch)"}


CRITERIA = {"val_accuracy": "validation accuracy", "accuracy": "training accuracy (there is no "
            "validation set)"}
# What the original study's recipe fixes (the defaults are that recipe): its column appears
# only beside runs of it.
RECIPE_FIELDS = ("epochs", "batch_size", "validation_split", "learning_rate", "hidden")


def is_original_recipe(cfg: Mapping[str, Any]) -> bool:
    """Whether a run's config (as metrics.json holds it) is the original study's recipe."""
    default = TrainConfig()
    for field in RECIPE_FIELDS:
        value = cfg["train"][field]  # JSON turned the hidden sizes' tuple into a list
        if (tuple(value) if isinstance(value, list) else value) != getattr(default, field):
            return False
    return cfg["l2"] == L2 and cfg["dropout"] == DROPOUT and not cfg.get("weight_decay")


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def history_csv(history: Mapping[str, list[float]]) -> str:
    """One row per epoch; columns absent from the history (no validation) are left out."""
    columns = [c for c in CSV_COLUMNS if c == "epoch" or c in history]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for i in range(len(history["loss"])):
        writer.writerow([i + 1] + [repr(float(history[c][i])) for c in columns[1:]])
    return out.getvalue()


def _pm(stats: Mapping[str, Any], fmt: str) -> str:
    """'mean' or 'mean ± sd' with the given format (percent formats scale by 100)."""
    mean = format(stats["mean"], fmt)
    return mean if stats.get("std") is None else f"{mean} ± {format(stats['std'], fmt)}"


def _software(env: Mapping[str, Any]) -> str:
    return (f"- Software: Python {env['python']}, jax {env['versions'].get('jax')}, flax "
            f"{env['versions'].get('flax')}, optax {env['versions'].get('optax')}; "
            f"backend {env['device']['platform']}.")


def _layers(names) -> str:
    return ", ".join(names) if names else "–"


def render_markdown(results: Mapping[str, Any]) -> str:
    """The report: results first, then whether the differences are real, then the figures,
    then how the numbers were made."""
    cfg, env, data = results["config"], results["environment"], results["data"]
    variants = results["variants"]
    seeds = cfg["seeds"]
    several = len(seeds) > 1
    best = results["best_variant"]
    n_models = len(variants) * len(seeds)
    epochs = cfg["train"]["epochs"]
    over = f" over {len(seeds)} seeds" if several else f" (seed {seeds[0]})"
    test_best = f"test accuracy {_pm(variants[best]['stats']['test_accuracy'], '.2%')}{over}"
    if len(variants) > 1:
        criterion = CRITERIA[results["selection"]["on"]]
        how = f"mean over {len(seeds)} seeds" if several else f"one seed, {seeds[0]}"
        headline = (f"**Chosen variant: `{best}`**, the best {criterion} ({how}, "
                    f"{results['selection']['values'][best]:.2%}); the test set was not used "
                    f"to choose. Its {test_best}.")
    else:
        headline = f"**Variant `{best}`**: {test_best}."
    lines = [
        f"# MNIST MLP study ({results['created']})",
        "",
        headline + " "
        f"{_plural(n_models, 'model')} of {results['model']['parameters']:,} parameters "
        f"({results['model']['architecture']}) trained for {_plural(epochs, 'epoch')} at "
        f"batch {cfg['train']['batch_size']} with one compiled program "
        f"({results['timing']['placement']} placement) on "
        f"{env['device']['count']} × {env['device']['kind']}: "
        f"{results['timing']['train_seconds']:.1f} s of training after "
        f"{results['timing']['compile_seconds']:.1f} s of compilation.",
        "",
        "## Results",
        "",
    ]
    if several:
        lines += [f"Mean ± standard deviation over seeds {', '.join(map(str, seeds))}.", ""]
    original = is_original_recipe(cfg)
    decay = any(v["variant"].get("weight_decay") for v in variants.values())
    decay_on = cfg["train"].get("weight_decay_on", "all")
    header = ("| variant | L2 on | dropout after |" + (f" weight decay ({decay_on}) |" if decay
                                                        else "")
              + " train loss | train acc | val loss | val acc "
              "| test loss | **test acc** | acc on all 60k train |"
              + (" original test acc (loss) |" if original else ""))
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for name, v in variants.items():
        st = v["stats"]
        recipe = v["variant"]
        l2 = f"{_layers(recipe['l2_layers'])}" + (f" ({recipe['l2']:g})" if recipe["l2_layers"]
                                                   else "")
        drop = _layers(recipe["dropout_layers"]) + (
            f" ({recipe['dropout']:g})" if recipe["dropout_layers"] else "")
        val_loss = _pm(st["val_loss"], ".4f") if "val_loss" in st else "–"
        val_acc = _pm(st["val_accuracy"], ".2%") if "val_accuracy" in st else "–"
        wd = f" {recipe.get('weight_decay', 0.0):g} |" if decay else ""
        row = (f"| `{name}` | {l2} | {drop} |{wd} {_pm(st['loss'], '.4f')} | "
               f"{_pm(st['accuracy'], '.2%')} | {val_loss} | {val_acc} | "
               f"{_pm(st['test_loss'], '.4f')} | **{_pm(st['test_accuracy'], '.2%')}** | "
               f"{_pm(st['train_full_accuracy'], '.2%')} |")
        if original:
            row += (f" {ORIGINAL[name][0]:.1%} ({ORIGINAL[name][1]:.4f}) |" if name in ORIGINAL
                    else " – |")
        lines.append(row)
    lines += [
        "",
        "Train and validation columns are the last epoch's; train metrics are averaged over "
        "the epoch with dropout active, as Keras reports them. Losses include the L2 penalty, "
        "as Keras's do. 'Acc on all 60k train' is the final model's accuracy on every "
        "training image, the held-out validation rows included, without dropout."
        + (" The original study's column is one Keras run of the same recipe."
           if original else ""),
        "",
    ]
    if len(variants) > 1:
        lines += ["## Are the differences real?", ""]
    if len(variants) > 1 and several:
        lines += [
            "Variants with the same seed share initial weights, batch order and dropout noise, "
            "so each difference is measured seed by seed.",
            "",
            *comparison_table(results["comparisons"]),
        ]
    elif len(variants) > 1:
        lines.append("One seed gives one number per variant and no way to tell a real "
                     "difference from noise: rerun with `--seeds 0,1,2,3,4` for intervals.")
    lines += ["", "## Figures", ""]
    for title, key in (("Comparison of the variants", "comparison"),
                       ("Label distribution", "label_distribution"),
                       ("Random training digits", "digits")):
        if key in results["figures"]:
            lines += [f"### {title}", "", f"![{title}]({results['figures'][key]})", ""]
    for name in variants:
        key = f"curves_{name}"
        if key in results["figures"]:
            lines += [f"### `{name}`: loss and accuracy per epoch", "",
                      f"![{name} curves]({results['figures'][key]})", ""]
    for title, key in ((f"Confusion matrix of `{best}` (test set)", "confusion"),
                       (f"Misclassified test digits of `{best}`", "misclassified")):
        if key in results["figures"]:
            lines += [f"### {title}", "", f"![{title}]({results['figures'][key]})", ""]
    train = cfg["train"]
    lines += [
        "## How these numbers were made",
        "",
        f"- Data: MNIST from `{data['source']}` (cached from `{data['origin']}`), every file "
        "checked against its canonical SHA-256; "
        f"{data['train']:,} training, {data['validation']:,} validation (the last "
        f"{train['validation_split']:.0%} of the training set, as Keras's `validation_split`), "
        f"{data['test']:,} test images.",
        f"- Optimiser: {OPTIMIZER_NAMES[train.get('optimizer', 'adam')]}, learning rate "
        f"{train['learning_rate']:g}, b1 {train['b1']:g}, b2 {train['b2']:g}, eps "
        f"{train['eps']:g}; batch {train['batch_size']}, partial last batch kept; a fresh "
        "shuffle every epoch.",
        f"- Loss: {LOSS_NAMES[train.get('loss', 'logits')]}, in training, validation and test "
        "alike.",
        _software(env),
        "- Files: `metrics.json` (everything here and more), `history_*.csv` (one row per "
        "epoch), `figures/`.",
        "",
    ]
    return "\n".join(lines)


def write(out_dir: str | os.PathLike, results: Mapping[str, Any]) -> None:
    """metrics.json, one CSV history per model and report.md, each written atomically."""
    out = Path(out_dir)
    seeds = results["config"]["seeds"]
    for name, v in results["variants"].items():
        for run in v["runs"]:
            suffix = f"_seed{run['seed']}" if len(seeds) > 1 else ""
            files.write_text(out / f"history_{name}{suffix}.csv", history_csv(run["history"]))
    files.write_json(out / "metrics.json", results)
    files.write_text(out / "report.md", render_markdown(results))


SEARCH_NAMES = {"grid": "grid", "random": "random search (log-uniform L2 and learning rate, "
                "uniform dropout)", "tpe": "Optuna's TPE sampler, asked and told a chunk at a "
                "time"}


def _point(v: Mapping[str, Any]) -> str:
    """A configuration's values in words."""
    l2 = f"L2 {v['l2']:.3g} on {_layers(v['l2_layers'])}" if v["l2_layers"] and v["l2"] else \
        "no L2"
    drop = (f"dropout {v['dropout']:.3g} after {_layers(v['dropout_layers'])}"
            if v["dropout_layers"] and v["dropout"] else "no dropout")
    wd = f", weight decay {v['weight_decay']:.3g}" if v.get("weight_decay") else ""
    return f"{l2}, {drop}, lr {v['learning_rate']:.3g}{wd}"


def _named(name: str, confs: Mapping[str, Any] | None = None) -> str:
    """A configuration as the report names it: an original that is also a grid point says
    which."""
    alias = (confs or {}).get(name, {}).get("grid_point")
    return f"`{name}` (= `{alias}`)" if alias else f"`{name}`"


def comparison_table(comparisons: Sequence[Mapping[str, Any]],
                     confs: Mapping[str, Any] | None = None) -> list[str]:
    """Paired test-accuracy differences in percentage points, each with its 95% interval and
    its p-value Holm-adjusted over the table's comparisons, which decides 'real'."""
    m = len(comparisons)
    lines = [f"| comparison | difference (points) | 95% interval | p (Holm, {m} "
             f"comparison{'s' if m != 1 else ''}) | real at 5%? |", "|---|---|---|---|---|"]
    for c in comparisons:
        verdict = "yes" if c.get("p_holm") is not None and c["p_holm"] < 0.05 else "not shown"
        p = "–" if c.get("p_holm") is None else f"{c['p_holm']:.3f}"
        lines.append(f"| {_named(c['a'], confs)} − {_named(c['b'], confs)} | "
                     f"{100 * c['mean']:+.2f} | [{100 * c['ci95_low']:+.2f}, "
                     f"{100 * c['ci95_high']:+.2f}] | {p} | {verdict} |")
    lines += ["", "The interval is a 95% Student-t interval on the per-seed differences; "
              "'real' asks the paired t-test's p-value, Holm-adjusted for the number of "
              "comparisons, to stay below 0.05."]
    return lines


def _placed(layers: Sequence[str], shapes: Sequence[Sequence[int]], output: bool = True) -> str:
    """Where a sweep puts a regulariser, in words: the layers of its one architecture, or the
    names as given ('every hidden layer') when the architectures differ in depth."""
    if len(shapes) == 1:
        return _layers(resolve_layers(layers, tuple(shapes[0]), output=output))
    words = {"hidden": "every hidden layer", "all": "every layer"}
    return ", ".join(words.get(n, n) for n in layers) + " of each architecture"


def render_sweep(metrics: Mapping[str, Any], top: int = 10) -> str:
    """A sweep's report: the choice and whether it beats the original variants, the heatmaps,
    the best configurations, then how the numbers were made."""
    cfg, env, data = metrics["config"], metrics["environment"], metrics["data"]
    confs, sel = metrics["configurations"], metrics["selection"]
    chosen = sel["configuration"]
    seeds = cfg["seeds"]
    on = sel["on"]
    stats = confs[chosen]["stats"]
    test = _pm(stats["test_accuracy"], ".2%")
    lines = [
        f"# MNIST MLP sweep ({metrics['created']})",
        "",
        f"**Chosen: `{chosen}`** ({_point(confs[chosen]['variant'])}), the best "
        f"{CRITERIA[on]} of {len(confs)} configurations ("
        f"{'mean over ' + str(len(seeds)) + ' seeds' if len(seeds) > 1 else 'one seed'}"
        f", {sel['value']:.2%}); the test set was not used to choose. Its test accuracy: "
        f"{test}. {_plural(metrics['timing']['models'], 'model')} trained for "
        f"{_plural(cfg['train']['epochs'], 'epoch')} ({metrics['timing']['placement']} "
        f"placement) on {env['device']['count']} × {env['device']['kind']} in "
        f"{metrics['timing']['wall_seconds']:.0f} s.",
        "",
    ]
    if metrics["comparisons"]:
        lines += ["## Does it beat the original variants?", ""]
        if len(seeds) > 1:
            lines += [
                "Same seeds, same batch order and dropout noise (and the same initial weights "
                "within an architecture): each difference in test accuracy is measured seed by "
                "seed. The chosen configuration against each original variant, and the best "
                "configuration that is no original against the baseline.", "",
                *comparison_table(metrics["comparisons"], confs)]
        else:
            lines.append("One seed gives no interval: rerun with `--seeds 0-4` to tell a real "
                         "difference from noise.")
        lines.append("")
    figs = metrics.get("figures", {})
    if figs:
        lines += ["## Where the best regularisation lies", ""]
        for key, path in figs.items():
            if key.startswith(("sweep_heatmap", "sweep_points")):
                lines += [f"![{key}]({path})", ""]
    lines += [f"## The best {min(top, len(confs))} configurations", "",
              (f"Mean ± sd over seeds (n = {len(seeds)})" if len(seeds) > 1 else
               f"One seed ({seeds[0]}): no spread to show") +
              f", final epoch; ranked by {CRITERIA[on]}.",
              "", f"| rank | configuration | values | {on.replace('_', ' ')} | test accuracy |",
              "|---|---|---|---|---|"]
    for rank, name in enumerate(sel["ranking"][:top], start=1):
        s = confs[name]["stats"]
        lines.append(f"| {rank} | {_named(name, confs)} | {_point(confs[name]['variant'])} | "
                     f"{_pm(s[on], '.2%')} | {_pm(s['test_accuracy'], '.2%')} |")
    originals = [n for n in sel["ranking"] if confs[n]["original"] and
                 sel["ranking"].index(n) >= top]
    for name in originals:
        s = confs[name]["stats"]
        lines.append(f"| {sel['ranking'].index(name) + 1} | `{name}` (original) | "
                     f"{_point(confs[name]['variant'])} | {_pm(s[on], '.2%')} | "
                     f"{_pm(s['test_accuracy'], '.2%')} |")
    lines.append("")
    if sel["excluded_diverged"]:
        names = ", ".join(f"`{n}`" for n in sel["excluded_diverged"])
        lines += [f"Diverged, not candidates: {names} (see metrics.json: epoch and step).", ""]
    if "sweep_curves" in figs:
        lines += ["## Curves", "", f"![curves]({figs['sweep_curves']})", ""]
    train = cfg["train"]
    shapes = cfg.get("architectures") or [train["hidden"]]
    lines += [
        "## How these numbers were made",
        "",
        f"- Search: {SEARCH_NAMES[cfg['search']]}; L2 on {_placed(cfg['l2_layers'], shapes)}, "
        f"dropout after {_placed(cfg['dropout_layers'], shapes, output=False)}"
        + ("; the original study's four variants trained alongside at learning rate 0.001, "
           "with their own layers (l2: the first hidden kernel only)."
           if cfg["originals"] else "."),
        f"- Choice: {sel['how']}; diverged configurations are not candidates.",
        f"- Data: MNIST from `{data['source']}`, SHA-256 verified; {data['train']:,} training, "
        f"{data['validation']:,} validation (the last {train['validation_split']:.0%}), "
        f"{data['test']:,} test images.",
        (f"- Model: MLP "
         f"{'-'.join(map(str, (784, *(cfg.get('architectures') or [train['hidden']])[0], 10)))}"
         ", ReLU."
         if len(cfg.get("architectures") or ()) < 2 else
         "- Models: MLPs "
         + ", ".join("-".join(map(str, (784, *h, 10))) for h in cfg["architectures"])
         +
         ", ReLU, one stack each, one choice over all. A seed gives every architecture the "
         "same batch order and dropout keys, so pairs across architectures share those; their "
         "initial weights differ, as their shapes do."),
        f"- Training: {OPTIMIZER_NAMES[train['optimizer']]}; batch {train['batch_size']}; "
        f"{LOSS_NAMES[train['loss']]}"
        + (f"; decoupled weight decay (Keras's AdamW) on "
           f"{WEIGHT_DECAY_ON[train.get('weight_decay_on', 'all')]}"
           if any(cfg.get("weight_decay", ())) else "") + ".",
        _software(env),
        "- Files: `metrics.json` (every configuration's histories and statistics, the choice "
        "and why), `sweep.csv` (one row per configuration), `figures/`.",
        "",
    ]
    return "\n".join(lines)


def write_sweep(out_dir: str | os.PathLike, metrics: Mapping[str, Any]) -> None:
    """A sweep's metrics.json and report.md, each written atomically."""
    out = Path(out_dir)
    files.write_json(out / "metrics.json", metrics)
    files.write_text(out / "report.md", render_sweep(metrics))
