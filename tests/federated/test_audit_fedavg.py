"""A user-level step audit of the DP-FedAvg round (privacy rule 8): consistent, sharp, and it
flags broken variants.

The round's own code computes both worlds' clipped sums: six slots, the last holding a
canary user (features scaled by 100: its local delta is far longer than C) or empty.
The aggregation and the privatizer then run R = 3,000 times per world (fresh noise per
trial, by :func:`dpjax.audit.step.release_scores`); each release is projected, after
subtracting the other users' known sum, on the canary's clipped contribution. The GDP
lower bound must be at most the claim (the Gaussian mechanism with mu = S / std) and
above the claim at 1.15 sigma; with the noise divided by 4, or clipping that does not
clip, it must exceed the claim.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import NUM_FEATURES, data, initial_params, softmax_regression_loss

from dpjax.audit import stats
from dpjax.audit.gdp import gdp_epsilon
from dpjax.audit.step import one_step_claim, release_scores
from dpjax.federated.local import LocalTraining
from dpjax.federated.rounds import make_round_step, user_level_mechanism
from dpjax.randomness import seeded_secret
from dpjax.train import init_state

TRIALS, DELTA = 3000, 1e-5
FLAG_TRIALS = 1000  # a broken variant's bound is 4-5x the claim: fewer releases show it


def _flat(tree):
    return jnp.concatenate([jnp.ravel(tree[k]) for k in sorted(tree)])


def _distributed(noise: str, params):
    """The user-level distributed-noise mechanism of the same round (as the CLI assembles it
    for dp.unit=user): six slots, each a party adding its Skellam / discrete Gaussian share
    in Z_2^14, one user's update rounded (conditionally) on its own. At 14 bits the party
    noise (std 485) comes from the alias table, as at d = 2^20 and 16 bits; 16 bits here
    (std 1938, the rejection sampler) took 3x as long in CI for the same property."""
    from dpjax.choices import Noise, Sampling, Unit
    from dpjax.config import DPConfig
    from dpjax.mechanism import ClippedSum, Mechanism, distributed_aggregation

    d = DPConfig(aggregation="secagg", secagg_mode="simulation", noise=noise, secagg_bits=14,
                 l2_clip_norm=0.5)
    num_params = sum(a.size for a in params.values())
    agg = distributed_aggregation(d, sigma=1.0, clip=0.5, rows_per_party=1,
                                  num_params=num_params, seed=0, num_parties=6, unit=Unit.USER)
    return Mechanism(sampling=Sampling.POISSON, num_examples=100, sample_rate=0.1,
                     expected_batch_size=10.0, physical_batch_size=6,
                     clipped=ClippedSum(0.5, agg), noise_multiplier=1.0,
                     num_params=num_params, noise=Noise(noise), unit=Unit.USER)


def _audit(noise="gaussian", trials=TRIALS):
    params = initial_params()
    mech = (user_level_mechanism(num_users=100, sample_rate=0.1, l2_clip_norm=0.5,
                                 params=params, noise_multiplier=1.0, num_slots=6)
            if noise == "gaussian" else _distributed(noise, params))
    local = LocalTraining(optax.sgd(0.5), epochs=2, batch_size=4, max_examples=8)
    sgd = optax.sgd(1.0)
    step = make_round_step(softmax_regression_loss, sgd, local, mech.clipped,
                           mech.privatizer())
    state = init_state(params, sgd, secret=seeded_secret(0), privatizer=mech.privatizer())
    x, y = data(48, seed=1)
    x = x.reshape(6, 8, NUM_FEATURES)
    x[5] *= 100.0  # the canary user
    slots = ((jnp.asarray(x), jnp.asarray(y.reshape(6, 8))), jnp.ones((6, 8)))
    mask_in, mask_out = jnp.ones(6), jnp.ones(6).at[5].set(0.0)
    partial_in, _ = step.clipped_sum(state.params, slots, mask_in)
    partial_out, _ = step.clipped_sum(state.params, slots, mask_out)
    def total(partial):  # a SecAgg partial holds one sum per party
        return _flat({k: a.sum(0) for k, a in partial.items()}
                     if step.aggregation.partial_sharded else partial)

    others = total(partial_out)
    canary = total(partial_in) - others
    direction = canary / jnp.linalg.norm(canary)
    round_input = step.prepare(state.step)  # SecAgg masks (None for a plain sum)
    scores = [release_scores(step, state, partial, round_input, 1, offset, trials, others,
                             direction, mech.expected_batch_size)
              for offset, partial in ((0, partial_in), (trials, partial_out))]
    lower = stats.epsilon_lower_bound(*scores, delta=DELTA, method="gdp")
    return lower, one_step_claim(mech, DELTA), float(jnp.linalg.norm(canary))


def test_the_user_level_audit_is_consistent_and_sharp():
    lower, claim, canary_norm = _audit()
    mu = 0.5 / 0.5  # sensitivity C over the noise std sigma C, sigma = 1
    assert claim == pytest.approx(gdp_epsilon(mu, DELTA), rel=1e-12)
    assert canary_norm == pytest.approx(0.5, rel=1e-5)  # the canary user was clipped to C
    assert lower <= claim
    assert lower > gdp_epsilon(mu / 1.15, DELTA)


@pytest.mark.parametrize("noise", ["skellam", "ddgauss"])
def test_the_user_level_distributed_noise_audit_is_consistent_and_flags_weak_party_noise(
        noise, break_mechanism):
    """User-level distributed noise (each slot's party adds its discrete share; privacy
    rule 8): the lower bound stays below the accountant's one-step claim, and a variant
    whose parties add a quarter of their noise std is flagged. The claim is an RDP bound,
    so sharpness is not asserted (as for the example-level paths, tests/audit)."""
    lower, claim, canary_norm = _audit(noise)
    assert canary_norm == pytest.approx(0.5, rel=1e-5)
    assert np.isfinite(lower) and lower <= claim, (lower, claim)
    break_mechanism("party_noise")
    jax.clear_caches()
    flagged, claim_again, _ = _audit(noise, FLAG_TRIALS)
    print(f"user-level {noise}: claim {claim:.3f}, lower bound {lower:.3f}, "
          f"party noise / 4: {flagged:.3f}")
    assert claim_again == claim and flagged > claim


@pytest.mark.slow  # two more audits, each compiling its own round (~20 s loaded)
@pytest.mark.parametrize("broken", ["noise", "clip"])
def test_the_user_level_audit_flags_a_broken_variant(broken, break_mechanism):
    break_mechanism(broken)
    jax.clear_caches()
    lower, claim, canary_norm = _audit(trials=FLAG_TRIALS)
    assert lower > claim
    assert np.isfinite(lower)
    if broken == "clip":
        assert canary_norm > 5  # unclipped
