"""Mean test accuracy (over seeds) per noise, bits and target epsilon, from a sweep's
summaries: the table of the distributed-DP study (experiments/distributed_dp/run.sh)."""

from __future__ import annotations

import collections
import statistics
import sys
from pathlib import Path

from dpjax.report import collect


def main(root: str) -> None:
    rows = [r for r in collect(Path(root)) if r.get("status") == "completed"]
    cells = collections.defaultdict(list)
    for r in rows:
        kind = r["noise"] if r["noise"] == "gaussian" else f"{r['noise']}-{r['secagg_bits']}"
        cells[(kind, r["target_epsilon"])].append((r["test_accuracy"], r["epsilon"]))
    epsilons = sorted({e for _, e in cells})
    kinds = sorted({k for k, _ in cells}, key=lambda k: (k != "gaussian", k))
    lines = ["| noise | " + " | ".join(f"eps {e:g}" for e in epsilons) + " |",
             "|---|" + "---:|" * len(epsilons)]
    for kind in kinds:
        out = []
        for e in epsilons:
            vals = cells.get((kind, e), [])
            out.append(f"{100 * statistics.mean(a for a, _ in vals):.2f}% (n={len(vals)})"
                       if vals else "")
        lines.append(f"| {kind} | " + " | ".join(out) + " |")
    text = "\n".join(lines) + "\n"
    (Path(root) / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main(sys.argv[1])
