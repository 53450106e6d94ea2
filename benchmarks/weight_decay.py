"""L2 against decoupled weight decay under Adam: `python -m benchmarks.weight_decay`.

For each width (`--hidden 256,256 --hidden 1024,1024`), one stack of the baseline, L2 on
every kernel at each `--l2` coefficient and Keras 3's decoupled weight decay of the kernels
at each `--weight-decay` value, times `--seeds`, trained 20 epochs as the study trains. Each
family's coefficient is chosen on validation accuracy (mean over seeds); test accuracy is
then compared seed by seed (paired 95% t-intervals, Holm-corrected over the comparisons
made). Writes one JSON file (machine, timings, every model's numbers) and two figures;
docs/weight-decay.md reads them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

L2_VALUES = (1e-5, 1e-4, 1e-3)
# One step removes weight_decay * lr of a weight: at lr 1e-3 over 20 epochs (6,580 steps) a
# decay of 1e-4 shrinks it by 0.07% in all, too little to tell from the baseline; so the grid
# starts at 1e-3 and reaches 1, where the shrinkage (exp(-6.6) with no gradient) dominates.
WD_VALUES = (1e-3, 1e-2, 1e-1, 1.0)


def variants(l2_values, wd_values):
    from mnist_jax.config import Variant

    return ([Variant("baseline")]
            + [Variant(f"l2={c:g}", l2=c, l2_layers=("all",)) for c in l2_values]
            + [Variant(f"wd={c:g}", weight_decay=c) for c in wd_values])


def run_width(hidden: tuple[int, ...], seeds: tuple[int, ...], epochs: int, splits,
              l2_values, wd_values) -> dict:
    from mnist_jax import experiment, fit
    from mnist_jax.config import TrainConfig

    config = TrainConfig(epochs=epochs, hidden=hidden, weight_decay_on="kernels")
    t0 = time.perf_counter()
    stack = fit.train_stack(splits, variants(l2_values, wd_values), seeds, config)
    outcomes = experiment.collect(stack)
    return {"hidden": list(hidden), "seeds": list(seeds), "epochs": epochs,
            "compile_seconds": stack.compile_seconds, "train_seconds": stack.train_seconds,
            "wall_seconds": time.perf_counter() - t0,
            "variants": {r.name: {"variant": dataclasses.asdict(r.variant),
                                  "runs": [run.to_json() for run in r.runs]}
                         for r in outcomes}}


def analyse(width: dict) -> dict:
    """The choice per family on validation, and test comparisons with the baseline and
    between the two families' choices."""
    from mnist_jax import results

    outcomes = {name: results.VariantResult(results.variant_from_json(v["variant"]),
                                            tuple(results.Run.from_json(r) for r in v["runs"]))
                for name, v in width["variants"].items()}
    chosen = {}
    for family in ("l2", "wd"):
        candidates = [r for n, r in outcomes.items() if n.startswith(family + "=")]
        chosen[family] = results.select(candidates).chosen
    pairs = [(n, "baseline") for n in outcomes if n != "baseline"]
    pairs.append((chosen["wd"], chosen["l2"]))
    comparisons = [c.to_json() for c in results.holm(
        [results.compare(outcomes[a], outcomes[b]) for a, b in pairs])]
    summary = {n: {k: r.stats()[k] for k in ("val_accuracy", "test_accuracy")}
               for n, r in outcomes.items()}
    return {"chosen": chosen, "comparisons": comparisons, "summary": summary}


def figure(records: list[dict], path: Path) -> None:
    """Test accuracy (mean, 95% interval over seeds) against each family's coefficient, one
    row per width, the baseline as a band; shared y-axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mnist_jax import stats

    fig, axes = plt.subplots(len(records), 2, figsize=(9, 3.2 * len(records)), sharey=True,
                             squeeze=False)
    for row, rec in zip(axes, records, strict=True):
        width = "-".join(map(str, rec["hidden"]))
        acc = {n: [100 * r["test"]["accuracy"] for r in v["runs"]]
               for n, v in rec["variants"].items()}
        n = len(rec["seeds"])
        base, base_half = stats.mean_ci95(acc["baseline"])
        for ax, family, label in ((row[0], "l2", "L2 coefficient (every kernel, in the loss)"),
                                  (row[1], "wd", "weight decay (every kernel, decoupled)")):
            names = [k for k in acc if k.startswith(family + "=")]
            xs = [float(k.split("=")[1]) for k in names]
            ms = [stats.mean_ci95(acc[k]) for k in names]
            ax.axhspan(base - base_half, base + base_half, color="0.85",
                       label=f"baseline {base:.2f}% (95% CI)")
            ax.axhline(base, color="0.5", lw=1)
            ax.errorbar(xs, [m for m, _ in ms], yerr=[h for _, h in ms], fmt="o", capsize=4,
                        color="C0" if family == "l2" else "C1", label=f"mean, 95% CI (n={n})")
            chosen = rec["analysis"]["chosen"][family]
            i = names.index(chosen)
            ax.plot(xs[i], ms[i][0], "s", mfc="none", mec="k", ms=12,
                    label="chosen on validation")
            ax.set_xscale("log")
            ax.set_xlabel(label)
            ax.set_title(f"{width}: test accuracy", fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower left")
        row[0].set_ylabel("test accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(records: list[dict]) -> str:
    """The tables docs/weight-decay.md shows: per width, every configuration's validation and
    test accuracy over seeds, then the paired test comparisons in points."""
    lines = []
    for rec in records:
        width, a = "-".join(map(str, rec["hidden"])), rec["analysis"]
        n = len(rec["seeds"])
        lines += [f"### {width} ({n} seeds, {rec['train_seconds'] / 60:.1f} min of training)",
                  "", "| configuration | val acc (mean ± sd) | test acc (mean ± sd) |",
                  "|---|---|---|"]
        for name, s in a["summary"].items():
            mark = " (chosen)" if name in a["chosen"].values() else ""
            lines.append(f"| `{name}`{mark} | {100 * s['val_accuracy']['mean']:.2f} ± "
                         f"{100 * s['val_accuracy']['std']:.2f} | "
                         f"{100 * s['test_accuracy']['mean']:.2f} ± "
                         f"{100 * s['test_accuracy']['std']:.2f} |")
        lines += ["", f"Paired test differences, in points ({len(a['comparisons'])} "
                  "comparisons; Holm-corrected p):", "",
                  "| a − b | mean | 95% interval | p (Holm) | real at 5%? |",
                  "|---|---|---|---|---|"]
        for c in a["comparisons"]:
            verdict = "yes" if c["real"] else "not shown"
            lines.append(f"| `{c['a']}` − `{c['b']}` | {100 * c['mean']:+.2f} | "
                         f"[{100 * c['ci95_low']:+.2f}, {100 * c['ci95_high']:+.2f}] | "
                         f"{c['p_holm']:.3f} | {verdict} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", action="append", default=None,
                        help="widths, repeatable (default: 256,256 and 1024,1024)")
    parser.add_argument("--seeds", default="0-4")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("docs/weight-decay.json"))
    parser.add_argument("--figure", type=Path, default=Path("docs/figures/weight_decay.png"))
    parser.add_argument("--markdown", type=Path, default=None, metavar="JSON",
                        help="print the tables of a finished run's JSON, and redraw its figure")
    args = parser.parse_args()
    if args.markdown:
        records = json.loads(args.markdown.read_text())["widths"]
        for rec in records:  # the analysis of this code, from the recorded runs
            rec["analysis"] = analyse(rec)
        print(markdown(records))
        figure(records, args.figure)
        return
    from mnist_jax import fit, runtime
    from mnist_jax.config import parse_hidden, parse_seeds
    from mnist_jax.data import load_mnist

    runtime.enable_compilation_cache()
    seeds = parse_seeds(args.seeds)
    shapes = [parse_hidden(h) for h in (args.hidden or ["256,256", "1024,1024"])]
    splits = fit.prepare(load_mnist(), 0.3)
    t0 = time.perf_counter()
    records = []
    for hidden in shapes:
        rec = run_width(hidden, seeds, args.epochs, splits, L2_VALUES, WD_VALUES)
        rec["analysis"] = analyse(rec)
        records.append(rec)
        print(json.dumps({"hidden": rec["hidden"], "train_seconds": rec["train_seconds"],
                          "chosen": rec["analysis"]["chosen"]}), flush=True)
        out = {"command": "python -m benchmarks.weight_decay", "cpu": runtime.cpu(),
               "environment": runtime.environment(),
               "wall_seconds": time.perf_counter() - t0, "widths": records}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    figure(records, args.figure)


if __name__ == "__main__":
    main()
