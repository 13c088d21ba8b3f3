"""The alias-table sampler of Skellam and discrete Gaussian noise: exact tables, mpmath, speed.

What is exact by construction is checked exactly (integer units); what comes from float64
(the pmf) is checked against mpmath at 40 digits. The goodness of fit of its draws is in
test_discrete.py (``path="alias"``)."""

import math

import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import pytest

from dpjax.secagg import alias, discrete
from dpjax.secagg.chacha import stream_words

SCALES = [("skellam", 0.3), ("skellam", 30.0), ("skellam", 2000.0),
          ("dgauss", 0.4), ("dgauss", 5.0), ("dgauss", 60.0)]


def _exact_pmf(noise, scale, values):
    mpmath.mp.dps = 40
    if noise == "skellam":
        return [mpmath.exp(-scale) * mpmath.besseli(int(abs(v)), scale) for v in values]
    s2 = 2 * mpmath.mpf(scale) ** 2
    wide = int(40 * scale) + 20
    normalizer = mpmath.fsum(mpmath.exp(-mpmath.mpf(k) ** 2 / s2) for k in range(-wide, wide + 1))
    return [mpmath.exp(-mpmath.mpf(int(v)) ** 2 / s2) / normalizer for v in values]


@pytest.mark.parametrize("noise, scale", SCALES)
def test_the_table_is_within_2_to_minus_45_of_the_exact_law_in_total_variation(noise, scale):
    """TV = sum |A_j 2^-64 - p_j| over the window + the mass outside it. Observed (2026-11-30):
    2^-52.6, 2^-52.9, 2^-48.6 (Skellam 0.3, 30, 2000), 2^-57.3, 2^-54.5, 2^-53.9 (DG)."""
    lowest, units = alias.table_pmf(noise, scale)
    assert sum(units) == 2**64
    values = range(lowest, lowest + len(units))
    exact = _exact_pmf(noise, scale, values)
    tv = mpmath.fsum(abs(mpmath.mpf(a) / 2**64 - p) for a, p in zip(units, exact, strict=True))
    tv += 1 - mpmath.fsum(exact)
    assert tv < 2.0**-45
    # the window is centred and its edges carry (nearly) nothing
    assert lowest < 0 and lowest + len(units) - 1 == -lowest
    assert units[0] < 2**-60 * 2**64


@pytest.mark.parametrize("noise, scale", [*SCALES, ("skellam", 2.0e5), ("dgauss", 1024.0)])
def test_the_alias_table_gives_each_value_exactly_its_units(noise, scale):
    """Rebuild every value's probability from the slots (kept units + aliased rest): equal,
    as integers, to the table's, and nothing for the padding slots."""
    lowest, units = alias.table_pmf(noise, scale)
    packed, thr_low, lo = alias.alias_table(noise, scale)
    depth = packed.shape[0].bit_length() - 1
    cap = 1 << (64 - depth)
    got = [0] * packed.shape[0]
    for i, (p, t_low) in enumerate(zip(packed.tolist(), thr_low.tolist(), strict=True)):
        kept, other = ((p >> depth) << 32) | t_low, p & ((1 << depth) - 1)
        assert kept < cap
        got[i] += kept
        got[other] += cap - kept
    assert lo == lowest and got[: len(units)] == list(units) and not any(got[len(units):])


def test_skellam_float64_pmf_matches_mpmath_at_the_largest_checked_scale():
    """scipy's ive at mu = 2e5 (std 447) against mpmath: relative error <= 1e-12 out to 10
    standard deviations (observed <= 6.4e-13, at 10 std; <= 1.3e-16 within 1 std)."""
    from scipy import special

    mu = 2.0e5
    mpmath.mp.dps = 30
    for k in (0, 447, 1341, 4470):
        exact = mpmath.exp(-mu) * mpmath.besseli(k, mu, maxterms=10**7)
        assert abs(special.ive(k, mu) - exact) / exact < 1e-12


def test_window_tails_are_below_2_to_minus_81():
    for mu in (0.3, 30.0, 2000.0, 2.0**20):
        w = alias.half_width("skellam", mu)
        assert alias._skellam_log_tail(mu, w) <= -81 * math.log(2)
        assert w < 14 * math.sqrt(mu) + 60
    assert alias.half_width("dgauss", 100.0) == math.ceil(100 * math.sqrt(162 * math.log(2))) + 1


def test_draws_are_integers_from_the_table_under_jit_and_vmap():
    keys = jax.random.split(jax.random.key(4), 3)
    draw = jax.jit(jax.vmap(lambda k: discrete.skellam(k, (5000,), 2000.0)[0]))
    out = np.asarray(draw(keys))
    lowest, units = alias.table_pmf("skellam", 2000.0)
    assert out.dtype == np.int32 and out.min() >= lowest and out.max() < lowest + len(units)
    assert not np.array_equal(out[0], out[1])
    eager, failed = discrete.skellam(keys[0], (5000,), 2000.0)
    np.testing.assert_array_equal(out[0], eager)
    assert int(failed) == 0


def test_the_alias_table_refuses_what_it_cannot_hold():
    with pytest.raises(ValueError, match="standard deviation"):
        alias.table_pmf("dgauss", 2048.0)
    with pytest.raises(ValueError, match="'skellam' or 'dgauss'"):
        alias.table_pmf("laplace", 1.0)
    with pytest.raises(ValueError, match="scale"):
        alias.table_pmf("skellam", float("nan"))
    assert jnp.asarray(alias.sample(discrete.chacha_key(jax.random.key(0)), (0,), "dgauss",
                                    1.0)).shape == (0,)


_stream = jax.jit(stream_words, static_argnums=(1, 2, 3))


def _two_word_draws(key, size, noise, scale):
    """The reference: every draw from its own two words of the sampler's stream (words i and
    size + i), resolved in Python integers as a 64-bit compare (independent of _draw)."""
    packed, thr_low, lowest = alias.alias_table(noise, scale)
    depth = packed.shape[0].bit_length() - 1
    words = np.asarray(_stream(key, 5, 0, (2, size))).astype(np.uint64)
    w = (words[0] << np.uint64(32)) | words[1]
    slot = (w >> np.uint64(64 - depth)).astype(np.int64)
    rest = w & np.uint64((1 << (64 - depth)) - 1)
    thr = ((packed[slot].astype(np.uint64) >> np.uint64(depth)) << np.uint64(32)) \
        | thr_low[slot].astype(np.uint64)
    aliased = (packed[slot] & ((1 << depth) - 1)).astype(np.int64)
    # thr 0 encodes "the whole slot keeps itself" (its alias is itself)
    return np.where(rest < thr, slot, aliased) + lowest, words


@pytest.mark.slow  # three compilations of the sampler (~4 s each)
def test_second_words_drawn_only_for_tied_blocks_give_the_two_word_draws():
    """From ``LAZY_MIN_SIZE`` draws the sampler generates the second word only for 16-draw
    blocks with a tie of the first word (the whole second stream past its capacity): its
    draws must equal the plain 64-bit draws, including where the second word decides
    (asserted to occur: 4 keys x 2^18 draws at 2^-18 ties per draw), at a size that is a
    multiple of 16 and, under vmap (the audit's trials; the fallback then runs as a
    select), one that is not (second words then straddle ChaCha20 blocks)."""
    noise, scale = "skellam", 2.5e5  # depth 14
    packed, thr_low, lowest = (jnp.asarray(a) for a in alias.alias_table(noise, scale))
    depth = packed.shape[0].bit_length() - 1
    keys = jnp.stack([jax.random.bits(jax.random.key(s), (8,), jnp.uint32) for s in range(4)])
    size = alias.LAZY_MIN_SIZE
    draw = jax.jit(alias._draw, static_argnames=("size", "capacity"))
    ties = decided = 0
    for key in keys:
        want, words = _two_word_draws(key, size, noise, scale)
        np.testing.assert_array_equal(np.asarray(draw(key, size, packed, thr_low, lowest)), want)
        r_high = words[0] & np.uint64((1 << (32 - depth)) - 1)
        slot = (words[0] >> np.uint64(32 - depth)).astype(np.int64)
        tie = r_high == (np.asarray(packed)[slot] >> depth)
        ties += int(tie.sum())
        decided += int(np.sum(tie & (words[1] >= np.asarray(thr_low)[slot])))
    assert ties >= 2 and 0 < decided < ties  # the second word decided both ways
    # past the capacity (1 block): the whole second stream, the same draws
    small = draw(keys[0], size, packed, thr_low, lowest, capacity=1)
    np.testing.assert_array_equal(np.asarray(small), _two_word_draws(keys[0], size, noise,
                                                                      scale)[0])
    size += 3
    batched = jax.jit(jax.vmap(lambda k: alias._draw(k, size, packed, thr_low, lowest)))(keys)
    for key, row in zip(keys, np.asarray(batched), strict=True):
        np.testing.assert_array_equal(row, _two_word_draws(key, size, noise, scale)[0])


def test_tie_capacity_holds_the_expected_tied_blocks_many_times_over():
    """Chernoff's capacity at 2^-64: at least the mean plus 8 of its standard deviations."""
    for size, depth in ((2**20, 14), (2**24, 15), (37, 6), (2**16, 17)):
        blocks = -(-size // 16)
        mean = blocks * 16 * 2.0 ** (depth - 32)
        cap = alias.tie_capacity(size, depth)
        assert min(blocks, mean + 8 * math.sqrt(mean) + 8) <= cap <= blocks
