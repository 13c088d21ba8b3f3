"""Epsilon of DP-SGD with distributed discrete noise (Skellam, DDG) next to the Gaussian's.

Every row has the same noise as the Gaussian mechanism with noise multiplier z
(per-coordinate std z * scale * C in integer units, C = 1), shared by n parties,
and the add/remove sensitivity of one clipped row after scaling and stochastic
rounding: L2 = scale * C + sqrt(d), L1 = min(sqrt(d) L2, L2^2). Columns:

- gauss: dp-accounting's tight Poisson-subsampled Gaussian (RdpAccountant);
- gauss@L2: the same at the rounding-inflated sensitivity (z * scale / L2);
- gauss-general: the Gaussian RDP curve through dpjax.rdp.subsampled_rdp (Zhu &
  Wang's general bound: what the discrete mechanisms would get without the
  symmetric-loss lemma, for comparison);
- skellam, ddg: dpjax.rdp.epsilon (symmetric-loss subsampling);
- ratios to gauss (the issue's target: <= 1.10 at 16-bit-style scales) and, for
  Skellam, to gauss@L2 (the mechanism's own terms and integer-only orders).

``--quick`` prints the first and the last row only (a smoke run).

    python scripts/rdp_compare.py [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import math

import numpy as np

from dpjax import accounting, rdp

SETTINGS = [  # z, q, steps, d, scale, parties
    (1.0, 0.01, 1000, 2**16, 2**12, 10),
    (1.0, 0.01, 1000, 2**16, 2**14, 10),
    (1.0, 0.01, 1000, 2**16, 2**16, 10),
    (1.0, 0.01, 1000, 2**20, 2**12, 10),
    (1.0, 0.01, 1000, 2**20, 2**16, 10),
    (1.1, 0.004, 10000, 2**16, 2**14, 10),
    (2.0, 0.001, 100000, 2**16, 2**14, 10),
    (0.8, 0.02, 2000, 2**16, 2**14, 10),
    (5.0, 0.01, 1000, 2**16, 2**14, 10),
    (1.0, 0.01, 1000, 2**10, 2**5, 2000),
]
DELTA = 1e-5


def row(z, q, steps, dim, scale, parties):
    l2 = scale + math.sqrt(dim)
    l1 = min(math.sqrt(dim) * l2, l2**2)
    std = z * scale
    common = dict(num_parties=parties, l1_sensitivity=l1, l2_sensitivity=l2, dim=dim)
    orders = np.array(rdp.DEFAULT_ORDERS)
    general = rdp.subsampled_rdp(orders, lambda a: a / (2 * z**2), q)
    return {
        "gauss": accounting.epsilon(z, q, steps, DELTA),
        "gauss@L2": accounting.epsilon(std / l2, q, steps, DELTA),
        "gauss-general": rdp.rdp_to_epsilon(orders, steps * general, DELTA),
        "skellam": rdp.epsilon(std**2 / parties, DELTA, q, steps, noise="skellam", **common),
        "ddg": rdp.epsilon(std / math.sqrt(parties), DELTA, q, steps, noise="ddgauss", **common),
        "tau": rdp.ddgauss_tau(std / math.sqrt(parties), parties),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two rows (a smoke run)")
    args = parser.parse_args()
    versions = ", ".join(
        f"{p} {importlib.metadata.version(p)}" for p in ("dp-accounting", "numpy", "scipy")
    )
    print(f"# rdp_compare: {datetime.date.today()}, delta {DELTA}, {versions}")
    print("| z | q | T | d | scale | n | gauss | gauss@L2 | gauss-general | skellam | ddg "
          "| DDG tau | skellam / gauss | ddg / gauss | skellam / gauss@L2 |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for z, q, steps, dim, scale, parties in [SETTINGS[0], SETTINGS[-1]] if args.quick else SETTINGS:
        r = row(z, q, steps, dim, scale, parties)
        print(f"| {z} | {q} | {steps} | 2^{int(math.log2(dim))} | 2^{int(math.log2(scale))} "
              f"| {parties} | {r['gauss']:.4f} | {r['gauss@L2']:.4f} | {r['gauss-general']:.4f} "
              f"| {r['skellam']:.4f} | {r['ddg']:.4f} | {r['tau']:.2g} "
              f"| {r['skellam'] / r['gauss']:.3f} | {r['ddg'] / r['gauss']:.3f} "
              f"| {r['skellam'] / r['gauss@L2']:.3f} |")


if __name__ == "__main__":
    main()
