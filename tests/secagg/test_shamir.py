"""Shamir sharing: t shares reconstruct; t-1 shares are consistent with every secret."""

import itertools

import numpy as np
import pytest

from dpjax.secagg import MERSENNE_61, shamir_evaluate, shamir_reconstruct, shamir_share

SMALL_PRIME = 11
XS = [1, 2, 3, 4, 5]


@pytest.mark.parametrize("threshold", [2, 3])
def test_any_t_minus_1_shares_are_equally_consistent_with_every_secret(threshold):
    # Exhaustively over GF(11): for every set of t-1 holders and every value
    # their shares can take, count the polynomials producing those shares for
    # each secret. Perfect secrecy = the same count (exactly 1) for all 11 secrets.
    polys = list(itertools.product(range(SMALL_PRIME), repeat=threshold))
    shares = np.stack([
        shamir_evaluate([p[0]], np.array(p[1:], dtype=object)[:, None], XS, SMALL_PRIME)[:, 0]
        for p in polys
    ]).astype(np.int64)  # fmt: skip
    secrets = np.array([p[0] for p in polys])
    for holders in itertools.combinations(range(len(XS)), threshold - 1):
        seen = shares[:, list(holders)]
        counts = {}
        for row, s in zip(map(tuple, seen), secrets, strict=True):
            counts[(row, s)] = counts.get((row, s), 0) + 1
        assert len(counts) == SMALL_PRIME**threshold
        assert set(counts.values()) == {1}


@pytest.mark.parametrize("threshold", [2, 3])
def test_any_t_shares_reconstruct_exhaustively(threshold):
    for poly in itertools.product(range(SMALL_PRIME), repeat=threshold):
        shares = shamir_evaluate([poly[0]], np.array(poly[1:], dtype=object)[:, None], XS, 11)
        for holders in itertools.combinations(range(len(XS)), threshold):
            got = shamir_reconstruct(
                [XS[h] for h in holders], shares[list(holders)], threshold=threshold, prime=11
            )
            assert got == [poly[0]]


def test_large_field_round_trip_and_too_few_shares_raise():
    secrets = [0, 1, 2**32 - 1, MERSENNE_61 - 1]
    xs = list(range(1, 8))
    shares = shamir_share(secrets, threshold=4, xs=xs, rng=np.random.default_rng(0))
    assert shamir_reconstruct(xs[3:], shares[3:], threshold=4) == secrets
    with pytest.raises(ValueError, match="threshold=4"):
        shamir_reconstruct(xs[:3], shares[:3], threshold=4)


def test_t_minus_1_shares_differ_between_draws():
    # With fresh OS randomness two sharings of the same secret differ (the
    # coefficients are random); identical shares would mean a fixed polynomial.
    a = shamir_share([5], threshold=3, xs=[1, 2, 3])
    b = shamir_share([5], threshold=3, xs=[1, 2, 3])
    assert not np.array_equal(a[:2], b[:2])


def test_share_validates_points_threshold_and_secrets():
    with pytest.raises(ValueError, match="distinct and nonzero"):
        shamir_share([1], threshold=2, xs=[1, 12], prime=11)
    with pytest.raises(ValueError, match="threshold=4"):
        shamir_share([1], threshold=4, xs=[1, 2, 3], prime=11)
    with pytest.raises(ValueError, match="secret"):
        shamir_share([11], threshold=2, xs=[1, 2], prime=11)
