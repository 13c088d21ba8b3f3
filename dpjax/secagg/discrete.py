"""Discrete noise for distributed DP: discrete Gaussian and Skellam samplers in ``jnp``.

Discrete Gaussian and Skellam draws with a standard deviation up to
``alias.ALIAS_MAX_STD`` (2^10) come from an exact 64-bit alias table
(:mod:`dpjax.secagg.alias`: total variation 2^-45 to 2^-57 per draw, two
ChaCha20 words and two gathers, no loop); the samplers below serve larger ones
and the Poisson draws.

Poisson draws with ``lam < POISSON_INVERSION_MAX_LAM`` (16) come from exact
inversion: a uniform 64-bit value (two ChaCha20 words) is compared, as
integers, with a 72-entry table of ``floor(2^64 P(X <= k))`` computed on the
host with 60-digit decimals; each value's probability is within ``2^-63`` of
the Poisson pmf and the total variation per draw is below ``2^-56``
(:func:`poisson_inversion_table`). There the rejection sampler below would
propose with ``t = 1``, accept only ~1/3 of its candidates and waste half of
them below 0.

Every other sampler here is a rejection sampler whose proposals are built from
integers only, in the style of Canonne, Kamath, Steinke 2020 ("The Discrete
Gaussian for Differential Privacy", Algorithms 2 and 3):

- proposal: a discrete Laplace value ``y = +-(U + t V)`` with ``t = 2^s``,
  ``U`` uniform on ``{0, ..., t-1}`` (the top ``s`` bits of a random word),
  ``V`` geometric with ``P(V >= k) = e^{-k}`` (a word compared with the 22
  integer thresholds ``floor(e^{-k} 2^32)``) and a random sign (``-0`` is
  rejected, as in Algorithm 2);
- acceptance: one Bernoulli(``exp(-e)``) draw, a 32-bit word compared with
  ``floor(exp(-e) 2^32)``, where ``e`` merges Algorithm 2's acceptance of
  ``U`` (``U / t``) with the target's acceptance ratio.

Vectorized: every coordinate gets one candidate; the coordinates left go
through two compacted stages with a fixed batch of fresh candidates each
(the first accepted one is kept) and finally a ``lax.while_loop`` whose
round cap grows with the size (:func:`_loop_rounds`).
Random words come from ChaCha20 (:mod:`dpjax.secagg.chacha`, 3.5x faster
than Threefry on CPU) keyed by the caller's 256-bit key (``uint32[8]``: the
party's noise is then as hard to guess as that key), or by 256 bits drawn from
a ``jax.random`` key (64 bits of entropy: for tests and simulations). The
number of coordinates still without a sample after that (probability below
2^-100 per call, see :func:`_loop_rounds`) is returned, never hidden; those
coordinates are 0.

Where floating point departs from the exact algorithm (the rejection samplers):

- ``P(V >= k)`` is ``floor(e^{-k} 2^32) / 2^32`` (error < 2^-32) and ``V``
  is truncated at 22, so proposals beyond ``23 t`` (more than ~16 standard
  deviations) are never made;
- the acceptance probability ``exp(-e)`` is computed in float32 (relative
  error ~ ``(1 + e) 2^-23``) and realized with 2^-32 resolution, so an
  outcome whose acceptance probability is below 2^-32 is never accepted.

Each candidate's acceptance probability is therefore within ~2^-20 of the
exact one (checked against mpmath at lam = 16 .. 2^38): the pmf of every value
within ~10 standard deviations is the exact one up to a relative error of
about 1e-6 (not 2^-40: that would take 64-bit acceptance words and a
double-float log-pmf). Nothing depends on the low-order
bits of a float (the proposal's integer part is exact), which is what
defeats Mironov's (2012) floating-point attack on continuous noise.
"""

from __future__ import annotations

import decimal
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from scipy import stats

import dpjax.secagg.alias as alias
from dpjax.secagg.chacha import stream_words

# Proposals stay below 23 * 2^19 < 2^24, so every integer involved is exact in float32.
MAX_NOISE_STD = 2.0**19
_GEOMETRIC_THRESHOLDS = tuple(int(math.floor(math.exp(-k) * 2**32)) for k in range(1, 23))
_MAX_THRESHOLD = np.float32(2**32 - 256)  # the largest float32 below 2^32
_WORDS_PER_CANDIDATE = 3
# Candidates per coordinate in each stage; stage buffers are sized for a failure rate
# per candidate of at most _FAIL_BUCKETS[i] (the smallest bucket above the true rate).
_STAGE_CANDIDATES = (1, 4, 10)
_FAIL_BUCKETS = (0.6, 0.8)
_LOOP_BUFFER, _LOOP_CANDIDATES, _MIN_LOOP_ROUNDS = 64, 64, 64
_POISSON_LOG_M_MARGIN = 1e-3  # keeps the float32 acceptance probability <= 1
# Below this lam, Poisson draws come from exact inversion of a 64-bit fixed-point CDF table
# (at lam < 2.25 the rejection sampler's proposal has t = 1, acceptance ~1/3, and half its
# candidates fall below 0); its _INVERSION_TABLE entries leave P(X >= 72) < 2^-70 at lam = 16.
POISSON_INVERSION_MAX_LAM = 16.0
_INVERSION_TABLE = 72


class _Constants(NamedTuple):
    """Traced parameters of a sampler: one compilation serves every noise level."""

    log2_t: jax.Array  # uint32
    t: jax.Array  # int32
    a: jax.Array  # float32: DG: (sigma^2/t) frac | Poisson: log M
    b: jax.Array  # float32: DG: 1/(2 sigma^2)    | Poisson: lam
    c: jax.Array  # int32:   DG: floor(sigma^2/t) | Poisson: unused
    center: jax.Array  # float32: Poisson: floor(lam)
    log_lam: jax.Array  # float32: Poisson: log(2 pi lam)
    log_lam_plain: jax.Array  # float32: Poisson: log(lam)


def chacha_key(key: jax.Array) -> jax.Array:
    """The sampler's 256-bit ChaCha20 key: ``key`` itself if it is one (``uint32[8]``),
    else 256 bits drawn from the ``jax.random`` key ``key``."""
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == (8,) \
            and key.dtype == jnp.uint32:
        return key
    return jax.random.bits(key, (8,), jnp.uint32)


def _acceptance_threshold(exponent: jax.Array) -> jax.Array:
    """``uint32`` ``~floor(exp(-exponent) 2^32)`` (float32 ``exp``; at most ``2^32 - 256``)."""
    p = jnp.exp(-jnp.maximum(exponent, 0.0))
    return jnp.minimum(p * np.float32(2**32), _MAX_THRESHOLD).astype(jnp.uint32)


def _bernoulli_exp_neg(word: jax.Array, exponent: jax.Array) -> jax.Array:
    """``True`` with probability ``_acceptance_threshold(exponent) / 2^32``."""
    return word < _acceptance_threshold(exponent)


def _poisson_exponent(y: jax.Array, k: _Constants) -> jax.Array:
    """``-log`` of the Poisson acceptance probability of candidate ``y``.

    Acceptance ``p(n) e^{|y|/t} / M`` times Algorithm 2's ``e^{-U/t}``: the
    ``U / t`` terms cancel, leaving ``log M - V - log p(center + y)``.
    """
    v = (jnp.abs(y) // k.t).astype(jnp.float32)
    return k.a - v - _poisson_log_pmf(y, k)


def _laplace_candidates(words: jax.Array, k: _Constants):
    """Discrete Laplace proposals ``y = +-(U + t V)`` from ``words[3, ...]``.

    Returns ``(y, |y|, U, V, acceptance word, valid)``; ``valid`` is False for ``-0``.
    """
    u = (words[0] >> (np.uint32(32) - k.log2_t)).astype(jnp.int32)  # 0 when log2_t = 0
    negative = (words[0] & np.uint32(1)) == 1  # bit 0 is disjoint from U's top bits
    v = sum((words[1] < np.uint32(th)).astype(jnp.int32) for th in _GEOMETRIC_THRESHOLDS)
    magnitude = u + k.t * v
    y = jnp.where(negative, -magnitude, magnitude)
    return y, magnitude, u, v, words[2], ~(negative & (magnitude == 0))


def _dg_accept(words: jax.Array, k: _Constants) -> tuple[jax.Array, jax.Array]:
    y, magnitude, u, _, word, valid = _laplace_candidates(words, k)
    distance = (magnitude - k.c).astype(jnp.float32) - k.a
    exponent = u.astype(jnp.float32) / k.t.astype(jnp.float32) + distance * distance * k.b
    return y, valid & _bernoulli_exp_neg(word, exponent)


def _stirling_tail(k: jax.Array) -> jax.Array:
    """``lgamma(k + 1) - (k log k - k + log(2 pi k) / 2)`` for ``k >= 10`` (error < 1e-10)."""
    inv = 1.0 / k
    inv2 = inv * inv
    return inv * (1.0 / 12 - inv2 * (1.0 / 360 - inv2 / 1260))


def _g(u: jax.Array) -> jax.Array:
    """``(1 + u) log1p(u) - u`` without cancellation: its series for ``|u| < 1/4``."""
    # g(u) = sum_{n >= 2} (-u)^n / (n (n - 1)); 16 terms leave < 1e-11 relative at |u| = 1/4.
    series = jnp.zeros_like(u)
    for n in range(17, 1, -1):
        series = series * (-u) + np.float32(1.0 / (n * (n - 1)))
    series = series * u * u
    direct = (1 + u) * jnp.log1p(jnp.maximum(u, -1 + 1e-7)) - u
    return jnp.where(jnp.abs(u) < 0.25, series, direct)


def _poisson_log_pmf(y: jax.Array, k: _Constants) -> jax.Array:
    """float32 ``log P(Poisson(lam) = center + y)``; ``-inf`` where ``center + y < 0``.

    With ``n = lam (1 + u)``, ``log p(n) = -lam g(u) - log(2 pi n) / 2 - stirling(n)``:
    no term is of size ``lam``, so the absolute error stays ~1e-6 wherever
    ``p(n)`` is not negligible. Below ``n = 10`` the direct
    ``-lam + n log lam - lgamma(n + 1)`` is used (exact there: ``center + y``
    is then a small integer).
    """
    lam = k.b
    y = y.astype(jnp.float32)
    u = (y + (k.center - lam)) / lam
    n = lam * (1 + u)
    log1p_u = jnp.log1p(jnp.maximum(u, -1 + 1e-7))
    large = -lam * _g(u) - 0.5 * (k.log_lam + log1p_u) - _stirling_tail(jnp.maximum(n, 10.0))
    small_n = jnp.maximum(k.center + y, 0.0)
    small = -lam + small_n * k.log_lam_plain - lax.lgamma(small_n + 1)
    log_p = jnp.where(n < 9.5, small, large)
    return jnp.where(y >= -k.center, log_p, -jnp.inf)


def _poisson_accept(words: jax.Array, k: _Constants) -> tuple[jax.Array, jax.Array]:
    y, _, _, _, word, valid = _laplace_candidates(words, k)
    return y, valid & _bernoulli_exp_neg(word, _poisson_exponent(y, k))


def _first_accepted(values: jax.Array, accepted: jax.Array) -> tuple[jax.Array, jax.Array]:
    first = jnp.argmax(accepted, axis=0)
    value = jnp.take_along_axis(values, first[None], axis=0)[0]
    return value, jnp.any(accepted, axis=0)


def _merge(value, done, idx, words, accept, consts):
    size = value.shape[0]
    new, got = _first_accepted(*accept(words, consts))
    target = jnp.where(got & (idx < size), idx, size)
    return value.at[target].set(new, mode="drop"), done.at[target].set(True, mode="drop")


def _pending(done: jax.Array, buffer: int) -> jax.Array:
    """Indices of the first ``buffer`` unfinished coordinates (padded with ``size``)."""
    return jnp.nonzero(~done, size=buffer, fill_value=done.shape[0])[0]


def _buffers(size: int, fail: float) -> list[int]:
    """Static buffer sizes of stages 1.. for a per-candidate failure rate ``fail``."""
    buffers, remaining = [], fail ** _STAGE_CANDIDATES[0]
    for candidates in _STAGE_CANDIDATES[1:]:
        buffers.append(min(size, math.ceil(1.1 * remaining * size) + _LOOP_BUFFER))
        remaining *= fail**candidates
    return buffers


def _loop_rounds(size: int, fail: float) -> int:
    """Static cap on the final loop's rounds: room for ``2 m + 2048`` coordinates, twice over.

    ``m = size fail^15`` bounds the mean number of coordinates the stages leave
    (``fail`` is the bucket, >= the true failure rate per candidate). A round
    serves up to ``_LOOP_BUFFER`` of them with ``_LOOP_CANDIDATES`` candidates
    each (all fail with probability <= 0.8^64 < 2^-20), so a coordinate stays
    unsampled only if the stages leave more than ``32 R >= 2 m + 2048`` (Chernoff:
    probability < 2^-100 for every ``size``; the stage buffers hold 1.1x their
    expected load plus 64, and an overflow only defers coordinates to the loop)
    or if at least ``R / 2`` served slots fail (a round with fewer than 64
    coordinates pending and no failed slot ends the loop): probability at most
    ``(128 e 0.8^64)^(R/2) <= 2^-389``. The cap
    used to be a constant 64 rounds (4096 coordinates): at acceptance ~1/3 and
    ``size >= 2^21`` the stages leave more than that, and the rest came back as 0.
    """
    expected = size * fail ** sum(_STAGE_CANDIDATES)
    return _MIN_LOOP_ROUNDS + math.ceil(4 * expected / _LOOP_BUFFER)


@functools.partial(jax.jit, static_argnames=("size", "accept", "fail"))
def _rejection_sample(key, size: int, accept, consts: _Constants, fail: float):
    """``size`` samples (first accepted candidate each) and how many coordinates got none.

    The staged part draws all its words from one ChaCha20 stream of the key; the
    rarely run loop from another stream of it, one per round.
    """
    max_rounds = _loop_rounds(size, fail)
    key256 = chacha_key(key)
    sizes = [size, *_buffers(size, fail)]
    counts = [_WORDS_PER_CANDIDATE * k * m for k, m in zip(_STAGE_CANDIDATES, sizes, strict=True)]
    stream = stream_words(key256, 1, 0, (sum(counts),))
    offsets = np.cumsum([0, *counts])
    value, done = jnp.zeros(size, jnp.int32), jnp.zeros(size, bool)
    for stage, (candidates, buffer) in enumerate(zip(_STAGE_CANDIDATES, sizes, strict=True)):
        words = stream[offsets[stage] : offsets[stage + 1]].reshape(
            _WORDS_PER_CANDIDATE, candidates, buffer
        )
        idx = jnp.arange(size) if stage == 0 else _pending(done, buffer)
        value, done = _merge(value, done, idx, words, accept, consts)

    def unfinished(state):
        rounds, _, done = state
        return (rounds < max_rounds) & ~jnp.all(done)

    def another_round(state):
        rounds, value, done = state
        buffer = min(size, _LOOP_BUFFER)
        words = stream_words(key256, 2, rounds, (_WORDS_PER_CANDIDATE, _LOOP_CANDIDATES, buffer))
        value, done = _merge(value, done, _pending(done, buffer), words, accept, consts)
        return rounds + 1, value, done

    _, value, done = lax.while_loop(unfinished, another_round, (jnp.int32(0), value, done))
    return value, jnp.int32(size) - jnp.sum(done, dtype=jnp.int32)


def _check_scale(name: str, value: float, std: float) -> None:
    if isinstance(value, jax.core.Tracer) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"Expected {name}={value!r} to be a concrete finite number > 0.")
    if std > MAX_NOISE_STD:
        raise ValueError(
            f"Expected {name}={value!r} to give a standard deviation <= 2^19 = {MAX_NOISE_STD:g} "
            "(larger proposals would leave float32's exact integers); split the noise instead."
        )


def _log2_scale(std: float) -> int:
    """``log2 t`` of the Laplace proposal: the power of two nearest ``std`` (in log scale)."""
    return max(0, round(math.log2(std))) if std >= 1 else 0


def _fail_bucket(acceptance: float) -> float:
    fail = 1.0 - acceptance
    return next((b for b in _FAIL_BUCKETS if fail <= b), None) or _unsupported(acceptance)


def _unsupported(acceptance: float) -> float:
    raise ValueError(f"Expected an acceptance rate >= {1 - _FAIL_BUCKETS[-1]}, got {acceptance}.")


def _constants(log2_t: int, a=0.0, b=0.0, c=0, center=0.0, log_lam=0.0, log_lam_plain=0.0):
    return _Constants(np.uint32(log2_t), np.int32(1 << log2_t), np.float32(a), np.float32(b),
                      np.int32(c), np.float32(center), np.float32(log_lam),
                      np.float32(log_lam_plain))  # fmt: skip


def _shape(shape) -> tuple[int, ...]:
    return tuple(int(s) for s in shape) if isinstance(shape, tuple | list) else (int(shape),)


def _sample(key, shape, accept, consts: _Constants, acceptance: float):
    shape = _shape(shape)
    size = math.prod(shape)
    if size == 0:
        return jnp.zeros(shape, jnp.int32), jnp.int32(0)
    consts = _Constants(*(jnp.asarray(x) for x in consts))
    value, failed = _rejection_sample(key, size, accept, consts, _fail_bucket(acceptance))
    return value.reshape(shape), failed


def discrete_gaussian_constants(sigma: float) -> tuple[_Constants, float]:
    """Host-side constants of :func:`discrete_gaussian` and its acceptance rate per candidate."""
    log2_t = _log2_scale(sigma)
    t = 1 << log2_t
    center = sigma**2 / t
    half = int(40 * sigma) + 10
    ys = np.arange(-half, half + 1, dtype=np.float64)
    normalizer = float(np.sum(np.exp(-(ys**2) / (2 * sigma**2))))
    # P(candidate y accepted) = (1 - 1/e) / (2 t) * exp(-y^2/(2 sigma^2) - sigma^2/(2 t^2)).
    acceptance = (1 - math.exp(-1)) / (2 * t) * math.exp(-(sigma**2) / (2 * t * t)) * normalizer
    consts = _constants(log2_t, a=center - math.floor(center), b=1 / (2 * sigma**2),
                        c=math.floor(center))  # fmt: skip
    return consts, acceptance


def discrete_gaussian(
    key: jax.Array, shape: tuple[int, ...], sigma: float
) -> tuple[jax.Array, jax.Array]:
    """I.i.d. draws from the discrete Gaussian ``N_Z(0, sigma^2)``, ``P(y) ~ exp(-y^2/2sigma^2)``.

    ``sigma <= 2^10``: the exact alias table of :mod:`dpjax.secagg.alias`. Above:
    Algorithm 3 of Canonne, Kamath, Steinke 2020 with ``t = 2^round(log2 sigma)``
    (any ``t > 0`` is exact; this one makes ``U`` a slice of random bits):
    accept ``y`` with probability ``exp(-(|y| - sigma^2/t)^2 / (2 sigma^2))``.

    Args:
      key: the 256-bit ChaCha20 key (``uint32[8]``) of whoever adds the noise, private to
        them (or a ``jax.random`` key, for tests: 64 bits of entropy).
      shape: static output shape.
      sigma: Python float, ``0 < sigma <= 2^19`` (host value: it sets the
        proposal; one compilation serves every ``sigma`` of a shape).

    Returns:
      ``(int32 array of shape, number of coordinates left unsampled)``; see
      the module docstring for where float32 departs from exact sampling.
    """
    sigma = float(sigma)
    _check_scale("sigma", sigma, sigma)
    if sigma <= alias.ALIAS_MAX_STD:
        return alias.sample(chacha_key(key), _shape(shape), "dgauss", sigma), jnp.int32(0)
    consts, acceptance = discrete_gaussian_constants(sigma)
    return _sample(key, shape, _dg_accept, consts, acceptance)


def _poisson_log_envelope(lam: float, center: int, t: int) -> float:
    """``max_y log p(center + y) + |y| / t`` in float64 (concave on each side of 0)."""
    ks = {center}
    for k_star in (math.floor(lam * math.exp(1 / t)), math.ceil(lam * math.exp(-1 / t)) - 1):
        ks.update(range(max(0, k_star - 3), k_star + 4))
    ks = np.array(sorted(ks), dtype=np.float64)
    return float(np.max(stats.poisson.logpmf(ks, lam) + np.abs(ks - center) / t))


def poisson_constants(lam: float) -> tuple[_Constants, float]:
    """Host-side constants of the centred Poisson sampler and its acceptance rate."""
    log2_t = _log2_scale(math.sqrt(lam))
    t = 1 << log2_t
    center = math.floor(lam)
    log_m = _poisson_log_envelope(lam, center, t) + _POISSON_LOG_M_MARGIN
    # P(candidate accepted) = (1 - 1/e) / (2 t M) * P(Poisson within the proposal's reach).
    acceptance = (1 - math.exp(-1)) / (2 * t) * math.exp(-log_m)
    consts = _constants(
        log2_t,
        a=log_m,
        b=lam,
        center=center,
        log_lam=math.log(2 * math.pi * lam),
        log_lam_plain=math.log(lam),
    )
    return consts, acceptance


def poisson_inversion_table(lam: float) -> tuple[np.ndarray, np.ndarray]:
    """The CDF thresholds ``C_k = min(floor(2^64 P(X <= k)), 2^64 - 1)`` of ``Poisson(lam)``.

    For ``k < _INVERSION_TABLE`` (72), computed with 60-digit decimals (relative
    error < 10^-55), returned as ``(high words, low words)`` (``uint32`` each).
    Inverting a uniform 64-bit ``W``,
    ``#{k : W >= C_k}`` takes the value ``j`` with probability
    ``(C_j - C_{j-1}) / 2^64``: within ``2^-63`` of ``P(X = j)`` for each ``j``.
    """
    if not 0 < lam < POISSON_INVERSION_MAX_LAM:
        raise ValueError(f"Expected lam={lam!r} in (0, {POISSON_INVERSION_MAX_LAM:g}).")
    with decimal.localcontext(prec=60):
        lam_exact = decimal.Decimal(lam)  # the float's exact binary value
        term = (-lam_exact).exp()  # correctly rounded at 60 digits
        cdf, thresholds = decimal.Decimal(0), []
        for k in range(_INVERSION_TABLE):
            cdf += term
            thresholds.append(min(int(cdf * 2**64), 2**64 - 1))  # int() truncates: floor
            term = term * lam_exact / (k + 1)
    table = np.array(thresholds, dtype=np.uint64)
    return (table >> np.uint64(32)).astype(np.uint32), (table & np.uint64(2**32 - 1)).astype(
        np.uint32
    )


@functools.partial(jax.jit, static_argnames=("size",))
def _inversion_sample(key, size: int, high: jax.Array, low: jax.Array) -> jax.Array:
    """``#{k : W >= C_k}`` for ``size`` uniform 64-bit words ``W`` (two ChaCha20 words each)."""
    words = stream_words(chacha_key(key), 3, 0, (2, size))
    w_high, w_low = words[0], words[1]

    # One threshold at a time: a [size, 72] comparison is materialized on CPU (300 bytes a
    # coordinate, 10 GiB for 2^25 draws); the loop keeps one int32 count per coordinate.
    def add(k, count):
        at_least = (w_high > high[k]) | ((w_high == high[k]) & (w_low >= low[k]))
        return count + at_least.astype(jnp.int32)

    return jax.lax.fori_loop(0, high.shape[0], add, jnp.zeros(size, jnp.int32))


def _centered_poisson(key, shape, lam: float) -> tuple[jax.Array, jax.Array]:
    """``Poisson(lam) - floor(lam)`` (int32), and the count of unsampled coordinates."""
    if lam < POISSON_INVERSION_MAX_LAM:
        shape = _shape(shape)
        high, low = poisson_inversion_table(lam)
        value = _inversion_sample(key, math.prod(shape), jnp.asarray(high), jnp.asarray(low))
        return (value - np.int32(math.floor(lam))).reshape(shape), jnp.int32(0)
    consts, acceptance = poisson_constants(lam)
    return _sample(key, shape, _poisson_accept, consts, acceptance)


def poisson(key: jax.Array, shape: tuple[int, ...], lam: float) -> tuple[jax.Array, jax.Array]:
    """I.i.d. ``Poisson(lam)`` draws as int32 (``0 < lam <= 2^30``).

    ``lam < 16``: exact inversion of a 64-bit fixed-point CDF table (total
    variation from ``Poisson(lam)`` below ``2^-56`` per draw, never unsampled).
    ``lam >= 16``: rejection from a discrete Laplace proposal centred at
    ``floor(lam)`` with ``t ~ sqrt(lam)``; the envelope constant ``M`` is
    computed on the host in float64 (plus a 1e-3 margin); float32 error as in
    the module docstring. Returns ``(samples, number unsampled)``.
    """
    lam = float(lam)
    _check_scale("lam", lam, math.sqrt(lam))
    if lam > 2**30:
        raise ValueError(f"Expected lam={lam} <= 2^30 so that samples fit in int32.")
    value, failed = _centered_poisson(key, shape, lam)
    return value + np.int32(math.floor(lam)), failed


def skellam(key: jax.Array, shape: tuple[int, ...], mu: float) -> tuple[jax.Array, jax.Array]:
    """I.i.d. draws from the symmetric Skellam ``Sk(mu)``: ``P1 - P2``, ``P1, P2 ~ Poisson(mu/2)``.

    Variance ``mu``. ``mu <= 2^20``: the exact alias table of :mod:`dpjax.secagg.alias`
    (one draw, not two Poissons). Above: each Poisson comes from :func:`poisson`'s sampler (exact
    inversion for ``mu < 32``), centred (``P - floor(mu/2)``), so the
    difference is exact in int32 even when ``mu/2`` is huge. ``0 < mu <= 2^39``
    (each Poisson's standard deviation <= 2^19); one compilation per shape
    serves every ``mu >= 32``, another every ``mu < 32``.

    Returns:
      ``(int32 array of shape, number of coordinates left unsampled)``.
    """
    mu = float(mu)
    _check_scale("mu", mu, math.sqrt(mu / 2))
    shape = _shape(shape)
    if math.sqrt(mu) <= alias.ALIAS_MAX_STD:
        return alias.sample(chacha_key(key), shape, "skellam", mu), jnp.int32(0)
    pair, failed = _centered_poisson(key, (2, *shape), mu / 2)
    return pair[0] - pair[1], failed
