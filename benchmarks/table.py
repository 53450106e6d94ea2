"""The speed table: `python -m benchmarks.table` prints it from docs/speed.json.

One row per machine measured: the whole study's process as a user runs it (ours with a cold
compilation cache, as the peers compile from cold) against each peer timed beside it in the
same session, as peer time / ours. Each row names its CPU (or GPU), date and commit, and the
results file its numbers come from (`python -m benchmarks --peers ...` writes those); a row
without a file states its numbers and their source. README.md and docs/benchmarks.md show this
table as printed (this command writes it there; a test checks).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).parents[1]
MANIFEST = ROOT / "docs" / "speed.json"
PEERS = {"keras-jax": "Keras 3 on JAX", "keras-tensorflow": "Keras 3 on TensorFlow",
         "torch-eager": "PyTorch (eager)"}


def measure(row: dict[str, Any]) -> tuple[float, dict[str, float]]:
    """Our cold process's seconds and each peer's process time / ours: from the row's results
    files, each peer against the study timed in its own file (session), or from the numbers
    the row states."""
    if "seconds" in row:
        ours = row["seconds"]["ours"]
        return ours, {p: row["seconds"][p] / ours for p in PEERS if p in row["seconds"]}
    first, found = None, {}
    for name in row["files"]:
        records = json.loads((ROOT / name).read_text())["records"]
        ours = next(r["process_wall_s"] for r in records
                    if r["name"] == "study" and r.get("run") == "cold_cache")
        first = first or ours
        found.update({r["stack"]: r["process_wall_s"] / ours for r in records
                      if r["name"] == "peer" and r.get("stack") in PEERS
                      and "process_wall_s" in r})
    return first, found


def render(manifest: Path = MANIFEST) -> str:
    rows = json.loads(manifest.read_text())["rows"]
    head = ["machine", "date · code", "ours", *PEERS.values()]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        ours, r = measure(row)
        cells = [row["machine"], f"{row['date']} · `{row['commit']}`", f"{ours:.1f} s"]
        cells += [f"**{r[p]:.2f}x**" if p in r else "–" for p in PEERS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_row(results: Path, machine: str, manifest: Path = MANIFEST) -> dict[str, Any]:
    """Adds (or replaces, for the same machine) the row of a `python -m benchmarks --peers`
    results file, with the date and commit it recorded; returns the row."""
    env = json.loads(results.read_text())["environment"]
    row = {"machine": machine, "date": env.get("date"), "commit": env.get("commit"),
           "files": [str(results.resolve().relative_to(ROOT))]}
    measure(row)  # refuses a file without the study and its peers now, not when rendering
    data = json.loads(manifest.read_text())
    data["rows"] = [r for r in data["rows"] if r["machine"] != machine] + [row]
    manifest.write_text(json.dumps(data, indent=2) + "\n")
    return row


def write_into(path: Path, manifest: Path = MANIFEST) -> None:
    """Replaces the speed table in a Markdown file (the block starting with its header row,
    or the line SPEED_TABLE) with the one the results make now."""
    text = path.read_text().splitlines()
    header = render(manifest).splitlines()[0]
    if "SPEED_TABLE" in text:
        start = end = text.index("SPEED_TABLE")
    else:
        start = text.index(header)
        end = start
        while end + 1 < len(text) and text[end + 1].startswith("|"):
            end += 1
    path.write_text("\n".join(text[:start] + render(manifest).splitlines() + text[end + 1:])
                    + "\n")


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--add", type=Path, metavar="RESULTS_JSON",
                        help="add this results file's row first (with --machine)")
    parser.add_argument("--machine", help="the row's name: CPU model and the flags that matter")
    args = parser.parse_args()
    if args.add:
        if not args.machine:
            parser.error("--add needs --machine, e.g. 'Intel Xeon, 2 cores (AVX-512, AMX)'")
        add_row(args.add, args.machine)
    for page in (ROOT / "README.md", ROOT / "docs" / "benchmarks.md"):
        write_into(page)
    print(render())


if __name__ == "__main__":
    main()
