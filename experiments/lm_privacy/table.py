"""The table and plot of the language-model privacy study (experiments/lm_privacy/run.sh).

    python experiments/lm_privacy/table.py OUT

Reads ``OUT/no_finetune.json`` and every ``audit.json`` under ``OUT`` (with its run's
``summary.json``), and writes ``OUT/results.md`` (one row per condition: bits per byte
and exposure per repetition count, mean and standard deviation over the audits) and
``OUT/lm_privacy.png``; prints the table and the issue's three targets, checked.
"""

from __future__ import annotations

import collections
import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np


def condition(summary: dict) -> tuple[str, float]:
    """``(name, target epsilon)`` of a fine-tune run; inf without DP."""
    if not summary.get("dp_enabled"):
        return f"non-private {summary['trainable']}", math.inf
    return f"DP {summary['trainable']}", float(summary["target_epsilon"])


def collect(root: Path) -> dict[tuple[str, float], list[dict]]:
    cells = collections.defaultdict(list)
    for path in sorted(root.rglob("audit.json")):
        audit = json.loads(path.read_text())
        if audit.get("status") != "completed" or audit.get("kind") != "exposure":
            continue
        summary = json.loads((Path(audit["run_dir"]) / "summary.json").read_text())
        cells[condition(summary)].append({"audit": audit, "summary": summary})
    return cells


def mean_sd(values: list[float]) -> str:
    if not values:
        return ""
    sd = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.3f}{sd}"


def exposures(runs: list[dict], repetition: str) -> list[float]:
    return [e for r in runs for e in r["audit"]["exposure"].get(repetition, [])]


def null_range(runs: list[dict]) -> tuple[float, float, float]:
    """Mean and central 95% range of the fresh canaries' exposures, pooled over runs."""
    fresh = np.asarray([e for r in runs for e in r["audit"]["null"]["exposures"]])
    return float(fresh.mean()), *np.quantile(fresh, [0.025, 0.975]).tolist()


def main(root: str) -> None:
    out = Path(root)
    cells = collect(out)
    base = json.loads((out / "no_finetune.json").read_text())
    reps = sorted({k for runs in cells.values() for r in runs for k in r["audit"]["exposure"]},
                  key=int)
    space = {r["audit"]["secret_space"] for runs in cells.values() for r in runs}
    lines = [f"Candidate space |R| = {', '.join(f'{s:,}' for s in sorted(space))} "
             f"(maximum exposure {', '.join(f'{math.log2(s):.2f}' for s in sorted(space))} "
             "bits); mean ± sd over audits (n).", "",
             "| condition | target eps | eps (run) | n | test bits/byte | "
             + " | ".join(f"exposure {r}x" for r in reps)
             + " | null mean [95% range] | eps lower bound |",
             "|---|---:|---:|---:|---:|" + "---:|" * len(reps) + "---|---:|",
             f"| no fine-tuning | | | 1 | {base['test_bits_per_byte']:.3f} |"
             + " |" * len(reps) + " | |"]
    order = sorted(cells, key=lambda k: (k[0].startswith("DP"), k[0], k[1]))
    for key in order:
        runs = cells[key]
        name, target = key
        eps = [r["summary"]["epsilon"] for r in runs if r["summary"].get("epsilon") is not None]
        null_mean, low, high = null_range(runs)
        lines.append(
            f"| {name} | {'' if math.isinf(target) else f'{target:g}'} | {mean_sd(eps)} | "
            f"{len(runs)} | {mean_sd([r['summary']['test_bits_per_byte'] for r in runs])} | "
            + " | ".join(mean_sd(exposures(runs, rep)) for rep in reps)
            + f" | {null_mean:.2f} [{low:.2f}, {high:.2f}] | "
            f"{max(r['audit']['epsilon_lower_bound'] for r in runs):.3g} |")
    at_start = []
    for key in order:
        runs = [r for r in cells[key] if "exposure_at_start" in r["audit"]]
        if runs:
            at_start.append(f"| {key[0]} | {'' if math.isinf(key[1]) else f'{key[1]:g}'} | "
                         + " | ".join(mean_sd([e for r in runs for e in
                                               r["audit"]["exposure_at_start"].get(rep, [])])
                                      for rep in reps) + " |")
    if at_start:
        lines += ["", "Exposure of the same inserted canaries under each run's starting "
                  "parameters (before fine-tuning; mean over the audits that report it):", "",
                  "| condition | target eps | " + " | ".join(f"{r}x at start" for r in reps)
                  + " |", "|---|---:|" + "---:|" * len(reps), *at_start]
    lines += ["", "Targets of the issue:"] + targets(cells, base)
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    print(text)
    plot(cells, base, reps, out / "lm_privacy.png")


def targets(cells, base) -> list[str]:
    found = []
    nonprivate = next((runs for (n, _), runs in cells.items() if n.startswith("non-private")),
                      None)
    lora8 = cells.get(("DP lora", 8.0))
    if nonprivate and lora8:
        b0 = base["test_bits_per_byte"]
        bn = statistics.mean(r["summary"]["test_bits_per_byte"] for r in nonprivate)
        bd = statistics.mean(r["summary"]["test_bits_per_byte"] for r in lora8)
        gain = (b0 - bd) / (b0 - bn) if b0 != bn else float("nan")
        found.append(f"- DP LoRA at epsilon 8 recovers {gain:.0%} of the non-private gain "
                     f"({b0:.3f} -> {bd:.3f} vs {bn:.3f} bits/byte; target >= 50%): "
                     f"{'met' if gain >= 0.5 else 'NOT met'}")
    if nonprivate:
        e16 = exposures(nonprivate, "16")
        top = nonprivate[0]["audit"]["max_exposure"]
        if e16:
            found.append(f"- non-private 16x canary exposure {statistics.mean(e16):.2f} of "
                         f"{top:.2f} bits (the issue's target: >= 15 of ~20 with |R| = 10^6, "
                         f"i.e. {15 / 20 * top:.2f} here at the same fraction)")
    for (name, target), runs in sorted(cells.items()):
        if not name.startswith("DP") or target > 8:
            continue
        _, low, high = null_range(runs)
        for rep in ("1", "4"):
            values = exposures(runs, rep)
            if values:
                m = statistics.mean(values)
                found.append(f"- {name} eps {target:g}: mean exposure of the {rep}x canaries "
                             f"{m:.2f}, null 95% range [{low:.2f}, {high:.2f}]: "
                             f"{'within' if low <= m <= high else 'OUTSIDE'}")
        e16 = exposures(runs, "16")
        if e16:
            found.append(f"- {name} eps {target:g}: 16x canaries {statistics.mean(e16):.2f} "
                         "(a group of 16 records: reported, not covered by the per-record "
                         "guarantee)")
    return found


def plot(cells, base, reps, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.axhline(base["test_bits_per_byte"], color="gray", ls=":", label="no fine-tuning")
    for (name, target), runs in sorted(cells.items()):
        bpb = [r["summary"]["test_bits_per_byte"] for r in runs]
        if math.isinf(target):
            left.axhline(statistics.mean(bpb), color="black", ls="--", label=name)
    for name in sorted({n for n, t in cells if not math.isinf(t)}):
        keys = sorted(k for k in cells if k[0] == name)
        xs = [k[1] for k in keys]
        ys = [statistics.mean(r["summary"]["test_bits_per_byte"] for r in cells[k])
              for k in keys]
        left.plot(xs, ys, "o-", label=name)
    left.set_xlabel("target epsilon")
    left.set_ylabel("test bits per byte (private corpus)")
    left.legend()
    width = 0.8 / max(1, len(cells))
    for i, key in enumerate(sorted(cells)):
        means = [statistics.mean(exposures(cells[key], r) or [float("nan")]) for r in reps]
        label = key[0] if math.isinf(key[1]) else f"{key[0]} eps {key[1]:g}"
        right.bar(np.arange(len(reps)) + i * width, means, width, label=label)
    right.set_xticks(np.arange(len(reps)) + 0.4 - width / 2, [f"{r}x" for r in reps])
    right.set_ylabel("mean exposure (bits)")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main(sys.argv[1])
