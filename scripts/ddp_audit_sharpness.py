"""How often is the step audit of distributed discrete noise sharp, as a function of R?

The distributed-DP paths (``dp.noise=skellam|ddgauss``: 4 parties add their share of the
noise in ``Z_2^16``) claim the accountant's RDP bound. At 1.15x the noise that bound is
only a few percent below the exact epsilon of the releases, so at the tests' R = 3,000
the audit is sharp (lower bound above the claim at 1.15x the noise) on a minority of
seeds (docs/audit.md). This script runs the real step of ``experiment=digits_quick``
(seeded, input canary, the tests' model) on audit seeds ``0 .. N-1`` and prints, per
path and R: the claim, the claim at 1.15x noise, the lower bounds' range, how many seeds
were consistent (bound <= claim) and how many sharp.

    python scripts/ddp_audit_sharpness.py [--paths skellam ddgauss] [--trials 3000 20000]
                                          [--seeds 10]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
from pathlib import Path

import jax
import numpy as np
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import dpjax.cli  # noqa: F401  (registers the schema)
from dpjax.assembly import assemble_parts
from dpjax.audit.step import StepAuditor

ROOT = Path(__file__).resolve().parent.parent
DELTA = 1e-5
CONFIDENCE = 0.95  # the tests' (tests/audit/test_step_audit.py)
DDP = ["dp.aggregation=secagg", "dp.num_parties=4", "dp.secagg_mode=simulation",
       "dp.secagg_bits=16"]
PATHS = {"skellam": [*DDP, "dp.noise=skellam"], "ddgauss": [*DDP, "dp.noise=ddgauss"]}


def _auditor(overrides: list[str]) -> StepAuditor:
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("config", overrides=[
            "experiment=digits_quick", "dp.randomness=seeded", "model.options.hidden=[16]",
            *overrides]))
    return StepAuditor(cfg, assemble_parts(cfg), canary="input")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    parser.add_argument("--trials", type=int, nargs="+", default=[3000, 20_000])
    parser.add_argument("--seeds", type=int, default=10)
    args = parser.parse_args()
    print(f"# ddp_audit_sharpness: {datetime.datetime.now():%Y-%m-%d %H:%M}, "
          f"{platform.machine()} x{jax.device_count()} {jax.devices()[0].platform}, "
          f"jax {jax.__version__}, experiment=digits_quick, 4 parties, 16 bits, sigma 1, "
          f"delta {DELTA}, confidence {CONFIDENCE}, audit seeds 0-{args.seeds - 1}")
    print("| path | R | claim | claim at 1.15x noise | lower bounds (min / median / max) "
          "| consistent | sharp | seconds/seed |")
    print("|---|---:|---:|---:|---|---:|---:|---:|")
    for name in args.paths:
        auditor = _auditor(PATHS[name])
        auditor.scores(0, 250)  # compiles
        for trials in args.trials:
            start = time.perf_counter()
            results = [auditor.audit(seed, trials, delta=DELTA, confidence=CONFIDENCE)
                       for seed in range(args.seeds)]
            seconds = (time.perf_counter() - start) / args.seeds
            bounds = np.array([r.epsilon_lower_bound for r in results])
            first = results[0]
            print(f"| {name} | {trials} | {first.epsilon_claimed:.3f} "
                  f"| {first.epsilon_claimed_at_1_15_noise:.3f} "
                  f"| {bounds.min():.3f} / {np.median(bounds):.3f} / {bounds.max():.3f} "
                  f"| {sum(r.consistent for r in results)} / {args.seeds} "
                  f"| {sum(r.sharp for r in results)} / {args.seeds} | {seconds:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
