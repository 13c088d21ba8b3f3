"""Is the step audit valid on the real mechanism? The same audit over many seeds.

The step audit's bound holds with probability >= confidence (0.95) when the releases
are what the claim says (Gaussian, mu = 1 / sigma): on a correct mechanism it may
exceed the claim on about 5% of seeds, never systematically more. This script runs the
real step (``experiment=digits_quick``, vmap path, seeded, input canary) on audit seeds
``0 .. N-1`` at each sigma, with R releases per world, and prints per sigma:

- how many seeds' gdp bound exceeded the claim, next to the rate the same statistic
  has on simulated Gaussian scores with the true mu (``--sim`` seeds);
- the releases themselves: per seed ``mu_hat = (mean_in - mean_out) / s`` (s the pooled
  standard deviation) standardized by its standard error ``sqrt((2 + mu^2 / 4) / R)``;
  on a correct mechanism these z are N(0, 1) across seeds (mean within ~3 / sqrt(N)),
  a far sharper test of the noise and the clipping than counting exceedances: a mean z
  of 0.5 would be a noise scale off by about ``0.5 * se / mu``;
- the canary's signal (mean_in - mean_out) over its clipped norm and the noise std over
  ``sigma * C``, both 1 on a correct mechanism.

    python scripts/step_audit_seeds.py [--sigmas 1 4] [--seeds 200] [--trials 20000]
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
from scipy import stats as sps

import dpjax.cli  # noqa: F401  (registers the schema)
from dpjax import audit
from dpjax.assembly import assemble_parts
from dpjax.audit.gdp import gdp_epsilon
from dpjax.audit.step import StepAuditor

ROOT = Path(__file__).resolve().parent.parent
DELTA = 1e-5


def _auditor(sigma: float, overrides: list[str]) -> StepAuditor:
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("config", overrides=[
            "experiment=digits_quick", "dp.randomness=seeded", f"dp.noise_multiplier={sigma}",
            *overrides]))
    return StepAuditor(cfg, assemble_parts(cfg), canary="input")


def _gdp(in_s: np.ndarray, out_s: np.ndarray, confidence: float) -> float:
    return audit.epsilon_lower_bound(in_s, out_s, delta=DELTA, method="gdp",
                                     confidence=confidence)


def simulated_rate(mu: float, trials: int, seeds: int, confidence: float) -> float:
    """The fraction of seeds on which the gdp bound of exact Gaussian scores exceeds the claim."""
    claim = gdp_epsilon(mu, DELTA)
    rng = np.random.default_rng(20261130)
    hits = sum(_gdp(rng.normal(mu, 1, trials), rng.normal(0, 1, trials), confidence) > claim
               for _ in range(seeds))
    return hits / seeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sigmas", type=float, nargs="+", default=[1.0, 4.0])
    parser.add_argument("--seeds", type=int, default=200)
    parser.add_argument("--trials", type=int, default=20_000)
    parser.add_argument("--sim", type=int, default=1000, help="simulated seeds per sigma")
    parser.add_argument("--overrides", nargs="*", default=[])
    parser.add_argument("--per-seed", action="store_true", help="a line per seed as it ends")
    args = parser.parse_args()
    print(f"# step_audit_seeds: {datetime.datetime.now():%Y-%m-%d %H:%M}, "
          f"{platform.machine()} x{jax.device_count()} {jax.devices()[0].platform}, "
          f"jax {jax.__version__}, experiment=digits_quick {' '.join(args.overrides)}, "
          f"R={args.trials}, seeds 0-{args.seeds - 1}, delta {DELTA}")
    print("| sigma | claim | seeds above claim (0.95) | simulated rate | seeds above (0.99) "
          "| simulated rate | mean z (+- 3 se) | sd z | KS p | signal / C | noise sd / sigma C "
          "| seconds/seed |")
    print("|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    for sigma in args.sigmas:
        auditor = _auditor(sigma, args.overrides)
        mu = auditor.mechanism.sensitivity() / auditor.mechanism.noise_std
        claim = gdp_epsilon(mu, DELTA)
        c = auditor.mechanism.sensitivity()
        auditor.scores(0, 250)  # compiles
        start = time.perf_counter()
        above95, above99, z, signal, spread = [], [], [], [], []
        for seed in range(args.seeds):
            scored = auditor.scores(seed, args.trials)
            in_s, out_s = scored.in_scores, scored.out_scores
            above95.append(_gdp(in_s, out_s, 0.95) > claim)
            above99.append(_gdp(in_s, out_s, 0.99) > claim)
            pooled = np.sqrt((in_s.var(ddof=1) + out_s.var(ddof=1)) / 2)
            gap = in_s.mean() - out_s.mean()
            se = np.sqrt((2 + mu**2 / 4) / args.trials)
            z.append((gap / pooled - mu) / se)
            signal.append(gap / scored.canary.get("clipped_norm", c))
            spread.append(pooled / (sigma * c))
            if args.per_seed:
                print(f"  sigma {sigma:g} seed {seed}: z {z[-1]:+.3f}, above {above95[-1]}, "
                      f"{above99[-1]}", flush=True)
        seconds = (time.perf_counter() - start) / args.seeds
        z = np.asarray(z)
        sim95 = simulated_rate(mu, args.trials, args.sim, 0.95)
        sim99 = simulated_rate(mu, args.trials, args.sim, 0.99)
        print(f"| {sigma:g} | {claim:.4f} | {sum(above95)} / {args.seeds} | {sim95:.3f} "
              f"| {sum(above99)} / {args.seeds} | {sim99:.3f} "
              f"| {z.mean():+.3f} +- {3 * z.std(ddof=1) / np.sqrt(z.size):.3f} "
              f"| {z.std(ddof=1):.3f} | {sps.kstest(z, 'norm').pvalue:.3f} "
              f"| {np.mean(signal):.5f} | {np.mean(spread):.5f} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
