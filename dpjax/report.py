"""``dpjax-report DIR``: one table and one privacy-utility plot of a (multi)run.

Reads every ``summary.json`` under ``DIR`` (one per run directory, so a run
that was preempted and resumed is counted once, with its final summary) and
writes ``results.csv``, ``results.md`` and ``privacy_utility.png`` into ``DIR``.
Failed runs are listed with their error; the plot shows accuracy against
epsilon, with the non-private baseline as a horizontal line when present. Only
``summary.json`` is read: non-private diagnostics never reach the report.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

COLUMNS = (
    "run", "status", "randomness", "dataset", "model", "noise_multiplier", "epsilon", "delta",
    "steps", "test_accuracy", "stopped_reason", "error",
)
OUTPUTS = ("results.csv", "results.md", "privacy_utility.png")


def collect(root: Path) -> list[dict[str, Any]]:
    """One row per ``summary.json`` under ``root`` (its directory names the run)."""
    rows = []
    for path in sorted(root.rglob("summary.json")):
        run = str(path.parent.relative_to(root)) or "."
        try:
            summary = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            summary = {"status": "failed", "error": f"unreadable summary.json: {err}"}
        rows.append({"run": run, **summary})
    rows.sort(key=_sort_key)
    return rows


def _sort_key(row):
    eps = row.get("epsilon")
    return (row.get("status") != "completed", not row.get("dp_enabled", True),
            eps if isinstance(eps, int | float) else math.inf, row["run"])


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_csv(rows, path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k) for k in COLUMNS})


def markdown_table(rows) -> str:
    head = ("| run | sigma | epsilon | delta | steps | test accuracy | stopped | randomness |\n"
            "|---|---:|---:|---:|---:|---:|---|---|\n")
    body = []
    for r in rows:
        if r.get("status") != "completed":
            continue
        eps = "non-private" if not r.get("dp_enabled", True) else _fmt(r.get("epsilon"))
        acc = r.get("test_accuracy")
        body.append(
            f"| {r['run']} | {_fmt(r.get('noise_multiplier'))} | {eps} | {_fmt(r.get('delta'))} "
            f"| {_fmt(r.get('steps'))} | {100 * acc:.2f}% | {_fmt(r.get('stopped_reason'))} "
            f"| {_fmt(r.get('randomness'))} |"
        )
    text = head + "\n".join(body) + "\n"
    failed = [r for r in rows if r.get("status") != "completed"]
    if failed:
        text += "\nFailed runs:\n\n" + "\n".join(
            f"- `{r['run']}`: {r.get('error', 'no error recorded')}" for r in failed
        ) + "\n"
    return text


def plot(rows, path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    done = [r for r in rows if r.get("status") == "completed"]
    private = sorted((r for r in done if r.get("dp_enabled", True) and r.get("epsilon")),
                     key=lambda r: r["epsilon"])
    baseline = [r for r in done if not r.get("dp_enabled", True)]
    fig, ax = plt.subplots(figsize=(6, 4))
    if private:
        ax.plot([r["epsilon"] for r in private], [100 * r["test_accuracy"] for r in private],
                "o-", label="DP-SGD")
        for r in private:
            ax.annotate(f"σ={r['noise_multiplier']:.3g}", (r["epsilon"], 100 * r["test_accuracy"]),
                        textcoords="offset points", xytext=(4, -10), fontsize=8)
        ax.set_xscale("log")
    for i, r in enumerate(baseline):
        ax.axhline(100 * r["test_accuracy"], color="gray", linestyle="--",
                   label="non-private" if i == 0 else None)
    deltas = sorted({r["delta"] for r in private})
    ax.set_xlabel("epsilon" + (f" (delta = {', '.join(f'{d:g}' for d in deltas)})"
                               if deltas else ""))
    ax.set_ylabel("test accuracy (%)")
    names = sorted({f"{r.get('dataset')} / {r.get('model')}" for r in done})
    ax.set_title(", ".join(names) or "no completed runs")
    ax.grid(True, alpha=0.3)
    if private or baseline:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(root: str | Path) -> list[dict[str, Any]]:
    """Writes the three outputs into ``root`` and returns the rows."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Expected a run or multirun directory; {root} does not exist.")
    rows = collect(root)
    if not rows:
        raise FileNotFoundError(f"No summary.json under {root}: is it a dpjax-train output dir?")
    write_csv(rows, root / "results.csv")
    (root / "results.md").write_text(markdown_table(rows))
    plot(rows, root / "privacy_utility.png")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpjax-report", description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="a dpjax-train run or multirun directory")
    args = parser.parse_args(argv)
    try:
        rows = report(args.directory)
    except FileNotFoundError as err:
        print(f"dpjax-report: {err}", file=sys.stderr)
        return 2
    failed = [r for r in rows if r.get("status") != "completed"]
    print((Path(args.directory) / "results.md").read_text(), end="")
    print(f"{len(rows) - len(failed)} completed, {len(failed)} failed; wrote "
          f"{', '.join(OUTPUTS)} in {args.directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
