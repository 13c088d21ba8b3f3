"""``dpjax-audit audit=exposure``: canaries through a real run, exposure, the null, the bound."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from dpjax.audit.exposure_audit import epsilon_lower_bound, uniform_rank_range

ROOT = Path(__file__).resolve().parents[2]
# A 2-layer, width-32 model that memorizes within 150 non-private Adam steps of 32 rows
# (96 bank messages + 16 canary copies, context 48; tests/audit/test_exposure.py trains
# a similar model by hand). The canary ranked first of 10^3 with audit.seed 3 and 5.
MEMORIZING = ["audit=exposure", "dp=none", "dp.randomness=seeded", "dataset=private_text",
              "model=transformer", "dataset.options.num_records=120",
              "dataset.options.kind=bank", "dataset.options.context_length=48",
              "model.options.num_layers=2", "model.options.width=32",
              "model.options.num_heads=4", "model.options.mlp_ratio=2",
              "optimizer=adam", "optimizer.learning_rate=0.004", "train.steps=150",
              "train.batch_size=32", "train.eval_every=150", "train.log_every=75",
              "train.eval_batch_size=64", "audit.seed=3", "audit.repetitions=[16]",
              "audit.secret_length=3", "audit.num_fresh=200"]


def compose(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    import dpjax.audit.cli  # noqa: F401  (registers the schemas)
    import dpjax.cli  # noqa: F401

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return OmegaConf.to_object(hydra_compose("audit_config", overrides=overrides))


def uniform_exposures(space: int) -> np.ndarray:
    """The exposure of every rank 1..|R|: a uniformly random rank's distribution."""
    return math.log2(space) - np.log2(np.arange(1, space + 1, dtype=np.float64))


@pytest.mark.slow
def test_a_nonprivate_model_exposes_a_16_times_repeated_canary(tmp_path):
    """Rank at most 2 of 10^3 (exposure >= log2(1000) - 1) and above the null's 95% range.

    The 200 fresh canaries' secrets are independent of the model, so their ranks are
    uniform: their mean exposure is within 4 standard errors (sd / sqrt(200), sd of the
    uniform-rank exposure summed directly) of the uniform-rank mean (1.436 bits).
    """
    from dpjax.audit.run import AUDIT_FILE, run_audit, verdict

    result = run_audit(compose(MEMORIZING), tmp_path)
    written = json.loads((tmp_path / AUDIT_FILE).read_text())
    assert written["exposure"] == result["exposure"]
    assert result["method"] == "exposure" and result["secret_space"] == 1000
    assert result["epsilon_claimed"] == math.inf and result["consistent"]
    assert result["epsilon_lower_bound"] == 0.0  # no canary inserted once: nothing claimed
    assert "memorization" in result["note"]
    [exposure] = result["exposure"]["16"]
    assert exposure >= math.log2(1000) - 1
    [at_start] = result["exposure_at_start"]["16"]  # the same canary before training
    assert at_start < exposure
    null = result["null"]
    assert len(null["exposures"]) == 200
    assert exposure > null["range_95"][1]
    reference = uniform_exposures(1000)
    assert abs(null["mean"] - reference.mean()) < 4 * reference.std() / math.sqrt(200)
    assert "consistent" in verdict(result)
    assert (tmp_path / "run" / "summary.json").exists()


def test_the_bound_is_the_epsilon_where_the_tail_bound_meets_beta():
    space, n, delta, confidence = 10**4, 19, 1e-5, 0.95
    exposures = [3.0, 12.5, 7.0]
    lower = epsilon_lower_bound(exposures, space_size=space, num_canaries=n, delta=delta,
                                confidence=confidence)
    beta = (1 - confidence) / 3
    c = space / (space - n + 1)
    # at the bound, the DP tail bound of the largest exposure equals the test level beta
    assert math.exp(lower) * c * 2.0 ** -12.5 + delta == pytest.approx(beta, rel=1e-12)
    assert 0 < lower < 12.5 * math.log(2)
    assert epsilon_lower_bound([], space_size=space, num_canaries=n, delta=delta,
                               confidence=confidence) == 0.0
    assert epsilon_lower_bound([1.0], space_size=space, num_canaries=n, delta=delta,
                               confidence=confidence) == 0.0  # below any evidence: clamped
    assert epsilon_lower_bound([13.0], space_size=space, num_canaries=n, delta=0.06,
                               confidence=confidence) == 0.0  # beta <= delta: no test


def test_the_bound_exceeds_zero_for_a_model_that_ignores_the_secret_at_most_beta_often():
    """A model independent of the secrets (0-DP) gives uniform ranks; the bound is then
    positive (a false claim of leakage) in at most 1 - confidence = 5% of 20,000 simulated
    audits of 3 canaries each, within 4 standard errors (sqrt(0.05 * 0.95 / 20,000))."""
    space, trials = 1000, 20_000
    rng = np.random.default_rng(0)
    exposures = uniform_exposures(space)[rng.integers(0, space, (trials, 3))]
    positive = np.mean([epsilon_lower_bound(list(row), space_size=space, num_canaries=3,
                                            delta=1e-5, confidence=0.95) > 0
                        for row in exposures])
    assert positive <= 0.05 + 4 * math.sqrt(0.05 * 0.95 / trials)
    assert positive > 0.02  # and the test is not vacuous


@pytest.mark.parametrize("space", [1000, 10**4])
def test_uniform_rank_range_covers_95_percent_of_ranks(space):
    low, high = uniform_rank_range(space)
    exposures = uniform_exposures(space)
    inside = np.mean((exposures >= low) & (exposures <= high))
    assert 0.95 <= inside <= 0.95 + 2 / space
    assert np.mean(exposures > high) <= 0.025 and np.mean(exposures < low) <= 0.025


@pytest.mark.parametrize(("overrides", "match"), [
    (["dataset=pydoc_text"], "canaries go into a private training split"),
    (["+dataset.options.canaries={seed: 1}"], "audit's own audit"),
    (["dataset.options.context_length=24"], "fit in one context window"),
    (["dp=default", "audit.delta=0.001"], "to be null or dp.delta"),
    (["audit.secret_length=9"], "use 'extrapolate'"),
    (["audit.secret_length=1", "audit.num_fresh=10"], "at most 10 canaries"),
])
def test_the_audit_refuses_what_it_cannot_measure_before_training(overrides, match, tmp_path):
    from dpjax.audit.exposure_audit import run_exposure_audit
    from dpjax.config import ConfigError

    base = MEMORIZING
    if "dataset=pydoc_text" in overrides:  # the private corpus's own options do not apply
        base = [o for o in MEMORIZING if not o.startswith(("dataset.options.num_records",
                                                           "dataset.options.kind"))]
    with pytest.raises(ConfigError, match=match):
        run_exposure_audit(compose([*base, *overrides]), tmp_path)
    assert not (tmp_path / "run").exists()
