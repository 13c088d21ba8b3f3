"""The step audit on every mechanism path: consistent, sharp, and it flags broken variants.

Each path runs the real step code of ``experiment=digits_quick`` (a small MLP) in
seeded mode, R = 3,000 releases per world (the benchmark and the CLI use 20,000).
Consistent: the lower bound is at most the claim. Sharp: the bound at sigma exceeds
the claim the same mechanism would make at 1.15 sigma, so a noise 15% too small
would be caught (asserted for the Gaussian paths; the distributed-DP paths' claim is an
RDP bound, loose enough that sharpness is only reported). Broken variants (the noise
divided by 4, each party's discrete noise divided by 4, or clipping that does not clip,
all by monkeypatching the library) must be flagged: lower bound > claim.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import dpjax.cli  # noqa: F401  (registers the schema)
from dpjax import noise, rdp
from dpjax.assembly import assemble_parts
from dpjax.audit.gdp import gdp_epsilon
from dpjax.audit.step import run_step_audit

ROOT = Path(__file__).resolve().parents[2]
TRIALS = 3000
BASE = ["experiment=digits_quick", "dp.randomness=seeded", "model.options.hidden=[16]"]
PATHS = {  # name: (overrides, chunks, broken variant)
    "vmap": ([], 1, "noise"),
    "fast": (["perf.clipping=fast"], 1, "clip"),
    "fast_lean": (["perf.clipping=fast_lean"], 1, "clip"),  # two passes, two programs
    "per_layer": (["dp.per_layer_clipping=true"], 1, "noise"),
    "microbatch": (["perf.microbatch_size=8"], 1, "clip"),
    "multi_chunk": ([], 2, "noise"),
    "secagg": (["dp.aggregation=secagg", "dp.num_parties=4", "dp.secagg_mode=simulation"], 1,
               "clip"),
    "fixed_size": (["dp.sampling=fixed_size"], 1, "noise"),
    # distributed DP: 4 parties each add Skellam / discrete Gaussian noise in Z_2^16 (the
    # alias-table samplers at this scale); the claim is the accountant's RDP bound
    "skellam": (["dp.aggregation=secagg", "dp.num_parties=4", "dp.secagg_mode=simulation",
                 "dp.noise=skellam", "dp.secagg_bits=16"], 1, "party_noise"),
    "ddgauss": (["dp.aggregation=secagg", "dp.num_parties=4", "dp.secagg_mode=simulation",
                 "dp.noise=ddgauss", "dp.secagg_bits=16"], 1, "party_noise"),
}


def _cfg(overrides):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return OmegaConf.to_object(compose("config", overrides=[*BASE, *overrides]))


def _audit(overrides, chunks, seed=0, with_mechanism=False):
    cfg = _cfg(overrides)
    parts = assemble_parts(cfg)
    result = run_step_audit(cfg, parts, trials=TRIALS, seed=seed, canary="input", delta=1e-5,
                            confidence=0.95, chunks=chunks)
    return (result, parts.mechanism) if with_mechanism else result


def _claim_at_more_noise(result, mechanism):
    """The claim at 1.15x the noise, recomputed here: GDP, or the discrete accountant's
    one-step RDP epsilon with each party's noise standard deviation times 1.15."""
    if not mechanism.distributed:
        return gdp_epsilon(result.mu_claimed / 1.15, result.delta)
    p = mechanism.clipped.aggregation.params
    skellam = p.skellam_mu is not None
    party = p.party_noise_variance * 1.15**2 if skellam else p.ddg_sigma * 1.15
    return rdp.epsilon(party, result.delta, 1.0, 1, noise=str(p.noise),
                       num_parties=p.min_honest_survivors, l1_sensitivity=p.l1_sensitivity,
                       l2_sensitivity=p.l2_sensitivity, dim=p.padded_dim)


def assert_consistent_and_sharp(result, mechanism=None):
    claim_at_more_noise = (gdp_epsilon(result.mu_claimed / 1.15, result.delta)
                           if mechanism is None else _claim_at_more_noise(result, mechanism))
    assert result.consistent and result.epsilon_lower_bound <= result.epsilon_claimed, result
    assert result.epsilon_claimed_at_1_15_noise == pytest.approx(claim_at_more_noise, rel=1e-12)
    assert result.sharp == (result.epsilon_lower_bound > claim_at_more_noise)
    if mechanism is not None and mechanism.distributed:
        # The claim is an RDP bound: at sigma 1 its value at 1.15x the noise (4.030) is only
        # 4.7% below the exact epsilon of these releases (4.221, GDP at the rounding-inflated
        # noise), so at R = 3,000 the audit is sharp on 6 of 20 seeds (Skellam, 2026-11-30);
        # sharpness is reported, not asserted (docs/audit.md).
        return
    assert result.epsilon_lower_bound > claim_at_more_noise, (result, claim_at_more_noise)
    assert result.sharp


@pytest.mark.parametrize("name", list(PATHS))
def test_the_step_audit_is_consistent_sharp_and_flags_a_broken_variant(name, break_mechanism):
    overrides, chunks, broken = PATHS[name]
    result, mechanism = _audit(overrides, chunks, with_mechanism=True)
    assert_consistent_and_sharp(result, mechanism)
    if name == "fixed_size":
        assert result.relation == "replace_one" and result.canary["kind"] == "dirac"
    break_mechanism(broken)
    flagged = _audit(overrides, chunks)
    print(f"{name}: claim {flagged.epsilon_claimed:.3f}, broken ({broken}) lower bound "
          f"{flagged.epsilon_lower_bound:.3f}")
    assert not flagged.consistent
    assert flagged.epsilon_lower_bound > flagged.epsilon_claimed


def test_the_audit_secret_is_an_argument_of_the_compiled_scorer_not_a_constant():
    """The releases' noise secret must not be baked into the compiled program (which the
    persistent compilation cache writes to disk): the scorer lowered for two secrets is the
    same program, and every seed reuses the one compilation."""
    import jax
    import jax.numpy as jnp
    import optax

    from dpjax import randomness
    from dpjax.audit.step import StepAuditor, make_worlds, world_partial
    from dpjax.train import init_state

    cfg = _cfg([])
    auditor = StepAuditor(cfg, assemble_parts(cfg), canary="input")
    worlds = make_worlds(auditor.parts, "input", 0)
    step, block = auditor._step(worlds.loss_fn)
    texts = []
    for seed in (0, 1):
        state = init_state(auditor.parts.task.params, optax.sgd(1.0),
                           secret=randomness.run_secret("seeded", seed),
                           privatizer=auditor.mechanism.privatizer())
        partial = world_partial(step, auditor.parts, state.params, worlds.batch_in,
                                worlds.mask_in, 1)
        direction = worlds.direction
        texts.append(block.lower(state, partial, step.prepare(state.step), direction * 0,
                                 direction, jnp.arange(4, dtype=jnp.int32)).as_text())
        assert int(state.key.words[0]) != 0
    assert texts[0] == texts[1]
    first, second = auditor.scores(0, 8), auditor.scores(1, 8)
    assert not jax.numpy.array_equal(first.in_scores, second.in_scores)
    assert block._cache_size() == 1


def test_the_step_audit_on_two_devices(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True,
                          timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["num_devices"] == 2
    assert out["consistent"] and out["lower"] > gdp_epsilon(out["mu"] / 1.15, 1e-5), out
    assert not out["broken_consistent"] and out["broken_lower"] > out["claim"], out


if __name__ == "__main__":  # the two-device audit, in its own process
    import jax

    base = ["train.devices=2", "dp.aggregation=secagg", "dp.num_parties=4",
            "dp.secagg_mode=simulation"]
    ok = _audit(base, 1)
    real = noise.privatize
    noise.privatize = lambda s, k, **kw: real(s, k, **{**kw, "noise_multiplier":
                                                       kw["noise_multiplier"] / 4})
    broken = _audit(base, 1)
    print(json.dumps({"num_devices": jax.device_count(), "consistent": ok.consistent,
                      "lower": ok.epsilon_lower_bound, "mu": ok.mu_claimed,
                      "claim": broken.epsilon_claimed, "broken_lower": broken.epsilon_lower_bound,
                      "broken_consistent": broken.consistent}))
