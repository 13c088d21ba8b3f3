"""The step audit on every mechanism path: R, seconds, the lower bound, the claim, and the
bound of the 0.87-sigma variant (the noise 13% too small, i.e. sigma / 1.15).

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
from dpjax.audit.step import run_step_audit

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


def audit(overrides, chunks, trials):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("config", overrides=[
            "experiment=digits_quick", "dp.randomness=seeded", *overrides]))
    return run_step_audit(cfg, assemble_parts(cfg), trials=trials, seed=0, canary="input",
                          delta=cfg.dp.delta, confidence=0.95, chunks=chunks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20_000)
    parser.add_argument("--paths", nargs="+", default=list(PATHS))
    args = parser.parse_args()
    print(f"# bench_audit: {datetime.date.today()}, {platform.processor() or platform.machine()}, "
          f"{jax.device_count()}x {jax.devices()[0].device_kind}, jax {jax.__version__}, "
          f"experiment=digits_quick, delta 1e-5")
    print("| path | R | seconds | claim | lower bound | bound at 0.87 sigma | caught |")
    print("|---|---:|---:|---:|---:|---:|---|")
    real = noise.privatize
    for name in args.paths:
        overrides, chunks = PATHS[name]
        start = time.perf_counter()
        ok = audit(overrides, chunks, args.trials)
        seconds = time.perf_counter() - start
        noise.privatize = lambda s, k, **kw: real(
            s, k, **{**kw, "noise_multiplier": kw["noise_multiplier"] / 1.15})
        try:
            low = audit(overrides, chunks, args.trials)
        finally:
            noise.privatize = real
        print(f"| {name} | {args.trials} | {seconds:.1f} | {ok.epsilon_claimed:.3f} "
              f"| {ok.epsilon_lower_bound:.3f} | {low.epsilon_lower_bound:.3f} "
              f"| {'yes' if low.epsilon_lower_bound > low.epsilon_claimed else 'no'} |")


if __name__ == "__main__":
    main()
