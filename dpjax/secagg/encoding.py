"""Fixed-point encoding of floats into Z_2^32 and decoding of sums.

``encode`` maps ``x`` to ``round(x * scale)`` as a two's-complement ``uint32``;
sums of encodings are taken mod 2^32 (``uint32`` wrap-around) and ``decode``
reads the sum back as ``int32 / scale``. Decoding is exact as long as the true
integer sum lies in ``[-2^31, 2^31)``; :func:`check_no_wrap` refuses inputs for
which it might not, before anything is encoded.

Stochastic rounding (``key`` given) rounds ``x * scale`` up with probability
equal to its fractional part, so ``E[decode(encode(x))] = x`` up to float32
rounding of ``x * scale`` (relative 2^-24) and the 2^-24 resolution of the
uniform draw. Each coordinate of each party is then off by less than
``1 / scale``; the sum of ``n`` parties by less than ``n / scale``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import dpjax._validate as _validate

INT32_LIMIT = 2**31


def max_encoded_magnitude(max_abs: float, scale: float) -> float:
    """Largest ``|encode(x)|`` (as a signed integer) for ``|x| <= max_abs``.

    Computed in the arithmetic :func:`encode` uses: the clamp bound and the scale
    are float32, so ``max_abs`` may round *up* (1073741822.0 becomes 2^30), and
    the product ``x * scale`` is a float32 product, monotone in ``|x|``; its floor
    plus one bounds both rounding modes.
    """
    bound = np.float32(max_abs)
    product = np.float32(bound) * np.float32(scale)
    return float(np.floor(np.float64(product))) + 1.0


def check_no_wrap(max_abs: float, scale: float, num_parties: int,
                  limit: float = INT32_LIMIT) -> None:
    """Raises ``ValueError`` unless ``num_parties`` encoded values can never wrap.

    Bound used: ``num_parties * (floor(fl32(fl32(max_abs) * fl32(scale))) + 1) < limit``
    (``2^31`` for ``Z_2^32``, ``2^(bits-1)`` for ``Z_{2^bits}``),
    where the float32 rounding is that of :func:`encode`'s clamp and product (a
    bound computed in float64 can be passed by values the float32 clamp lets
    through).
    """
    _validate.non_negative("max_abs", max_abs)
    _validate.positive("scale", scale)
    _validate.positive_int("num_parties", num_parties)
    total = num_parties * max_encoded_magnitude(max_abs, scale)
    if not total < limit:
        raise ValueError(
            f"Expected num_parties * (floor(max_abs * scale) + 1) = {num_parties} * "
            f"(floor({max_abs} * {scale}) + 1) = {total:.10g} (in float32 arithmetic) "
            f"< 2^{np.log2(limit):g} = {limit:.10g}: the sum could wrap around the modulus. "
            "Lower scale or bound the inputs."
        )


def quantization_error_bound(num_parties: int, scale: float, *, stochastic: bool = True) -> float:
    """Per-coordinate bound on ``|decode(sum of encodings) - sum of inputs|``.

    ``num_parties / scale`` for stochastic rounding (each party errs by less
    than one unit), ``num_parties / (2 * scale)`` for round-to-nearest. The
    float32 arithmetic adds at most ``2^-23 * |sum|``; callers comparing
    against a float32 sum should allow that too.
    """
    _validate.positive_int("num_parties", num_parties)
    _validate.positive("scale", scale)
    return num_parties / scale if stochastic else num_parties / (2 * scale)


def _to_uint32(q: jax.Array) -> jax.Array:
    return lax.bitcast_convert_type(q.astype(jnp.int32), jnp.uint32)


def encode(
    x: jax.Array,
    scale: float,
    *,
    key: jax.Array | None = None,
    max_abs: float | None = None,
    num_parties: int = 1,
) -> jax.Array:
    """Fixed-point ``uint32`` encoding of the float array ``x``.

    Args:
      x: float array.
      scale: units per 1.0 (a power of two keeps ``decode`` exact).
      key: a ``jax.random`` key for unbiased stochastic rounding; ``None``
        rounds to nearest (biased by up to ``1 / (2 * scale)``).
      max_abs: public bound on ``|x|``. If given, it is checked with
        :func:`check_no_wrap` and ``x`` is clamped to ``[-max_abs, max_abs]``
        (inside ``jit`` values cannot be inspected, so clamping is what keeps
        a violated bound from wrapping the sum). If ``None``, ``x`` must be
        concrete and ``max(|x|)`` is checked instead.
      num_parties: how many such encodings will be summed (for the check).

    Returns:
      ``uint32`` array of ``x``'s shape.
    """
    x = jnp.asarray(x, jnp.float32)
    if max_abs is None:
        if isinstance(x, jax.core.Tracer):
            raise ValueError("Expected max_abs to be given when encode runs inside jit.")
        check_no_wrap(float(jnp.max(jnp.abs(x), initial=0.0)), scale, num_parties)
    else:
        check_no_wrap(max_abs, scale, num_parties)
        bound = jnp.float32(max_abs)  # the bound check_no_wrap checked, in the same dtype
        x = jnp.clip(x, -bound, bound)
    scaled = x * jnp.float32(scale)
    if key is None:
        return _to_uint32(jnp.round(scaled))
    low = jnp.floor(scaled)
    frac = scaled - low
    round_up = jax.random.uniform(key, x.shape, jnp.float32) < frac
    return _to_uint32(low) + round_up.astype(jnp.uint32)


def decode(encoded_sum: jax.Array, scale: float) -> jax.Array:
    """``int32(encoded_sum) / scale`` as float32 (two's-complement reading of Z_2^32)."""
    signed = lax.bitcast_convert_type(jnp.asarray(encoded_sum, jnp.uint32), jnp.int32)
    return signed.astype(jnp.float32) / jnp.float32(scale)
