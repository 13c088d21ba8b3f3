"""Per-example squared gradient norms and clipped sums from a layer's normal form.

For ``g_i[n] = A_i[n]^T G_i[n]`` (:mod:`~dpjax.fast_clipping.layouts`) with ``T``
positions, ``K`` inputs and ``F`` outputs per group:

* ``T == 1`` ("outer"): ``||g_i||^2 = sum_n ||a_i[n]||^2 ||G_i[n]||^2``;
* ``2 T^2 < K F`` ("ghost"): ``sum_n <A_i A_i^T, G_i G_i^T>``, plus the rounding
  bound below where it matters;
* otherwise ("direct"): the per-example gradients themselves, ``[B, N, K, F]``.

The clipped sum ``sum_i f_i g_i`` is book-keeping, ``A^T diag(f) G`` (or the
weighted sum of the direct gradients). Rows whose norm is not finite get
``f_i = 0`` and are removed with ``where`` before the products, never by
multiplying (``0 * NaN`` is ``NaN``).

Rounding bound of the ghost norm
--------------------------------
The Gram form cancels: ``<AA^T, GG^T>`` adds ``T^2`` products whose size is
about ``P = (sum_t ||a_t|| ||g_t||)^2`` to get ``||A^T G||_F^2``, which can be far
smaller, so float rounding can report a norm near 0 for a large gradient.
With ``u`` the unit roundoff (``2^-24`` in float32) and ``gamma_m = m u / (1 - m u)``
(Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., Lemma 3.1
and eq. (3.4)-(3.5) for inner products), for any summation order

    |fl(<AA^T, GG^T>) - ||A^T G||_F^2|  <=  c * P,
    c = (1 + gamma_K)(1 + gamma_F)(1 + gamma_{N T^2}) - 1,

because every Gram entry is within ``gamma_K |a_t|.|a_s| <= gamma_K ||a_t|| ||a_s||``
of its exact value (Cauchy-Schwarz), likewise for ``G``, and the final sum of
``N T^2`` products adds ``gamma_{N T^2}`` times their absolute sum. ``P`` is itself
computed with relative error at most ``gamma_{K+F+T+4} <= 1/2``, so the bound
used is ``eps = c (1 + 2 gamma_{K+F+T+4}) fl(P)``. The reported squared norm is

    fl(ghost)               if eps <= 2 RHO fl(ghost)   (then it is >= (1 - RHO)^2 * exact)
    max(fl(ghost), 0) + eps otherwise                     (>= exact: over-clipping is safe)

so a row's reported norm is never below ``(1 - RHO)`` times its exact norm,
``RHO = 1e-4``. Embedding ghost norms (``[id_t = id_s] <g_t, g_s>``) use the same
bound with exact 0/1 Gram entries for the ids. The outer and direct forms add
only non-negative terms (relative error ``gamma`` of a sum of squares, as on the
vmap path) and are used as computed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from dpjax.clip_math import zero_bad_rows

RHO = 1e-4
# The rounding bound assumes products and sums in the compute dtype: no reduced-precision
# passes (TF32, bf16x3), which some accelerators use for float32 matrix products by default.
_EXACT = jax.lax.Precision.HIGHEST
MAX_GHOST_TERMS = 2**24  # [T, T] products per group kept per example: 64 MiB of float32
Weigher = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Terms:
    """Squared norms [B], the branch taken, and ``weighted_sum(factor, row_ok)``."""

    sq: jax.Array
    branch: str
    weighted_sum: Weigher


def use_ghost(positions: int, d_in: int, d_out: int) -> bool:
    """The ghost norm when its [T, T] Gram matrices are smaller than a per-example gradient."""
    return 2 * positions * positions < d_in * d_out


def branch(positions: int, d_in: int, d_out: int) -> str:
    """"outer" (one position), "ghost" or "direct" (see the module docstring)."""
    if positions == 1:
        return "outer"
    if use_ghost(positions, d_in, d_out) and positions * positions < MAX_GHOST_TERMS:
        return "ghost"
    return "direct"


def unit_roundoff(dtype) -> float:
    return float(jnp.finfo(dtype).eps) / 2


def gamma(m: int, u: float) -> float:
    if m * u >= 0.5:
        raise ValueError(f"Expected a sum of m={m} terms with m * u < 1/2 (u={u}).")
    return m * u / (1 - m * u)


def tree_depth(terms: int) -> int:
    """Additions on any path of :func:`pairwise_sum` of ``terms`` values, plus the product."""
    return max(terms - 1, 0).bit_length() + 1


def pairwise_sum(x: jax.Array) -> jax.Array:
    """Sum over the last axis as a balanced tree (XLA never reassociates float additions).

    Every term passes through at most ``ceil(log2 n)`` roundings instead of
    ``n - 1`` for a sequential sum: Higham (2002), section 4.2, eq. (4.6).
    """
    n = x.shape[-1]
    width = 1 << max(n - 1, 0).bit_length()
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - n)])
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        x = x[..., :half] + x[..., half:]
    return x[..., 0]


def ghost_slack(k: int, f: int, terms: int, t: int, u: float) -> float:
    """``c (1 + 2 gamma_{K+F+T+4})``: the ghost bound is this times ``fl(P)``.

    ``c = (1 + gamma_K)(1 + gamma_F)(1 + gamma_h) - 1`` with ``h`` the depth of
    the pairwise sum of the ``terms`` Gram products (product rounding included).
    """
    c = (1 + gamma(k, u)) * (1 + gamma(f, u)) * (1 + gamma(tree_depth(terms), u)) - 1
    return c * (1 + 2 * gamma(k + f + t + 4, u))


def certified(ghost: jax.Array, bound: jax.Array) -> jax.Array:
    """The ghost value where its bound is negligible, else the value plus the bound."""
    return jnp.where(bound <= 2 * RHO * ghost, ghost, jnp.maximum(ghost, 0) + bound)


def _diagonal_norms(gram: jax.Array) -> jax.Array:
    """``||x_t||`` from the diagonal of a Gram matrix ``[..., T, T]``: no second pass over ``x``.

    Each diagonal entry is a float sum of ``K`` squares, with the same relative
    error ``gamma_K`` as summing the squares on their own, which is all the bound
    on ``P`` assumes.
    """
    return jnp.sqrt(jnp.diagonal(gram, axis1=-2, axis2=-1))


def _compute_dtype(dtype):
    return jnp.promote_types(dtype, jnp.float32)


def _row_factor(f: jax.Array, ndim: int, dtype) -> jax.Array:
    return f.astype(dtype).reshape((-1,) + (1,) * (ndim - 1))


def linear_terms(a: jax.Array, g: jax.Array) -> Terms:
    """Terms of ``g_i[n] = A_i[n]^T G_i[n]``, ``A [B, N, T, K]``, ``G [B, N, T, F]``."""
    b, n, t, k = a.shape
    f = g.shape[-1]
    cd = _compute_dtype(a.dtype)
    a32, g32 = a.astype(cd), g.astype(cd)
    per_example = None
    how = branch(t, k, f)
    if how == "outer":  # contractions, not sum(a * a): no squared copy of A or G
        sq = jnp.einsum("bn,bn->b", jnp.einsum("bntk,bntk->bn", a32, a32),
                        jnp.einsum("bntf,bntf->bn", g32, g32))
    elif how == "ghost":
        gram_a = jnp.einsum("bntk,bnsk->bnts", a32, a32, precision=_EXACT)
        gram_g = jnp.einsum("bntf,bnsf->bnts", g32, g32, precision=_EXACT)
        ghost = pairwise_sum((gram_a * gram_g).reshape(b, -1))
        p = jnp.sum(jnp.square(jnp.sum(_diagonal_norms(gram_a) * _diagonal_norms(gram_g),
                                       axis=2)), axis=1)
        slack = ghost_slack(k, f, n * t * t, t, unit_roundoff(cd))
        sq = certified(ghost, slack * p)
    else:
        per_example = jnp.einsum("bntk,bntf->bnkf", a, g)
        sq = row_sq_norms(per_example)

    def weighted_sum(factor, row_ok):
        if per_example is not None:
            return weighted_rows(per_example, factor, row_ok)
        az = zero_bad_rows(a, row_ok)
        gz = jnp.where(_row_factor(row_ok, 4, bool), g * _row_factor(factor, 4, g.dtype), 0)
        if n == 1:  # [B*T, K]^T [B*T, F]: a free reshape, no transposed copy of A or G
            return jnp.einsum("xk,xf->kf", az.reshape(b * t, k), gz.reshape(b * t, f))[None]
        return jnp.einsum("bntk,bntf->nkf", az, gz)

    return Terms(sq, how, weighted_sum)


def embed_terms(ids: jax.Array, valid: jax.Array, g: jax.Array, vocab: int) -> Terms:
    """Terms of ``g_i = sum_t onehot(id_t) G_i[t]^T`` (rows with ``valid=False`` add nothing)."""
    b, t, d = g.shape
    cd = _compute_dtype(g.dtype)
    g32 = jnp.where(valid[..., None], g.astype(cd), 0)
    per_example = None
    how = branch(t, vocab, d)
    if how == "outer":
        sq = jnp.einsum("btd,btd->b", g32, g32)
    elif how == "ghost":
        same = (ids[:, :, None] == ids[:, None, :]).astype(cd)
        gram = jnp.einsum("btd,bsd->bts", g32, g32, precision=_EXACT)
        ghost = pairwise_sum((same * gram).reshape(b, -1))
        norms = _diagonal_norms(gram)
        p = jnp.einsum("bts,bt,bs->b", same, norms, norms)
        u = unit_roundoff(cd)
        slack = ((1 + gamma(d, u)) * (1 + gamma(tree_depth(t * t), u)) - 1)
        slack *= 1 + 2 * gamma(d + t + 4, u)
        sq = certified(ghost, slack * p)
    else:
        rows = jnp.broadcast_to(jnp.arange(b)[:, None], ids.shape)
        gv = jnp.where(valid[..., None], g, 0)
        per_example = jnp.zeros((b, vocab, d), g.dtype).at[rows, ids].add(gv)
        sq = row_sq_norms(per_example)

    def weighted_sum(factor, row_ok):
        if per_example is not None:
            return weighted_rows(per_example, factor, row_ok)
        keep = valid & row_ok[:, None]
        weighted = jnp.where(keep[..., None], g * _row_factor(factor, 3, g.dtype), 0)
        return jnp.zeros((vocab, d), g.dtype).at[ids.reshape(-1)].add(weighted.reshape(-1, d))

    return Terms(sq, how, weighted_sum)


def row_sq_norms(per_example: jax.Array) -> jax.Array:
    """``[B]`` squared L2 norms of the rows of ``per_example`` (a contraction: no squared copy)."""
    flat = per_example.reshape(per_example.shape[0], -1).astype(_compute_dtype(per_example.dtype))
    return jnp.einsum("bk,bk->b", flat, flat)


def weighted_rows(per_example: jax.Array, factor: jax.Array, row_ok: jax.Array) -> jax.Array:
    """``sum_i factor_i * per_example_i`` over the finite rows, as one fused reduction.

    The same value as :func:`dpjax.clip_math.weigh_rows`, without a zeroed copy
    of ``per_example`` (``where`` fuses into the sum; a matrix product would not).
    """
    keep = _row_factor(row_ok, per_example.ndim, bool)
    weighted = per_example * _row_factor(factor, per_example.ndim, per_example.dtype)
    return jnp.sum(jnp.where(keep, weighted, 0), axis=0)
