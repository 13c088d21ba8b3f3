"""Skellam and discrete Gaussian noise from an exact 64-bit alias table (moderate scales).

For a standard deviation up to ``ALIAS_MAX_STD`` (2^10) the whole distribution
fits a table, and one uniform 64-bit word per draw gives a value in constant
time with two gathers (Walker's alias method, built in exact integers):

1. the values ``v_0 < ... < v_{n-1}``: a centred window that leaves out less
   than ``2^-81`` of the mass on each side (a Chernoff bound, :func:`half_width`),
   minus the end values whose mass rounds to 0 in 80-bit fixed point (after which
   at most ~2^-73 per side is left out: 2^-73.3 at ``mu = 2^20``);
2. each value's probability in 64-bit fixed point, ``A_j = C_j - C_{j-1}`` with
   ``C_j = floor(2^64 S_j / S)``, ``S_j`` the partial sums of ``floor(p_j 2^80)``
   and ``S`` their total (Python integers, exact), so ``sum A_j = 2^64``;
   ``p_j`` in float64: ``scipy.special.ive`` for Skellam (``e^{-mu} I_k(mu)``),
   ``exp(-v^2 / (2 sigma^2))`` for the discrete Gaussian;
3. Vose's alias construction in integers over ``2^D >= n`` slots of
   ``2^(64-D)`` units each: slot ``i`` keeps ``thr_i`` units for ``v_i`` and
   gives the rest to ``v_alias(i)``.

A draw splits a uniform 64-bit ``W`` (two ChaCha20 words) into the slot (its
top ``D`` bits) and a remainder ``R`` (the other ``64 - D``), and returns
``v_i`` if ``R < thr_i`` else ``v_alias(i)``. Each value then has probability
exactly ``A_j / 2^64``, within ``2^-64`` of ``S_j / S``: the total variation
from the exact law is at most the window's tails (``2^-80``), ``n 2^-80`` of
fixed point, ``n 2^-64``, and the float64 pmf's own error, which grows with
Skellam's ``mu`` (against mpmath: per draw 2^-48.6 at ``mu = 2000`` (tested),
2^-46.5 at 2e5 and 2^-45.4 at the table's limit ``2^20``; discrete Gaussian at
most 2^-51.4, at ``sigma = 2^10``; the rejection samplers of
:mod:`dpjax.secagg.discrete` are within ``~2^-20`` per acceptance). This
distance is stated, not added to delta: a coupling adds at most ``n d T`` times
it (``1.4e-5`` at ``d = 2^16``, ``n = 10``, ``T = 1000`` near the limit). The
accountant's no-factor-3 subsampling lemma assumes the ideal symmetric noise;
the table's is symmetric up to 1 unit of ``2^-64`` at two values and is
covered only through this distance. Every draw
costs the same: no loop, nothing data- or word-dependent, no coordinate left
unsampled, and it vectorizes under ``vmap`` (the step audit). From ``LAZY_MIN_SIZE``
draws the second word is generated only where the first ties its threshold (a few
draws per million, :func:`_draw`): the same draws, ~5 ms less per 2^20 draws; the time
then depends on the words only if more 16-draw blocks tie than the static capacity
allows (probability below 2^-64).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from scipy import special

from dpjax.secagg.chacha import chacha20_block, stream_nonce, stream_words

# Skellam's float64 pmf (scipy's ive) is checked against mpmath up to mu = 2e5 (std 447):
# relative error <= 1e-13 out to 10 standard deviations.
ALIAS_MAX_STD = 2.0**10
_TAIL_LOG = -81 * math.log(2)  # each tail left out of the window: < 2^-81
_FIXED_BITS = 80
_NOISE_STREAM = 5  # ChaCha20 stream (nonce word 0) of the alias sampler's words
LAZY_MIN_SIZE = 2**18  # from this many draws, second words only where the first ties


def _skellam_log_tail(mu: float, k: int) -> float:
    """Chernoff: ``log P(Sk(mu) >= k) <= mu (cosh t - 1) - t k`` at ``t = asinh(k / mu)``."""
    r = k / mu
    return mu * (math.sqrt(1 + r * r) - 1) - k * math.asinh(r)


def half_width(noise: str, scale: float) -> int:
    """The window ``|v| <= half_width`` outside which each tail has mass ``< 2^-81``.

    Skellam (``scale = mu``): the Chernoff bound above (``E e^{tX} =
    exp(mu (cosh t - 1))``). Discrete Gaussian (``scale = sigma``):
    ``P(X >= k) <= exp(-k^2 / (2 sigma^2))`` (the discrete Gaussian is
    sub-Gaussian with variance proxy ``sigma^2``: Canonne, Kamath, Steinke 2020).
    """
    if noise == "dgauss":
        return math.ceil(scale * math.sqrt(-2 * _TAIL_LOG)) + 1
    k = math.ceil(10 * math.sqrt(scale)) + 1
    while _skellam_log_tail(scale, k) > _TAIL_LOG:
        k += max(1, k // 16)
    return k


def _pmf(noise: str, scale: float, values: np.ndarray) -> np.ndarray:
    if noise == "skellam":  # e^{-mu} I_k(mu): the pmf of Sk(mu) (I_{-k} = I_k)
        return special.ive(np.abs(values).astype(np.float64), scale)
    return np.exp(-(values.astype(np.float64) ** 2) / (2 * scale * scale))


def _check(noise: str, scale: float) -> None:
    if noise not in ("skellam", "dgauss"):
        raise ValueError(f"Expected noise={noise!r} to be 'skellam' or 'dgauss'.")
    std = math.sqrt(scale) if noise == "skellam" else scale
    if not (math.isfinite(scale) and scale > 0 and std <= ALIAS_MAX_STD):
        raise ValueError(f"Expected a {noise} scale={scale!r} > 0 with standard deviation <= "
                         f"{ALIAS_MAX_STD:g} for the alias table.")


@functools.lru_cache(maxsize=32)
def table_pmf(noise: str, scale: float) -> tuple[int, tuple[int, ...]]:
    """``(lowest value, [A_0, ..., A_{n-1}])``: the exact probabilities, in units of
    ``2^-64`` (they sum to ``2^64``), of the values ``lowest .. lowest + n - 1``."""
    _check(noise, scale)
    w = half_width(noise, scale)
    fixed = [int(x) for x in np.floor(np.ldexp(_pmf(noise, scale, np.arange(-w, w + 1)),
                                               _FIXED_BITS))]
    # values of mass < 2^-80 at the ends are left out with the tails
    first = next(i for i, a in enumerate(fixed) if a)
    last = len(fixed) - next(i for i, a in enumerate(reversed(fixed)) if a)
    fixed = fixed[first:last]
    total, running, previous, units = sum(fixed), 0, 0, []
    for a in fixed:
        running += a
        threshold = (running << 64) // total  # the last one is exactly 2^64
        units.append(threshold - previous)
        previous = threshold
    return first - w, tuple(units)  # cached: immutable


@functools.lru_cache(maxsize=32)
def alias_table(noise: str, scale: float) -> tuple[np.ndarray, np.ndarray, int]:
    """``(packed, thr_low, lowest)``: the alias table of :func:`table_pmf` over ``2^D`` slots.

    ``packed[i] = (thr_i >> 32) << D | alias(i)`` and ``thr_low[i] = thr_i mod 2^32``
    (``uint32``), ``thr_i < 2^(64-D)`` the units slot ``i`` keeps for ``v_i``.
    """
    lowest, units = table_pmf(noise, scale)
    depth = max(1, (len(units) - 1).bit_length())
    slots, cap = 1 << depth, 1 << (64 - depth)
    mass = [*units, *[0] * (slots - len(units))]
    thr, alias = [cap] * slots, list(range(slots))
    small = [i for i, a in enumerate(mass) if a < cap]
    large = [i for i, a in enumerate(mass) if a >= cap]
    while small and large:
        s, g = small.pop(), large.pop()
        thr[s], alias[s] = mass[s], g
        mass[g] -= cap - mass[s]
        (small if mass[g] < cap else large).append(g)
    # exact units: whatever is left holds exactly cap and keeps itself (alias(i) = i, set
    # above); thr = cap does not fit 64 - D bits, and with alias(i) = i, 0 means the same
    if any(mass[i] != cap for i in small + large):
        raise AssertionError("alias construction lost units")  # impossible: totals are 2^64
    thr = [0 if t == cap else t for t in thr]
    packed = np.array([((t >> 32) << depth) | a for t, a in zip(thr, alias, strict=True)],
                      dtype=np.uint32)
    thr_low = np.array([t & 0xFFFFFFFF for t in thr], dtype=np.uint32)
    packed.setflags(write=False)  # cached: a caller must not corrupt the process's table
    thr_low.setflags(write=False)
    return packed, thr_low, lowest


def _split(words_high, packed, thr_low):
    """Per draw: the slot, its alias, the first word's verdict and whether it is a tie."""
    depth = packed.shape[0].bit_length() - 1  # static
    slot = (words_high >> (32 - depth)).astype(jnp.int32)
    entry, t_low = packed[slot], thr_low[slot]
    t_high, alias = entry >> depth, (entry & ((1 << depth) - 1)).astype(jnp.int32)
    r_high = words_high & jnp.uint32((1 << (32 - depth)) - 1)
    return slot, alias, t_low, r_high < t_high, r_high == t_high


def _resolve(words_high, words_low, packed, thr_low):
    slot, alias, t_low, below, tie = _split(words_high, packed, thr_low)
    return jnp.where(below | (tie & (words_low < t_low)), slot, alias)


def tie_capacity(size: int, depth: int) -> int:
    """Static number of 16-draw blocks whose second words :func:`_draw` computes one by one:
    more than this many blocks with a tie (probability below 2^-64, Chernoff) and it
    generates the whole second stream instead (same words, same draws)."""
    blocks = -(-size // 16)
    mean = blocks * min(1.0, 16 * 2.0 ** (depth - 32))  # P(a block has a tie) <= 16 / 2^(32-D)
    cap = max(1, math.ceil(mean))
    # Chernoff: P(X > cap) <= exp(-mean) (e mean / cap)^cap for cap > mean
    while cap < blocks and -mean + cap * (1 + math.log(mean / cap)) > -64 * math.log(2):
        cap += 1
    return min(cap, blocks)


@functools.partial(jax.jit, static_argnames=("size", "capacity"))
def _draw(key256, size: int, packed, thr_low, lowest, capacity: int | None = None):
    """``size`` alias draws from the 64-bit words ``(W_high[i], W_low[i])`` = words ``i`` and
    ``size + i`` of the sampler's ChaCha20 stream.

    The second word only decides a draw whose first word ties its slot's threshold
    (probability ``2^(D-32)`` per draw: a few per million at depth 14), so the second
    stream is generated only for the 16-draw blocks that hold a tie (``capacity`` of
    them, :func:`tie_capacity`), each from the ChaCha20 blocks at its own counters; with
    more tied blocks than that the whole second stream is generated. Both give exactly
    the draws of the whole two-word stream (tested), in the same time whatever the words
    (the fallback aside, which a tie count above the capacity, probability < 2^-64, takes).
    Below ``LAZY_MIN_SIZE`` draws (and no ``capacity`` given) both streams are generated:
    the saving (~5 ms per 2^20 draws on a 2-core CPU) would not pay for the longer
    compilation (~1.5 s).
    """
    depth = packed.shape[0].bit_length() - 1  # static
    if capacity is None and size < LAZY_MIN_SIZE:
        words = stream_words(key256, _NOISE_STREAM, 0, (2, size))
        return _resolve(words[0], words[1], packed, thr_low) + lowest
    capacity = tie_capacity(size, depth) if capacity is None else capacity
    high = stream_words(key256, _NOISE_STREAM, 0, (size,))  # the first row of (2, size)
    slot, alias, _, below, tie = _split(high, packed, thr_low)
    blocks = -(-size // 16)
    flags = jnp.any(jnp.pad(tie, (0, blocks * 16 - size)).reshape(blocks, 16), axis=1)
    chosen = jnp.nonzero(flags, size=capacity, fill_value=blocks)[0]
    # second words of draws 16 b .. 16 b + 15: stream words size + 16 b + j, which lie in
    # ChaCha20 blocks (size + 16 b) // 16 and the next (size % 16 is their offset)
    first = (jnp.uint32(size // 16) + chosen.astype(jnp.uint32))[:, None]
    words = chacha20_block(key256, first + jnp.arange(2, dtype=jnp.uint32),
                           stream_nonce(_NOISE_STREAM, 0))
    offset = size % 16
    low = words.reshape(capacity, 32)[:, offset:offset + 16]
    draws = (chosen[:, None] * 16 + jnp.arange(16)).reshape(-1)
    in_range = jnp.minimum(draws, size - 1)
    fixed = _resolve(high[in_range], low.reshape(-1), packed, thr_low)
    lazy = jnp.where(below, slot, alias).at[draws].set(fixed, mode="drop")

    def whole():
        words2 = stream_words(key256, _NOISE_STREAM, 0, (2, size))
        return _resolve(words2[0], words2[1], packed, thr_low)

    value = lax.cond(jnp.sum(flags) > capacity, whole, lambda: lazy)
    return value + lowest


def sample(key256: jax.Array, shape: tuple[int, ...], noise: str, scale: float) -> jax.Array:
    """``shape`` i.i.d. draws (int32) of ``Sk(scale)`` or ``N_Z(0, scale^2)``.

    ``key256``: the 256-bit ChaCha20 key (``uint32[8]``) of whoever adds the noise.
    One compilation per (shape, table depth).
    """
    packed, thr_low, lowest = alias_table(noise, float(scale))
    size = math.prod(shape)
    if size == 0:
        return jnp.zeros(shape, jnp.int32)
    return _draw(key256, size, jnp.asarray(packed), jnp.asarray(thr_low),
                 jnp.int32(lowest)).reshape(shape)


__all__ = ["ALIAS_MAX_STD", "alias_table", "half_width", "sample", "table_pmf"]
