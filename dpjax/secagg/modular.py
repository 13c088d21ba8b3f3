"""Integers mod ``2^bits`` (8 <= bits <= 32) as ``uint32``, and SecAgg over ``Z_{2^bits}``.

``to_modular`` writes an int32 vector in two's complement mod ``2^bits``
(modular clipping: the party's value is only kept mod ``2^bits``);
``centered_lift`` reads a residue back into ``[-2^(bits-1), 2^(bits-1))``.
Because ``2^bits`` divides ``2^32``, reducing at any step commutes with the
``uint32`` sums: the ChaCha20 masks, uniform mod ``2^32``, are uniform mod
``2^bits`` too, a party sends only its masked residue mod ``2^bits``, and
the aggregator's unmasked total mod ``2^bits`` equals the survivors' sum of
``to_modular`` values mod ``2^bits``. The centered lift of that total is the
true integer sum whenever the latter lies in ``[-2^(bits-1), 2^(bits-1))``
(see :mod:`dpjax.secagg.wrap` for the probability that it does not).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import dpjax.secagg.protocol as protocol
from dpjax.secagg.aggregate import RoundMasks

MIN_BITS, MAX_BITS = 8, 32


def check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"Expected bits={bits!r} to be an integer in [{MIN_BITS}, {MAX_BITS}].")


def modulus_mask(bits: int) -> np.uint32:
    """``2^bits - 1`` as ``uint32``: ``x & mask`` is ``x mod 2^bits``."""
    check_bits(bits)
    return np.uint32((1 << bits) - 1)


def to_modular(values: jax.Array, bits: int) -> jax.Array:
    """int32 ``values`` mod ``2^bits`` as ``uint32`` (two's complement)."""
    words = lax.bitcast_convert_type(jnp.asarray(values, jnp.int32), jnp.uint32)
    return words & modulus_mask(bits)


def centered_lift(residues: jax.Array, bits: int) -> jax.Array:
    """The int32 in ``[-2^(bits-1), 2^(bits-1))`` congruent to ``residues`` mod ``2^bits``."""
    residues = jnp.asarray(residues, jnp.uint32) & modulus_mask(bits)
    if bits == 32:
        return lax.bitcast_convert_type(residues, jnp.int32)
    signed = residues.astype(jnp.int32)
    return jnp.where(signed >= (1 << (bits - 1)), signed + np.int32(-(1 << bits)), signed)


def mask_lane_bits(bits: int) -> int:
    """Bits of keystream per mask at modulus ``2^bits``: 8, 16 or 32 (the smallest of these
    ``>= bits``, so ``2^bits`` divides ``2^lane_bits``)."""
    check_bits(bits)
    return 8 if bits <= 8 else 16 if bits <= 16 else 32


def masked_input_mod(
    encoded: jax.Array, keys: jax.Array, nonces: jax.Array, weights: jax.Array, *, bits: int
) -> jax.Array:
    """Party, round 2: ``encoded + sum_j weights[j] PRG(keys[j], nonces[j])`` mod ``2^bits``,
    the PRG's output cut in lanes of :func:`mask_lane_bits` bits."""
    masked = protocol.masked_input(encoded, keys, nonces, weights, mask_lane_bits(bits))
    return masked & modulus_mask(bits)


def aggregate_masked_mod(
    masked_inputs: jax.Array,
    unmask_keys: jax.Array,
    unmask_nonces: jax.Array,
    unmask_weights: jax.Array,
    *,
    bits: int,
) -> jax.Array:
    """Aggregator: the arrived masked inputs summed, leftover masks removed, mod ``2^bits``.

    Its only inputs are the masked inputs (``uint32[n, D]``, zero rows for
    dropped parties) and the unmasking seeds of round 3: never a party's
    noise key, rounding key or unmasked input.
    """
    total = protocol.aggregate_masked(masked_inputs, unmask_keys, unmask_nonces,
                                      unmask_weights, mask_lane_bits(bits))  # fmt: skip
    return total & modulus_mask(bits)


def secure_sum_mod(encoded: jax.Array, *, bits: int, round_masks: RoundMasks) -> jax.Array:
    """SecAgg over ``Z_{2^bits}``: the survivors' sum of ``uint32 encoded[n, D]`` mod ``2^bits``.

    The integer sibling of :func:`dpjax.secagg.secure_sum`: each party masks
    its residues, the aggregator sums what arrived and unmasks. Jittable.
    """
    check_bits(bits)
    n = encoded.shape[0]
    if round_masks.party_keys.shape[0] != n:
        raise ValueError(
            f"Expected round_masks for {n} parties, got {round_masks.party_keys.shape[0]}."
        )
    masked = jax.vmap(lambda e, k, nn, w: masked_input_mod(e, k, nn, w, bits=bits))(
        encoded, round_masks.party_keys, round_masks.party_nonces, round_masks.party_weights
    )
    arrived = masked * round_masks.survivor_weights[:, None]
    return aggregate_masked_mod(arrived, round_masks.unmask_keys, round_masks.unmask_nonces,
                                round_masks.unmask_weights, bits=bits)  # fmt: skip
