"""DP-SGD with securely aggregated clipped sums vs the plain-sum step (moved from
tests/secagg/test_secagg_training.py when the SecAgg glue left dpjax.secagg)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpjax import noise
from dpjax.aggregation import SecAggSettings, SecAggSum, fixed_point_scale
from dpjax.mechanism import ClippedSum
from dpjax.train import init_state, make_dp_step, make_secagg_dp_step


def _flat(tree):
    return np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(tree)])


def _float32_slack(params):
    """What float32 rounding of the updated parameters alone can account for."""
    return 4 * np.finfo(np.float32).eps * np.abs(_flat(params)).max()


@pytest.mark.parametrize("settings", [
    SecAggSettings(num_parties=4, mode="simulation", seed=1),
    SecAggSettings(num_parties=4, num_neighbours=2, mode="secure"),
])
def test_a_secagg_step_matches_the_plain_step_within_the_quantization_bound(
    mlp_problem, settings
):
    loss_fn, params, (x, y) = mlp_problem  # batch 12 -> 3 rows per party
    lr, b = 0.5, 12.0
    opt = optax.sgd(lr)
    kw = dict(noise_multiplier=1.0, l2_clip_norm=0.5, expected_batch_size=b)
    mask = jnp.ones(12).at[4].set(0.0)
    plain, _ = make_dp_step(loss_fn, opt, **kw).step(init_state(params, opt, 7), (x, y), mask)
    sec = make_secagg_dp_step(loss_fn, opt, physical_batch_size=12, settings=settings, **kw)
    secure, stats = sec.run(init_state(params, opt, 7), [((x, y), mask)])
    diff = np.abs(_flat(secure.params) - _flat(plain.params))
    # same noise (same key); the sums differ by <= n/scale per coordinate (+ float32 rounding)
    bound = lr * sec.aggregation.error_bound / b + _float32_slack(plain.params)
    assert diff.max() <= bound
    assert diff.max() > 0 or sec.aggregation.error_bound < 1e-6
    assert int(stats.batch_size) == 11


def test_overflow_chunks_are_summed_per_party_then_aggregated_in_one_round_and_noised_once(
    mlp_problem, monkeypatch
):
    """A step whose batch spills into a second chunk runs one SecAgg round, not one per
    chunk: the aggregator never learns a per-chunk sum. (Before the mechanism
    restructuring each chunk had its own round; this is the one case whose numerics
    changed then.)"""
    from dpjax import aggregation

    loss_fn, params, (x, y) = mlp_problem
    opt = optax.sgd(0.5)
    kw = dict(noise_multiplier=1.0, l2_clip_norm=0.5, expected_batch_size=12.0)
    mask = jnp.ones(12)
    plain, _ = make_dp_step(loss_fn, opt, **kw).step(init_state(params, opt, 0), (x, y), mask)
    rounds, real = [], aggregation.prepare_round
    monkeypatch.setattr(aggregation, "prepare_round",
                        lambda *a, **k: rounds.append(k["round_index"]) or real(*a, **k))
    sec = make_secagg_dp_step(loss_fn, opt, physical_batch_size=6,
                              settings=SecAggSettings(2, mode="simulation"), **kw)
    split, _ = sec.run(init_state(params, opt, 0), [((x[:6], y[:6]), mask[:6]),
                                                    ((x[6:], y[6:]), mask[6:])])
    assert rounds == [0]  # one round, for step 0
    bound = 0.5 * sec.aggregation.error_bound / 12.0 + _float32_slack(plain.params)
    assert np.abs(_flat(split.params) - _flat(plain.params)).max() <= bound
    assert int(split.step) == 1


def test_the_noise_covers_the_rounding_as_well_as_the_clip_bound(mlp_problem, monkeypatch):
    # Stochastic rounding can move a party's sum by 1/scale per coordinate more
    # than one example's clipped gradient: the noise is scaled to S + sqrt(d)/scale.
    loss_fn, params, (x, y) = mlp_problem
    told, privatize = [], noise.privatize

    def recording_privatize(summed, key, **kw):
        told.append(kw["l2_clip_norm"])
        return privatize(summed, key, **kw)

    monkeypatch.setattr(noise, "privatize", recording_privatize)
    opt = optax.sgd(0.1)
    sec = make_secagg_dp_step(loss_fn, opt, noise_multiplier=1.0, l2_clip_norm=0.5,
                              expected_batch_size=12.0, physical_batch_size=12,
                              settings=SecAggSettings(4, mode="simulation"))
    sec.run(init_state(params, opt, 0), [((x, y), jnp.ones(12))])
    d = sum(p.size for p in jax.tree_util.tree_leaves(params))
    assert told == [0.5 + np.sqrt(d) / sec.aggregation.scale]
    per_layer = ClippedSum({"a": 0.3, "b": 0.4}, SecAggSum(SecAggSettings(2), 4, 0.5))
    scale = per_layer.aggregation.scale
    assert per_layer.sensitivity(num_params=100) == pytest.approx(0.5 + 10 / scale)
    assert per_layer.sensitivity("replace_one", 100) == pytest.approx(2 * (0.5 + 10 / scale))


def test_a_step_beyond_the_fixed_point_range_is_refused_before_anything_is_encoded(
    mlp_problem
):
    """Party sums accumulated over k chunks hold up to k * rows rows: the scale (sized with
    a factor-2 margin for one chunk) cannot hold that many, and the round is refused
    instead of wrapping (a wrapped sum would break the sensitivity bound)."""
    loss_fn, params, (x, y) = mlp_problem
    opt = optax.sgd(0.1)
    sec = make_secagg_dp_step(loss_fn, opt, noise_multiplier=1.0, l2_clip_norm=0.5,
                              expected_batch_size=12.0, physical_batch_size=4,
                              settings=SecAggSettings(2, mode="simulation"))
    chunk = ((x[:4], y[:4]), jnp.ones(4))
    sec.run(init_state(params, opt, 0), [chunk] * 2)  # two chunks fit the margin
    with pytest.raises(ValueError, match="fit SecAgg's fixed-point range"):
        sec.run(init_state(params, opt, 0), [chunk] * 8)


def test_the_scale_never_lets_the_sum_wrap():
    scale = fixed_point_scale(num_parties=100, rows_per_party=64, l2_clip_norm=1.0)
    assert 100 * (64 * scale + 1) < 2**31
    assert 100 * (64 * 4 * scale + 1) >= 2**31  # and it is not wastefully small


def test_bad_settings_are_refused(mlp_problem):
    loss_fn, _, _ = mlp_problem
    with pytest.raises(ValueError, match="num_parties=1"):
        SecAggSettings(num_parties=1)
    with pytest.raises(ValueError, match="mode='fast'"):
        SecAggSettings(num_parties=2, mode="fast")
    with pytest.raises(ValueError, match="physical_batch_size=10 to be a multiple of num_p"):
        make_secagg_dp_step(loss_fn, optax.sgd(1.0), noise_multiplier=1.0, l2_clip_norm=1.0,
                            expected_batch_size=10.0, physical_batch_size=10,
                            settings=SecAggSettings(4))
