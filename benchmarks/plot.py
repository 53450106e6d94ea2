"""One PNG of a benchmark run: batch sweep, stacks, regularisation costs, study vs peers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

from benchmarks.harness import Results
from mnist_jax import plots


def figure(results: Results) -> Figure:
    fig = Figure(figsize=(14, 9), layout="constrained")
    (ax_sweep, ax_stack), (ax_cost, ax_study) = fig.subplots(2, 2)
    d = results.records[0] if results.records else {}
    fig.suptitle(f"mnist_jax benchmarks on {d.get('device_count', '?')} x "
                 f"{d.get('device_kind', '?')} ({d.get('backend', '?')})")

    sweep = sorted({r["batch"]: r for r in results.find("epoch", variant="baseline",
                                                         dropout_rng="hash")}.values(),
                   key=lambda r: r["batch"])
    if sweep:
        ax_sweep.plot([r["batch"] for r in sweep], [r["samples_per_s"] for r in sweep], "o-")
        for r in sweep:
            ax_sweep.annotate(f"{r['flop_utilisation']:.0%}", (r["batch"], r["samples_per_s"]),
                              textcoords="offset points", xytext=(0, 6), ha="center",
                              fontsize=7)
        ax_sweep.set_ylim(0, max(r["samples_per_s"] for r in sweep) * 1.12)
        ax_sweep.set(xscale="log", xlabel="batch size", ylabel="training samples / s",
                     title="compiled epoch, baseline (labels: share of the matmul peak)")
        ax_sweep.grid(alpha=0.3)

    for placement, style in (("stack", "o-"), ("sequential", "s--"), ("concurrent", "^-")):
        rows = sorted((r for r in results.find("stack")
                       if r["placement"] == placement or r["models"] == 1),
                      key=lambda r: r["models"])
        if rows:
            ax_stack.plot([r["models"] for r in rows], [r["samples_per_s"] for r in rows],
                          style, label=placement)
    sizes = sorted({r["models"] for r in results.find("stack")})
    ax_stack.set(xscale="log", xticks=sizes, xticklabels=[str(n) for n in sizes],
                 xlabel="models trained together",
                 ylabel="samples / s, all models", title="many models: vmapped, one after "
                 "another, or concurrent")
    ax_stack.xaxis.set_minor_locator(NullLocator())
    ax_stack.set_ylim(bottom=0)
    ax_stack.grid(alpha=0.3)
    if ax_stack.lines:
        ax_stack.legend(loc="lower right")

    costs = [r for r in results.find("cost_vs_baseline")
             if "dropout" in r["variant"] or r["dropout_rng"] == "hash"]
    if costs:
        labels = [r["variant"] + (f"\n({r['dropout_rng']} masks)" if "dropout" in r["variant"]
                                  else "") for r in costs]
        bars = ax_cost.bar(labels, [r["ratio"] for r in costs], color=plots.COLORS[1])
        ax_cost.bar_label(bars, labels=[f"{r['ratio']:.2f}x" for r in costs], fontsize=8)
        ax_cost.axhline(1.0, color="black", linewidth=0.8)
        ax_cost.set(ylabel="epoch time / baseline", title="cost of the regularisers")
        ax_cost.tick_params(axis="x", labelsize=8)

    study = results.find("study", run="cold_cache")  # the peers compile from cold too
    peers = [r for r in results.find("peer") if "fit_s" in r]
    if study and "fit_equivalent_s" in study[0]:
        names = ["mnist_jax"] + [r["stack"] for r in peers]
        times = [study[0]["fit_equivalent_s"]] + [r["fit_s"] for r in peers]
        accs = [study[0]["test_accuracy"]] + [r["test_accuracy"] for r in peers]
        bars = ax_study.bar(names, times, color=[plots.COLORS[i % len(plots.COLORS)]
                                                 for i in range(len(names))])
        ax_study.bar_label(bars, labels=[
            f"{t:.0f} s\nacc {np.mean(list(a.values())):.2%}" for t, a in zip(
                times, accs, strict=True)], fontsize=8)
        ax_study.set(ylabel="seconds (compile + fit + evaluate, 4 variants)",
                     title=f"the study, {study[0]['epochs']} epochs (first run)")
        ax_study.set_ylim(0, max(times) * 1.25)
        ax_study.tick_params(axis="x", labelsize=8)
    return fig


def save(results: Results, path: Path) -> None:
    plots.save(figure(results), path)


if __name__ == "__main__":  # re-plot a run: python -m benchmarks.plot results.json out.png
    import json
    import sys

    loaded = Results.__new__(Results)
    data = json.loads(Path(sys.argv[1]).read_text())
    loaded.records, loaded.environment = data["records"], data["environment"]
    save(loaded, Path(sys.argv[2]))
