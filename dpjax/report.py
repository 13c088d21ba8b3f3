"""``dpjax-report DIR``: one table and one privacy-utility plot of a (multi)run.

Reads every ``summary.json`` under ``DIR`` (one per run directory, so a run
that was preempted and resumed is counted once, with its final summary) and
writes ``results.csv``, ``results.md`` and ``privacy_utility.png`` into ``DIR``.
Audits (``audit.json`` of ``dpjax-audit``) found there get their own rows (an
``epsilon_lower_bound`` column beside the claimed ``epsilon``), a table in
``results.md`` and ``audit.png``: the lower bound against the claimed epsilon
over the sweep, with the line where they are equal.
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
    "run", "status", "randomness", "unit", "dataset", "model", "noise", "noise_multiplier",
    "epsilon", "delta",
    "steps", "test_accuracy", "stopped_reason", "audit", "epsilon_lower_bound", "consistent",
    "error",
)
OUTPUTS = ("results.csv", "results.md", "privacy_utility.png")
AUDIT_PLOT = "audit.png"


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        return {"status": "failed", "error": f"unreadable {path.name}: {err}"}


def collect(root: Path) -> list[dict[str, Any]]:
    """One row per ``summary.json`` under ``root`` (its directory names the run)."""
    rows = []
    for path in sorted(root.rglob("summary.json")):
        rows.append({"run": str(path.parent.relative_to(root)) or ".", **_read(path)})
    rows.sort(key=_sort_key)
    return rows


def collect_audits(root: Path) -> list[dict[str, Any]]:
    """One row per ``audit.json`` under ``root``: the claimed epsilon as ``epsilon``, the
    audit's kind as ``audit``."""
    rows = []
    for path in sorted(root.rglob("audit.json")):
        audit = _read(path)
        rows.append({"run": str(path.parent.relative_to(root)) or ".", **audit,
                     "audit": audit.get("kind"), "epsilon": audit.get("epsilon_claimed")})
    rows.sort(key=lambda r: (r.get("status") != "completed", r["run"]))
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
    head = ("| run | unit | sigma | epsilon | delta | steps | test accuracy | stopped "
            "| randomness |\n|---|---|---:|---:|---:|---:|---:|---|---|\n")
    body = []
    for r in rows:
        if r.get("status") != "completed" or r.get("audit"):
            continue
        eps = "non-private" if not r.get("dp_enabled", True) else _fmt(r.get("epsilon"))
        acc = r.get("test_accuracy")
        body.append(
            f"| {r['run']} | {_fmt(r.get('unit'))} | {_fmt(r.get('noise_multiplier'))} | {eps} "
            f"| {_fmt(r.get('delta'))} "
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


def audit_table(audits) -> str:
    if not audits:
        return ""
    lines = ["", "Audits:", "",
             "| run | audit | method | claimed epsilon | lower bound | delta | consistent |",
             "|---|---|---|---:|---:|---:|---|"]
    for r in audits:
        if r.get("status") != "completed":
            lines.append(f"| {r['run']} | failed: {r.get('error', '')} | | | | | |")
            continue
        lines.append(f"| {r['run']} | {r.get('audit')} | {r.get('method')} "
                     f"| {_fmt(r.get('epsilon_claimed'))} | {_fmt(r.get('epsilon_lower_bound'))} "
                     f"| {_fmt(r.get('delta'))} | {'yes' if r.get('consistent') else 'NO'} |")
    return "\n".join(lines) + "\n"


def plot_audits(audits, path: Path) -> None:
    """Lower bound against claimed epsilon, one marker per audit kind."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    done = [r for r in audits if r.get("status") == "completed"
            and math.isfinite(r.get("epsilon_claimed", math.inf))]
    fig, ax = plt.subplots(figsize=(5, 4))
    for kind in sorted({r["audit"] for r in done}):
        pts = sorted((r["epsilon_claimed"], r["epsilon_lower_bound"]) for r in done
                     if r["audit"] == kind)
        ax.plot(*zip(*pts, strict=True), "o-", label=kind)
    top = max([r["epsilon_claimed"] for r in done] + [1.0])
    ax.plot([0, top], [0, top], color="gray", linestyle="--", label="lower bound = claim")
    ax.set_xlabel("claimed epsilon")
    ax.set_ylabel("audited epsilon lower bound")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    rows, audits = collect(root), collect_audits(root)
    if not rows and not audits:
        raise FileNotFoundError(f"No summary.json under {root} (nor an audit.json): is it a "
                                "dpjax-train or dpjax-audit output dir?")
    write_csv(rows + audits, root / "results.csv")
    (root / "results.md").write_text(markdown_table(rows) + audit_table(audits))
    plot(rows, root / "privacy_utility.png")
    if audits:
        plot_audits(audits, root / AUDIT_PLOT)
    return rows + audits


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
