"""The step audit on every mechanism path: R, seconds, the lower bound, the claim, and the
bound of the 0.87-sigma variant (the noise 13% too small, i.e. sigma / 1.15).

The bounds are at confidence 0.95 (``epsilon_lower_bound``'s default) and 0.999 (what
``dpjax-audit audit=step`` decides with), from the same releases; "caught" uses 0.999.

Each path audits one step of ``experiment=digits_quick`` (the MLP of the experiment) in
seeded mode; the variant monkeypatches the privatizer's noise multiplier. A sharp audit
puts the variant's bound above the claim.

    python scripts/bench_audit.py [--trials 20000] [--paths vmap fast ...]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
from pathlib import Path

import jax
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import dpjax.cli  # noqa: F401  (registers the schema)
from dpjax import noise
from dpjax.assembly import assemble_parts
from dpjax.audit.step import StepAuditor

ROOT = Path(__file__).resolve().parent.parent
PATHS = {
    "vmap": ([], 1),
    "fast": (["perf.clipping=fast"], 1),
    "per_layer": (["dp.per_layer_clipping=true"], 1),
    "microbatch": (["perf.microbatch_size=8"], 1),
    "multi_chunk": ([], 2),
    "secagg": (["dp.aggregation=secagg", "dp.num_parties=4", "dp.secagg_mode=simulation"], 1),
    "fixed_size": (["dp.sampling=fixed_size"], 1),
}
CONFIDENCES = (0.95, 0.999)  # the statistics' default, and the step audit's (configs/audit)


def auditor(overrides, chunks):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("config", overrides=[
            "experiment=digits_quick", "dp.randomness=seeded", *overrides]))
    return StepAuditor(cfg, assemble_parts(cfg), canary="input", chunks=chunks), cfg.dp.delta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20_000)
    parser.add_argument("--paths", nargs="+", default=list(PATHS))
    args = parser.parse_args()
    print(f"# bench_audit: {datetime.date.today()}, {platform.processor() or platform.machine()}, "
          f"{jax.device_count()}x {jax.devices()[0].device_kind}, jax {jax.__version__}, "
          f"experiment=digits_quick, delta 1e-5, audit seed 0; bounds at confidence "
          f"{' and '.join(map(str, CONFIDENCES))} from the same releases")
    print("| path | R | seconds | claim | lower bound (0.95) | lower bound (0.999) "
          "| bound at 0.87 sigma (0.999) | caught |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    real = noise.privatize
    for name in args.paths:
        overrides, chunks = PATHS[name]
        start = time.perf_counter()
        audit_, delta = auditor(overrides, chunks)
        scored = audit_.scores(0, args.trials)
        seconds = time.perf_counter() - start
        ok = [audit_.judge(scored, delta=delta, confidence=c) for c in CONFIDENCES]
        noise.privatize = lambda s, k, **kw: real(
            s, k, **{**kw, "noise_multiplier": kw["noise_multiplier"] / 1.15})
        try:
            weak_, _ = auditor(overrides, chunks)
            low = weak_.judge(weak_.scores(0, args.trials), delta=delta,
                              confidence=CONFIDENCES[-1])
        finally:
            noise.privatize = real
        print(f"| {name} | {args.trials} | {seconds:.1f} | {ok[0].epsilon_claimed:.3f} "
              f"| {ok[0].epsilon_lower_bound:.3f} | {ok[1].epsilon_lower_bound:.3f} "
              f"| {low.epsilon_lower_bound:.3f} "
              f"| {'yes' if low.epsilon_lower_bound > low.epsilon_claimed else 'no'} |")


if __name__ == "__main__":
    main()
