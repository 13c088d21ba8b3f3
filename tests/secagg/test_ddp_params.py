"""Parameter choice: sensitivities, noise, the refusal, and the wrap bound against simulation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax.secagg import ddp_params, discrete, rotation, rounding

BASE = dict(
    noise_multiplier=1.0,
    l2_clip_norm=0.5,
    dim=1000,
    num_parties=10,
    min_honest_survivors=7,
    bits=16,
)


def test_user_level_sensitivity_is_the_conditional_rounding_bound():
    p = ddp_params.choose_parameters(**BASE, party_l2_bound=0.5, unit="user", noise="skellam")
    c, d, beta = p.gamma * 0.5, 1024, p.rounding_beta
    # Kairouz, Liu, Steinke 2021, Theorem 1, written out independently.
    b = math.sqrt(
        min(
            c**2 + d / 4 + math.sqrt(2 * math.log(1 / beta)) * (c + math.sqrt(d) / 2),
            (c + math.sqrt(d)) ** 2,
        )
    )
    assert b <= p.l2_sensitivity <= b * (1 + 1e-5)
    assert p.rounding_l2_bound == p.l2_sensitivity
    assert p.l1_sensitivity == pytest.approx(min(p.l2_sensitivity**2, 32 * p.l2_sensitivity))
    # The honest parties' noise alone has std noise_multiplier * l2 sensitivity.
    assert p.min_honest_survivors * p.skellam_mu == pytest.approx(p.l2_sensitivity**2)
    assert p.accountant_args() == dict(
        mu=7 * p.skellam_mu, l1_sensitivity=p.l1_sensitivity, l2_sensitivity=p.l2_sensitivity
    )
    assert p.wrap_probability_bound <= p.wrap_probability_target == 1e-4
    assert p.gamma_limited_by == "wrap"


def test_example_level_sensitivity_is_gamma_c_plus_sqrt_d():
    p = ddp_params.choose_parameters(**BASE, party_l2_bound=4.0, unit="example", noise="ddgauss")
    want = p.gamma * 0.5 + math.sqrt(1024)
    # Plus the float32 rotation error of both neighbours: 2 (log2 D + 3) 2^-24 gamma c_p.
    assert want <= p.l2_sensitivity <= want + 2 * 13 * 2.0**-24 * p.gamma * 4.0 * 1.001
    assert p.rounding_l2_bound is None and p.rounding_beta is None
    assert 7 * p.ddg_sigma**2 == pytest.approx((p.noise_multiplier * p.l2_sensitivity) ** 2)
    args = p.accountant_args()
    assert args["num_parties"] == 7 and args["dim"] == 1024 and args["sigma"] == p.ddg_sigma
    assert p.summary()["noise"] == "ddgauss" and p.summary()["noise_inflation"] > 1


def test_refusal_names_the_smallest_bits_that_work():
    kwargs = dict(BASE, dim=2**16, num_parties=50, min_honest_survivors=40)
    with pytest.raises(ValueError, match=r"bits=9 .* smallest bits that would is (\d+)") as info:
        ddp_params.choose_parameters(
            **{**kwargs, "bits": 9}, party_l2_bound=0.5, unit="user", noise="skellam"
        )
    smallest = int(info.value.args[0].rsplit(" ", 1)[-1].rstrip("."))
    ddp_params.choose_parameters(
        **{**kwargs, "bits": smallest}, party_l2_bound=0.5, unit="user", noise="skellam"
    )
    with pytest.raises(ValueError, match="smallest bits"):
        ddp_params.choose_parameters(
            **{**kwargs, "bits": smallest - 1}, party_l2_bound=0.5, unit="user", noise="skellam"
        )


def test_bad_arguments_are_refused_before_any_compute():
    with pytest.raises(ValueError, match="min_honest_survivors=11"):
        ddp_params.choose_parameters(
            **{**BASE, "min_honest_survivors": 11}, party_l2_bound=0.5, unit="user", noise="skellam"
        )
    with pytest.raises(ValueError, match="bits=40"):
        ddp_params.choose_parameters(
            **{**BASE, "bits": 40}, party_l2_bound=0.5, unit="user", noise="skellam"
        )
    with pytest.raises(ValueError, match="unit='users'"):
        ddp_params.choose_parameters(**BASE, party_l2_bound=0.5, unit="users", noise="skellam")


@pytest.mark.slow
@pytest.mark.parametrize("noise", ["skellam", "ddgauss"])
def test_wrap_bound_against_simulation(noise):
    # 10^4 rounds at a loose target (1e-2): the measured wrap rate is within a factor of 2
    # of the bound and never above it by more than 3 standard errors.
    rounds, n, dim = 10_000, 4, 64
    p = ddp_params.choose_parameters(
        noise_multiplier=1.0,
        l2_clip_norm=1.0,
        party_l2_bound=1.0,
        dim=dim,
        num_parties=n,
        min_honest_survivors=n,
        bits=10,
        unit="example",
        noise=noise,
        wrap_probability=1e-2,
    )
    bound = p.wrap_probability_bound
    assert 0.9e-2 <= bound <= 1e-2
    # Worst case for the signal: every party holds the same dense vector of norm party_l2_bound.
    x = np.random.default_rng(0).normal(size=dim)
    x = jnp.asarray(x / np.linalg.norm(x) * p.party_l2_bound * p.gamma, jnp.float32)
    keys = jax.random.split(jax.random.key(1), rounds)
    rotated = jax.vmap(lambda k: rotation.rotate(x, k))(keys)  # fresh rotation per round
    rounded = rounding.randomized_round(
        jnp.broadcast_to(rotated[:, None], (rounds, n, dim)), jax.random.key(2)
    )
    if noise == "skellam":
        z, failed = discrete.skellam(jax.random.key(3), (rounds, n, dim), p.skellam_mu)
    else:
        z, failed = discrete.discrete_gaussian(jax.random.key(3), (rounds, n, dim), p.ddg_sigma)
    assert int(failed) == 0
    total = np.asarray(rounded, np.int64).sum(1) + np.asarray(z, np.int64).sum(1)
    r = 2 ** (p.bits - 1)
    rate = np.mean(np.any((total >= r) | (total < -r), axis=1))
    stderr = math.sqrt(bound * (1 - bound) / rounds)
    print(
        f"{noise}: wrap bound {bound:.4g}, measured {rate:.4g}, ratio {bound / max(rate, 1e-9):.2f}"
    )
    assert bound / 2 <= rate <= bound + 3 * stderr


def test_the_overflow_wrap_bound_counts_every_unit_and_leaves_gamma_alone():
    """A user-level party may hold ``max_units_per_party`` users in a round with more users
    than slots. For Skellam, ``n`` parties of 2 units each with noise ``mu`` are, for the
    bound, exactly ``2n`` one-unit parties with ``mu / 2`` (same total noise, same units):
    an independent check of the units' terms. ``choose_parameters`` keeps the gamma of one
    unit per party and reports the overflow bound (0.0146 at 16 bits here: utility only)."""
    from dpjax.secagg.wrap import wrap_probability_bound

    common = dict(bits=14, padded_dim=2048, party_signal_norm=3000.0, flatness=1.0,
                  noise="skellam", shift_per_party=1e-3, rounding_beta=1e-4,
                  max_rounding_tries=4)
    two_units = wrap_probability_bound(num_parties=10, party_noise=400.0, units_per_party=2,
                                       **common)
    as_parties = wrap_probability_bound(num_parties=20, party_noise=200.0, **common)
    assert two_units == pytest.approx(as_parties, rel=1e-9)
    assert two_units > wrap_probability_bound(num_parties=10, party_noise=400.0, **common)
    kw = dict(noise_multiplier=1.0, l2_clip_norm=0.5, party_l2_bound=0.5, dim=1210,
              num_parties=19, min_honest_survivors=19, bits=16, unit="user", noise="skellam")
    one = ddp_params.choose_parameters(**kw)
    two = ddp_params.choose_parameters(**kw, max_units_per_party=2)
    assert one.wrap_probability_bound_overflow is None and one.max_units_per_party == 1
    assert two.gamma == one.gamma and two.wrap_probability_bound == one.wrap_probability_bound
    assert one.wrap_probability_bound < two.wrap_probability_bound_overflow < 1
    assert two.summary()["wrap_probability_bound_overflow"] == two.wrap_probability_bound_overflow


@pytest.mark.parametrize("party_variance", [1.0e7, 1.6e7, 2.1e7, 4.0e7])
def test_the_wrap_bound_is_never_below_one_coordinates_noise_tail(party_variance):
    # 128 Skellam parties at 18 bits, D = 8192: the summed noise's variance is past 2^30
    # (8.4e6 per party), where scipy.special.ive returns NaN. A NaN window was skipped
    # by max(), and the bound fell to ~1e-4 where one coordinate alone wraps with
    # probability ~1e-2 (the MNIST-1D study's Skellam-18 runs, 2026-11-30: gamma 19818
    # instead of 8482). Lower bound used: the Gaussian tail of that coordinate's noise
    # (Skellam at this mu is Gaussian to far better than the factor 2 allowed), with no
    # signal at all.
    from dpjax.secagg.wrap import wrap_probability_bound

    n, bits, size = 128, 18, 8192
    bound = wrap_probability_bound(bits=bits, padded_dim=size, num_parties=n,
                                   party_signal_norm=1.0, flatness=1.0, noise="skellam",
                                   party_noise=party_variance)
    one_coordinate = math.erfc(2 ** (bits - 1) / math.sqrt(2 * n * party_variance))
    assert one_coordinate > 1e-4  # the setting is one where the wrap target is missed
    assert bound >= min(1.0, one_coordinate / 2), (bound, one_coordinate)


def test_skellam_and_ddg_get_the_same_gamma_where_the_sum_variance_passes_2_to_30():
    # Both noises are sub-Gaussian with the same variance; at 18 bits and 128 parties
    # (the MNIST-1D study's setting) the wrap target limits both, and their gammas agree.
    common = dict(noise_multiplier=5.226, l2_clip_norm=0.5, party_l2_bound=0.5, dim=6538,
                  num_parties=128, min_honest_survivors=128, bits=18, unit="user")
    sk, dg = (ddp_params.choose_parameters(noise=noise, **common)
              for noise in ("skellam", "ddgauss"))
    assert sk.gamma_limited_by == dg.gamma_limited_by == "wrap"
    assert abs(sk.gamma / dg.gamma - 1) < 0.05, (sk.gamma, dg.gamma)
    assert sk.wrap_probability_bound <= 1e-4
