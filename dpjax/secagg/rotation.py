"""Random orthogonal rotations shared by all parties of a round (flattening before rounding).

``rotate(x, key)`` pads ``x`` to the rotation's dimension ``D`` and returns
``R S x`` where ``S`` is a diagonal of random signs drawn from the round's
public ``key`` and ``R`` is orthogonal:

- ``"hadamard"``: the normalized Walsh-Hadamard matrix (``D`` a power of
  two), computed by the fast transform in ``log2 D`` butterfly passes;
- ``"dft"``: the orthonormal real DFT (``D`` even): real and imaginary parts
  of the half spectrum, scaled so that the map is orthogonal (Kairouz, Liu,
  Steinke 2021 use either).

Every party of a round uses the same key, so the rotated vectors still add
up: ``sum_u R S x_u = R S sum_u x_u``; a fresh key per round keeps the
rotation independent of the data. ``unrotate`` is the inverse.

Flatness: every entry of ``R`` has ``R_ij^2 <= flatness / D`` (1 for
Hadamard, 2 for the DFT), so each rotated coordinate of a fixed vector ``y``
is a Rademacher sum with variance proxy ``flatness ||y||^2 / D``.
"""

from __future__ import annotations

import enum
import math

import jax
import jax.numpy as jnp
import numpy as np

import dpjax._validate as _validate

FLOAT32_EPS = 2.0**-24


class Rotation(enum.StrEnum):
    """Which orthogonal matrix follows the random signs."""

    HADAMARD = "hadamard"
    DFT = "dft"


def padded_dim(dim: int, rotation: Rotation | str = Rotation.HADAMARD) -> int:
    """``D``: the next power of two (Hadamard) or even number (DFT) ``>= dim``."""
    _validate.positive_int("dim", dim)
    if Rotation(rotation) is Rotation.HADAMARD:
        return 1 << (dim - 1).bit_length()
    return dim + (dim % 2)


def flatness(rotation: Rotation | str) -> float:
    """``D * max_ij R_ij^2``: 1 for Hadamard, 2 for the real DFT."""
    return 1.0 if Rotation(rotation) is Rotation.HADAMARD else 2.0


def float_error_bound(dim: int, rotation: Rotation | str = Rotation.HADAMARD) -> float:
    """Bound on ``||rotate_float32(x) - R S x|| / ||x||``.

    Hadamard: each of the ``L = log2 D`` butterfly passes adds a relative
    error of at most one float32 rounding (``2^-24``) of its orthogonal
    (up to scale) output, and the final scaling one more: ``(L + 3) 2^-24``
    (one spare). DFT: Higham's bound for Cooley-Tukey FFTs with accurate
    twiddles, ``~5 L u``; it assumes the backend's FFT is of that kind.
    """
    levels = max(1, math.ceil(math.log2(padded_dim(dim, rotation))))
    factor = levels + 3 if Rotation(rotation) is Rotation.HADAMARD else 5 * (levels + 3)
    return factor * FLOAT32_EPS


def rotation_key(seed: int, round_index: int) -> jax.Array:
    """A public per-round key: ``seed`` and the 64-bit ``round_index`` folded into one key."""
    if not 0 <= round_index < 2**64:
        raise ValueError(f"Expected round_index={round_index} in [0, 2^64).")
    key = jax.random.fold_in(jax.random.key(seed), round_index & 0xFFFFFFFF)
    return jax.random.fold_in(key, round_index >> 32)


def random_signs(key: jax.Array, size: int) -> jax.Array:
    """``float32[size]`` of independent uniform signs."""
    return jax.random.rademacher(key, (size,), jnp.float32)


def _fwht(x: jax.Array) -> jax.Array:
    """Unnormalized Walsh-Hadamard transform of ``x[D]`` (``D`` a power of two)."""
    size = x.shape[0]
    half = 1
    while half < size:
        pairs = x.reshape(-1, 2, half)
        a, b = pairs[:, 0], pairs[:, 1]
        x = jnp.stack([a + b, a - b], axis=1).reshape(size)
        half *= 2
    return x


def _hadamard(x: jax.Array) -> jax.Array:
    return _fwht(x) * np.float32(1 / math.sqrt(x.shape[0]))


def _real_dft(x: jax.Array) -> jax.Array:
    """Orthonormal real DFT: ``[X_0, X_{D/2}, sqrt2 Re X_1.., sqrt2 Im X_1..]``."""
    spectrum = jnp.fft.rfft(x, norm="ortho")
    inner = spectrum[1:-1] * np.float32(math.sqrt(2))
    return jnp.concatenate([spectrum[:1].real, spectrum[-1:].real, inner.real, inner.imag])


def _real_dft_inverse(y: jax.Array) -> jax.Array:
    size = y.shape[0]
    half = size // 2
    inner = (y[2 : half + 1] + 1j * y[half + 1 :]) * np.float32(1 / math.sqrt(2))
    spectrum = jnp.concatenate([y[:1], inner, y[1:2]]).astype(jnp.complex64)
    return jnp.fft.irfft(spectrum, n=size, norm="ortho")


def rotate(x: jax.Array, key: jax.Array, rotation: Rotation | str = Rotation.HADAMARD) -> jax.Array:
    """``R S pad(x)`` as float32 of length ``padded_dim(len(x))``; orthogonal, so norms are kept."""
    x = jnp.asarray(x, jnp.float32)
    size = padded_dim(x.shape[0], rotation)
    padded = jnp.pad(x, (0, size - x.shape[0])) * random_signs(key, size)
    return _hadamard(padded) if Rotation(rotation) is Rotation.HADAMARD else _real_dft(padded)


def unrotate(
    y: jax.Array, key: jax.Array, dim: int, rotation: Rotation | str = Rotation.HADAMARD
) -> jax.Array:
    """Inverse of :func:`rotate`: ``(S R^T y)[:dim]`` as float32."""
    y = jnp.asarray(y, jnp.float32)
    size = y.shape[0]
    if size != padded_dim(dim, rotation):
        raise ValueError(f"Expected len(y)={size} == padded_dim({dim}) for {rotation}.")
    back = _hadamard(y) if Rotation(rotation) is Rotation.HADAMARD else _real_dft_inverse(y)
    return (back * random_signs(key, size))[:dim]
