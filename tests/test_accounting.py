import math

import dp_accounting
import pytest
from dp_accounting import pld, rdp

from dpjax import accounting


def _direct_poisson(sigma, q, steps, delta, kind):
    acc = (
        pld.PLDAccountant(value_discretization_interval=accounting.PLD_VALUE_DISCRETIZATION)
        if kind == "pld"
        else rdp.RdpAccountant()
    )
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    acc.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("kind", ["rdp", "pld"])
@pytest.mark.parametrize("sigma, q, steps", [(1.1, 0.01, 500), (0.8, 0.004, 1200)])
def test_poisson_epsilon_equals_dp_accounting_called_directly(kind, sigma, q, steps):
    got = accounting.epsilon(sigma, q, steps, 1e-5, accountant=kind)
    assert got == pytest.approx(_direct_poisson(sigma, q, steps, 1e-5, kind), rel=1e-12)
    assert 0 < got < 100


def test_fixed_size_epsilon_is_rdp_replace_one_with_sensitivity_two_c():
    sigma, n, b, steps = 1.2, 10_000, 100, 300
    acc = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    acc.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.SampledWithoutReplacementDpEvent(
                n, b, dp_accounting.GaussianDpEvent(sigma / 2)
            ),
            steps,
        )
    )
    got = accounting.epsilon(sigma, b / n, steps, 1e-5, sampling="fixed_size", num_examples=n)
    assert got == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    # replace-one with sensitivity 2C is weaker than Poisson add/remove at the same sigma
    assert got > accounting.epsilon(sigma, b / n, steps, 1e-5)


def test_fixed_size_with_pld_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="PLD accountant does not implement"):
        accounting.epsilon(1.0, 0.01, 10, 1e-5, "pld", "fixed_size", num_examples=1000)


@pytest.mark.parametrize("kind", ["rdp", "pld"])
def test_calibration_round_trips(kind):
    target, q, steps = 2.0, 0.01, 300
    sigma = accounting.calibrate_noise_multiplier(target, 1e-5, q, steps, accountant=kind)
    eps = accounting.epsilon(sigma, q, steps, 1e-5, accountant=kind)
    assert eps <= target
    assert eps >= 0.99 * target
    # smallest to 0.1%: a slightly smaller sigma exceeds the target
    assert accounting.epsilon(sigma / 1.002, q, steps, 1e-5, accountant=kind) > target


def test_calibration_of_an_unreachable_target_raises():
    with pytest.raises(ValueError, match="target_epsilon=1e-09"):
        accounting.calibrate_noise_multiplier(1e-9, 1e-5, 1.0, 10_000)


def test_ledger_composes_heterogeneous_segments_like_dp_accounting():
    ledger = accounting.Ledger().record(1.0, 0.01, 100).record(1.0, 0.01, 50).record(2.0, 0.02, 30)
    assert len(ledger.segments) == 2 and ledger.steps == 180
    acc = rdp.RdpAccountant()
    for sigma, q, t in [(1.0, 0.01, 150), (2.0, 0.02, 30)]:
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
        acc.compose(dp_accounting.SelfComposedDpEvent(event, t))
    assert ledger.epsilon(1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    assert accounting.Ledger.from_dict(ledger.to_dict()) == ledger
    assert accounting.Ledger().epsilon(1e-5) == 0.0


def test_max_steps_stops_before_the_budget_is_crossed():
    ledger = accounting.Ledger().record(1.0, 0.02, 10)
    k = accounting.max_steps(ledger, 1.0, 0.02, 2.0, 1e-5)
    assert ledger.record(1.0, 0.02, k).epsilon(1e-5) <= 2.0
    assert ledger.record(1.0, 0.02, k + 1).epsilon(1e-5) > 2.0


def test_zero_noise_is_infinite_epsilon():
    assert accounting.epsilon(0.0, 0.1, 10, 1e-5) == math.inf


@pytest.mark.parametrize(
    "args, match",
    [
        ((-1.0, 0.1, 10, 1e-5), "noise_multiplier=-1.0"),
        ((1.0, 0.0, 10, 1e-5), r"sample_rate=0.0 in \(0, 1\]"),
        ((1.0, 1.5, 10, 1e-5), "sample_rate=1.5"),
        ((1.0, 0.1, 0, 1e-5), "steps=0"),
        ((1.0, 0.1, 10, 0.0), r"delta=0.0 in \(0, 1\)"),
        ((1.0, 0.1, 10, 1.0), "delta=1.0"),
    ],
)
def test_bad_inputs_raise_value_errors_naming_the_argument(args, match):
    with pytest.raises(ValueError, match=match):
        accounting.epsilon(*args)


def test_bad_accountant_and_sampling_names_list_the_choices():
    with pytest.raises(ValueError, match=r"accountant='moments'.*\['rdp', 'pld'\]"):
        accounting.epsilon(1.0, 0.1, 10, 1e-5, accountant="moments")
    with pytest.raises(ValueError, match="sampling='shuffle'"):
        accounting.epsilon(1.0, 0.1, 10, 1e-5, sampling="shuffle")


def test_delta_not_below_one_over_n_warns():
    with pytest.warns(UserWarning, match="1/N"):
        accounting.epsilon(1.0, 0.1, 10, 1e-3, num_examples=1000)
    with pytest.warns(UserWarning, match="1/N"):
        accounting.check_delta(1e-3, 1000)
