"""The mechanism object: the event it accounts is the one its sampler realizes, and its
sensitivity, noise and relation agree."""

import dp_accounting
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax import accounting, randomness
from dpjax.aggregation import PlainSum, SecAggSettings, SecAggSum
from dpjax.choices import Relation, Sampling
from dpjax.config import DPConfig
from dpjax.mechanism import ClippedSum, Mechanism

PARAMS = {"w": jnp.zeros((30, 10)), "b": jnp.zeros(10)}  # d = 310


def _mechanism(sampling, *, n=400, batch=40, aggregation=None, sigma=1.3):
    fixed = Sampling(sampling) is Sampling.FIXED_SIZE
    return Mechanism(sampling=sampling, num_examples=n, sample_rate=batch / n,
                     expected_batch_size=float(batch), physical_batch_size=batch if fixed else 64,
                     clipped=ClippedSum(0.7, aggregation or PlainSum()), noise_multiplier=sigma,
                     num_params=310)


def test_the_poisson_event_has_the_inclusion_rate_the_sampler_realizes():
    m = _mechanism("poisson")
    event = m.dp_event(1).events[0].event
    assert isinstance(event, dp_accounting.PoissonSampledDpEvent)
    assert m.relation is Relation.ADD_OR_REMOVE_ONE
    sampler, steps = m.sampler(randomness.fresh_secret()), 600
    included = sum(int(c.mask.sum()) for t in range(steps) for c in sampler.sample(t))
    rate, q = included / (steps * m.num_examples), event.sampling_probability
    # 240,000 independent Bernoulli(q) draws: standard error sqrt(q (1 - q) / 240000)
    assert abs(rate - q) < 4 * np.sqrt(q * (1 - q) / (steps * m.num_examples))
    assert event.event.noise_multiplier == m.noise_std / m.sensitivity()


def test_the_fixed_size_event_has_the_batch_size_the_sampler_draws_and_replace_one():
    m = _mechanism("fixed_size")
    event = m.dp_event(1).events[0].event
    assert isinstance(event, dp_accounting.SampledWithoutReplacementDpEvent)
    assert m.relation is Relation.REPLACE_ONE
    sampler = m.sampler(randomness.fresh_secret())
    sizes = {int(c.mask.sum()) for t in range(200) for c in sampler.sample(t)}
    assert sizes == {event.sample_size} and event.source_dataset_size == m.num_examples
    # replace-one changes two rows: the Gaussian event sees half the add/remove multiplier
    assert m.sensitivity() == 2 * m.sensitivity(Relation.ADD_OR_REMOVE_ONE)
    assert event.event.noise_multiplier == pytest.approx(m.noise_std / m.sensitivity())


def test_the_epsilon_of_the_mechanism_is_dp_accountings_for_its_own_event():
    for sampling in ("poisson", "fixed_size"):
        m = _mechanism(sampling)
        n_kw = {"num_examples": m.num_examples} if sampling == "fixed_size" else {}
        assert m.epsilon(50, 1e-5, "rdp") == accounting.epsilon(
            m.noise_multiplier, m.sample_rate, 50, 1e-5, "rdp", sampling, **n_kw)


def test_secagg_sensitivity_and_noise_cover_the_rounding():
    agg = SecAggSum(SecAggSettings(4), rows_per_party=16, row_bound=0.7)
    m = _mechanism("poisson", aggregation=agg)
    slack = np.sqrt(310) / agg.scale
    assert m.sensitivity() == pytest.approx(0.7 + slack)
    assert m.noise_std == pytest.approx(1.3 * (0.7 + slack))
    assert m.fingerprint()["secagg_scale"] == agg.scale


def test_from_config_calibrates_sigma_for_the_planned_steps_and_uses_the_sampler_given():
    d = DPConfig(noise_multiplier=None, target_epsilon=2.0, sampling="fixed_size")
    m = Mechanism.from_config(d, num_examples=1000, batch_size=50, steps=100,
                              physical_batch_size=50, params=PARAMS, seed=0)
    assert m.sampling is Sampling.FIXED_SIZE and m.relation is Relation.REPLACE_ONE
    assert 0.99 * 2.0 <= m.epsilon(100, d.delta, d.accountant) <= 2.0
    assert m.num_params == 310


def test_per_layer_bounds_keep_the_total_sensitivity():
    d = DPConfig(per_layer_clipping=True, l2_clip_norm=0.8)
    m = Mechanism.from_config(d, num_examples=1000, batch_size=50, steps=10,
                              physical_batch_size=64, params=PARAMS, seed=0)
    assert m.sensitivity() == pytest.approx(0.8)
    assert isinstance(m.clipped.l2_clip_norm, dict)


def test_bad_mechanisms_are_refused():
    with pytest.raises(ValueError, match="sample_rate=1.5"):
        _mechanism("poisson", batch=600)
    with pytest.raises(ValueError, match="'bernoulli' is not a valid Sampling"):
        _mechanism("bernoulli")
    with pytest.raises(ValueError, match="num_params"):
        ClippedSum(1.0, SecAggSum(SecAggSettings(2), 4, 1.0)).sensitivity()
