"""Sharpness and speed of the audit statistics (dpjax.audit.epsilon_lower_bound).

Releases of a Gaussian mechanism with noise multiplier sigma: "in" ~ N(1 / sigma, 1),
"out" ~ N(0, 1), R per world, delta = 1e-5, confidence 0.95. Prints markdown tables:
the mean bound (min-max over seeds) of each method / selection against the true
epsilon and against the epsilon a claim of noise 1.15 sigma would give; the bounds
across R; and the median wall time of one call. ``--quick`` prints the same tables
at tiny sizes (a smoke run; its numbers mean nothing).

    python scripts/audit_sharpness.py [--seeds 50] [--releases 20000] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time

import numpy as np
import scipy

from dpjax import audit

DELTA = 1e-5
VARIANTS = [
    ("gdp", "holdout"),
    ("gdp", "bonferroni"),
    ("clopper_pearson", "holdout"),
    ("clopper_pearson", "bonferroni"),
]
RELEASES_ACROSS = (200, 1000, 5000, 20_000)
CANARIES = (10_000, 100_000)


def releases(sigma: float, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(1 / sigma, 1, n), rng.normal(0, 1, n)


def bounds(sigma: float, n: int, seeds: int) -> dict[tuple[str, str], np.ndarray]:
    out = {v: [] for v in VARIANTS}
    for seed in range(seeds):
        in_s, out_s = releases(sigma, n, seed)
        for method, selection in VARIANTS:
            out[(method, selection)].append(
                audit.epsilon_lower_bound(
                    in_s, out_s, delta=DELTA, method=method, selection=selection, seed=seed
                )
            )
    return {k: np.array(v) for k, v in out.items()}


def median_ms(call, repeats: int = 7) -> float:
    call()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=50)
    parser.add_argument("--releases", type=int, default=20_000)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    args = parser.parse_args()
    across, canaries, repeats = RELEASES_ACROSS, CANARIES, 7
    if args.quick:
        args.seeds, args.releases = 2, 200
        across, canaries, repeats = RELEASES_ACROSS[:2], (1000,), 1
    print(
        f"# audit_sharpness: {datetime.date.today()}, {platform.machine()}, "
        f"numpy {np.__version__}, scipy {scipy.__version__}, delta {DELTA}, confidence 0.95"
    )

    print(f"\n## R = {args.releases:,} releases per world, {args.seeds} seeds\n")
    print(
        "| sigma | true eps | claim at 1.15 sigma | method | selection | bound: mean (min-max) "
        "| seeds above the claim |"
    )
    print("|---:|---:|---:|---|---|---|---:|")
    for sigma in (0.5, 1.0, 2.0):
        true = audit.gdp_epsilon(1 / sigma, DELTA)
        claim = audit.gdp_epsilon(1 / (1.15 * sigma), DELTA)
        for (method, selection), b in bounds(sigma, args.releases, args.seeds).items():
            print(
                f"| {sigma} | {true:.3f} | {claim:.3f} | {method} | {selection} | "
                f"{b.mean():.3f} ({b.min():.3f}-{b.max():.3f}) | "
                f"{np.mean(b > claim):.0%} |"
            )

    print(f"\n## Mean bound across R (sigma = 1, true eps 4.377), {args.seeds} seeds\n")
    print("| R per world | " + " | ".join(f"{m} {s}" for m, s in VARIANTS) + " |")
    print("|---:|" + "---:|" * len(VARIANTS))
    for n in across:
        b = bounds(1.0, n, args.seeds)
        print(f"| {n:,} | " + " | ".join(f"{b[v].mean():.3f}" for v in VARIANTS) + " |")

    print("\n## Median time of one call\n")
    print("| input | call | ms |")
    print("|---|---|---:|")
    n = across[-1]
    in_s, out_s = releases(1.0, n, 0)
    for method, selection in VARIANTS:
        ms = median_ms(
            lambda m=method, s=selection: audit.epsilon_lower_bound(
                in_s, out_s, delta=DELTA, method=m, selection=s
            ),
            repeats,
        )
        print(f"| {n:,} + {n:,} scores | {method}, {selection} | {ms:.1f} |")
    for m in canaries:
        rng = np.random.default_rng(0)
        inc = rng.random(m) < 0.5
        scores = inc + rng.normal(size=m)
        for delta in (0.0, DELTA):
            ms = median_ms(
                lambda s=scores, i=inc, d=delta: audit.one_run_epsilon_lower_bound(s, i, delta=d),
                repeats,
            )
            print(f"| {m:,} canaries (mu = 1) | one_run, delta = {delta} | {ms:.1f} |")


if __name__ == "__main__":
    main()
