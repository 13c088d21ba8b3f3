"""Where a parameter meets the batch: the per-example gradient in a normal form.

For a ``dot_general`` or ``conv_general_dilated`` whose one operand ``P`` is a
parameter and whose other operand ``X`` holds the batch, example ``i``'s
gradient of ``P`` is, after one fixed permutation of ``P``'s entries,

    g_i[n] = A_i[n]^T G_i[n]      A [B, N, T, K],  G [B, N, T, F]

with ``N`` groups (dot batch dimensions, convolution feature groups), ``T``
positions (tokens, pixels, every free dimension of ``X`` but the batch),
``K`` inputs and ``F`` outputs: ``A`` is ``X`` (or its convolution patches) and
``G`` the gradient of the operation's output. An embedding lookup (``gather``
of rows of a table ``P [V, ...]`` at batched ids) has the normal form
``g_i = sum_t onehot(id_t) G_i[t]^T`` with ``G [B, T, D]``.

Each ``*_layout`` function reads the operation's parameters and the batch
layout of ``X`` (:class:`~dpjax.fast_clipping.batch_axes.Rows`) and returns a
layout object, or a string saying why the operation has no such form.
:meth:`operands` builds ``A``/``G`` from captured values, and
:meth:`normalize` is the permutation of ``P`` (it also runs on numpy index
arrays, which is how two uses of one leaf are compared).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dpjax.fast_clipping.batch_axes import Rows, dot_axes, gather_output_axes


def expose(x: jax.Array, s: Rows, b: int) -> jax.Array:
    """``x`` with the example index moved to the front: ``[B, *pre, outer, inner, *post]``."""
    pre, post = x.shape[: s.axis], x.shape[s.axis + 1 :]
    if s.outer == 1 and s.inner == 1:
        # Move the axis first, then add the unit axes: a transpose of a transpose that XLA
        # folds away (Equinox's [F, B] output gradients), where a reshape between them
        # would make it copy.
        return jnp.moveaxis(x, s.axis, 0).reshape((b, *pre, 1, 1, *post))
    return jnp.moveaxis(x.reshape(pre + (s.outer, b, s.inner) + post), s.axis + 1, 0)


def _labelled(ndim: int, axis: int, tag: str) -> list[Any]:
    """Dimension labels of :func:`expose`'s result."""
    return ["ex", *((tag, d) for d in range(axis)), "o", "n",
            *((tag, d) for d in range(axis + 1, ndim))]


def _arrange(x, labels: list[Any], order: list[Any], groups: list[int]):
    """Transposes ``x`` (dims ``labels``) into ``order`` and merges consecutive dims."""
    y = jnp.transpose(x, [labels.index(lab) for lab in order])
    sizes, start = [], 0
    for g in groups:
        sizes.append(math.prod(y.shape[start : start + g]))
        start += g
    return y.reshape(sizes)


@dataclasses.dataclass(frozen=True)
class DenseLayout:
    """A ``dot_general`` with the parameter at operand ``p_pos``."""

    p_pos: int
    x_state: Rows
    out_state: Rows
    x_ndim: int
    out_ndim: int
    x_batch: tuple[int, ...]
    x_contract: tuple[int, ...]
    x_free: tuple[int, ...]  # without the example axis
    out_of_x: dict[int, int]
    out_of_p: dict[int, int]
    p_perm: tuple[int, ...]
    n_batch: int
    nkf: tuple[int, int, int]
    positions: int  # T: every free position of X but the example index
    kind: str = "dense"

    def operands(self, x: jax.Array, g: jax.Array, b: int) -> tuple[jax.Array, jax.Array]:
        s, o = self.x_state, self.out_state
        x_order = ["ex", *(("x", d) for d in self.x_batch), "o", "n",
                   *(("x", d) for d in self.x_free), *(("x", d) for d in self.x_contract)]
        nb, nf, nc = len(self.x_batch), len(self.x_free), len(self.x_contract)
        a = _arrange(expose(x, s, b), _labelled(self.x_ndim, s.axis, "x"), x_order,
                     [1, nb, 2 + nf, nc])
        p_free = [self.out_of_p[d] for d in sorted(self.out_of_p)]
        g_order = ["ex", *(("g", j) for j in range(self.n_batch)), "o", "n",
                   *(("g", self.out_of_x[d]) for d in self.x_free), *(("g", j) for j in p_free)]
        gg = _arrange(expose(g, o, b), _labelled(self.out_ndim, o.axis, "g"), g_order,
                      [1, nb, 2 + nf, len(p_free)])
        return a, gg

    def normalize(self, p, xp=jnp):
        return xp.reshape(xp.transpose(p, self.p_perm), self.nkf)


def dense_layout(params: dict, p_pos: int, shapes, x_state: Rows, out_state: Rows):
    (lc, rc), (lb, rb) = params["dimension_numbers"]
    lc, rc, lb, rb = (tuple(int(d) for d in t) for t in (lc, rc, lb, rb))
    x_pos = 1 - p_pos
    xc, pc = (lc, rc) if x_pos == 0 else (rc, lc)
    xb, pb = (lb, rb) if x_pos == 0 else (rb, lb)
    if x_state.axis in xb:
        return "the parameter is paired with the batch axis"
    x_shape, p_shape = shapes[x_pos], shapes[p_pos]
    maps = dot_axes(len(shapes[0]), len(shapes[1]), params["dimension_numbers"])
    out_of_x, out_of_p = maps[x_pos], maps[p_pos]
    x_free = tuple(d for d in range(len(x_shape))
                   if d not in xc and d not in xb and d != x_state.axis)
    p_free = tuple(d for d in range(len(p_shape)) if d not in pc and d not in pb)
    nkf = tuple(math.prod(p_shape[d] for d in ds) for ds in (pb, pc, p_free))
    return DenseLayout(
        p_pos=p_pos, x_state=x_state, out_state=out_state, x_ndim=len(x_shape),
        out_ndim=len(out_of_x) + len(p_free), x_batch=xb, x_contract=xc, x_free=x_free,
        out_of_x={d: j for d, j in out_of_x.items()},
        out_of_p={d: j for d, j in out_of_p.items() if d not in pb},
        p_perm=pb + pc + p_free, n_batch=len(lb), nkf=nkf,
        positions=x_state.outer * x_state.inner * math.prod(x_shape[d] for d in x_free),
    )


@dataclasses.dataclass(frozen=True)
class ConvLayout:
    """A ``conv_general_dilated`` whose kernel (operand 1) is the parameter."""

    x_state: Rows
    out_state: Rows
    lhs_spec: tuple[int, ...]
    rhs_spec: tuple[int, ...]
    out_spec: tuple[int, ...]
    kernel_size: tuple[int, ...]
    strides: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    lhs_dilation: tuple[int, ...]
    rhs_dilation: tuple[int, ...]
    groups: int
    nkf: tuple[int, int, int]
    positions: int
    kind: str = "conv"

    def operands(self, x: jax.Array, g: jax.Array, b: int) -> tuple[jax.Array, jax.Array]:
        n, k, f = self.nkf
        patches = conv_patches(self, x)  # [Bt, *S_out, C * prod(kernel)]
        bt = patches.shape[0]
        t_sp = math.prod(patches.shape[1:-1])
        patches = patches.reshape(bt, t_sp, n, k)
        a = self._example_major(patches, self.x_state, b)
        gg = jnp.transpose(g, self.out_spec)  # [Bt, O, *S_out]
        gg = jnp.moveaxis(gg.reshape(bt, n, f, t_sp), 3, 1).reshape(bt, t_sp, n, f)
        return a, self._example_major(gg, self.out_state, b)

    @staticmethod
    def _example_major(y: jax.Array, s: Rows, b: int) -> jax.Array:
        """[Bt, T, N, X] with Bt = outer * B * inner -> [B, N, outer * inner * T, X]."""
        bt, t, n, last = y.shape
        y = y.reshape(s.outer, b, s.inner, t, n, last)
        return jnp.transpose(y, (1, 4, 0, 2, 3, 5)).reshape(b, n, s.outer * s.inner * t, last)

    def normalize(self, p, xp=jnp):
        n, _, f = self.nkf
        kt = xp.transpose(p, self.rhs_spec)  # [O, C_g, *kernel]
        kt = xp.reshape(kt, (n, f) + tuple(kt.shape[1:]))
        kt = xp.moveaxis(kt, 1, -1)  # [N, C_g, *kernel, F]
        return xp.reshape(kt, self.nkf)


def conv_layout(params: dict, shapes, out_shape, x_state: Rows, out_state: Rows):
    if params["batch_group_count"] != 1:
        return "batch-grouped convolution"
    dn = params["dimension_numbers"]
    lhs_spec, rhs_spec, out_spec = (tuple(int(d) for d in t) for t in dn)
    rhs_shape = shapes[1]
    groups = int(params["feature_group_count"])
    o, c_g = rhs_shape[rhs_spec[0]], rhs_shape[rhs_spec[1]]
    kernel = tuple(rhs_shape[d] for d in rhs_spec[2:])
    rank = len(kernel)
    return ConvLayout(
        x_state=x_state, out_state=out_state, lhs_spec=lhs_spec, rhs_spec=rhs_spec,
        out_spec=out_spec, kernel_size=kernel, strides=tuple(params["window_strides"]),
        padding=tuple(tuple(int(v) for v in p) for p in params["padding"]),
        lhs_dilation=tuple(params.get("lhs_dilation") or (1,) * rank),
        rhs_dilation=tuple(params.get("rhs_dilation") or (1,) * rank),
        groups=groups, nkf=(groups, c_g * math.prod(kernel), o // groups),
        positions=x_state.outer * x_state.inner * math.prod(out_shape[d] for d in out_spec[2:]),
    )


def conv_read_mask(params: dict, lhs_shape: tuple[int, ...]) -> np.ndarray:
    """Which input positions ``[*spatial]`` (lhs spatial order) any window reads.

    Strides, dilations and negative padding can leave pixels unread; a value
    that is not finite there does not reach the kernel gradient. Static.
    """
    dn = params["dimension_numbers"]
    lhs_spec, rhs_spec = tuple(dn.lhs_spec), tuple(dn.rhs_spec)
    mask = np.ones((), bool)
    rank = len(lhs_spec) - 2
    lhs_dil = tuple(params.get("lhs_dilation") or (1,) * rank)
    rhs_dil = tuple(params.get("rhs_dilation") or (1,) * rank)
    for d in range(rank):
        n, k = lhs_shape[lhs_spec[2 + d]], params["rhs_shape"][rhs_spec[2 + d]]
        lo, hi = params["padding"][d]
        size = (n - 1) * lhs_dil[d] + 1 + lo + hi
        out = (size - ((k - 1) * rhs_dil[d] + 1)) // params["window_strides"][d] + 1
        read = np.zeros(n, bool)
        for o in range(max(out, 0)):
            for j in range(k):
                q = o * params["window_strides"][d] + j * rhs_dil[d] - lo  # in the dilated input
                if 0 <= q < (n - 1) * lhs_dil[d] + 1 and q % lhs_dil[d] == 0:
                    read[q // lhs_dil[d]] = True
        mask = np.multiply.outer(mask, read)
    return mask


def conv_patches(layout: ConvLayout, x: jax.Array) -> jax.Array:
    """The patches ``[Bt, *out_spatial, C * prod(kernel)]`` the convolution multiplies.

    Features are ordered ``(C, *kernel)`` (channels, then kernel offsets in
    row-major order); padding, strides and both dilations as in
    ``lax.conv_general_dilated``. Strided slices of the padded input, no
    convolution.
    """
    x = jnp.transpose(x, layout.lhs_spec)  # [Bt, C, *S]
    rank = len(layout.kernel_size)
    pads = [(0, 0, 0), (0, 0, 0)] + [
        (lo, hi, d - 1) for (lo, hi), d in zip(layout.padding, layout.lhs_dilation, strict=True)
    ]
    x = jax.lax.pad(x, jnp.zeros((), x.dtype), pads)
    spatial = x.shape[2:]
    dilated = [(k - 1) * d + 1
               for k, d in zip(layout.kernel_size, layout.rhs_dilation, strict=True)]
    out = [(n - k) // s + 1 for n, k, s in zip(spatial, dilated, layout.strides, strict=True)]
    slices = []
    for offset in itertools.product(*(range(k) for k in layout.kernel_size)):
        start = [o * d for o, d in zip(offset, layout.rhs_dilation, strict=True)]
        limit = [st + (m - 1) * s + 1 for st, m, s in zip(start, out, layout.strides, strict=True)]
        slices.append(jax.lax.slice(x, [0, 0, *start], [*x.shape[:2], *limit],
                                    [1, 1, *layout.strides]))
    stacked = jnp.stack(slices, axis=-1)  # [Bt, C, *out, prod(kernel)]
    stacked = jnp.moveaxis(stacked, 1, rank + 1)  # [Bt, *out, C, prod(kernel)]
    return stacked.reshape(stacked.shape[: rank + 1] + (-1,))


@dataclasses.dataclass(frozen=True)
class EmbedLayout:
    """Rows of a table ``P [V, ...]`` looked up at batched ids (a ``gather``)."""

    idx_state: Rows
    out_state: Rows
    out_ndim: int
    offset_dims: tuple[int, ...]
    vocab: int
    width: int
    mode: str  # "clip" or "drop": what happens to ids outside [0, V)
    positions: int
    id_column: int = 0  # the entry of the index vector that is the row id
    kind: str = "embed"

    @property
    def nkf(self) -> tuple[int, int, int]:
        return 1, self.vocab, self.width

    def operands(self, idx: jax.Array, g: jax.Array, b: int):
        ids = expose(idx[..., self.id_column], self.idx_state, b).reshape(b, -1)
        # The last row an id of this dtype can name: V - 1 itself would wrap in a narrow
        # dtype (uint8 ids, V = 300: clip(200, 0, 299) gave 43).
        top = min(self.vocab - 1, int(jnp.iinfo(ids.dtype).max))
        if self.mode == "clip":
            valid = jnp.ones(ids.shape, bool)
            ids = jnp.clip(ids, 0, top)
        else:
            valid = (ids >= 0) & (ids <= top)
            ids = jnp.where(valid, ids, 0)
        ids = ids.astype(jnp.int32)  # in [0, V): V is a table dimension, within int32
        o = self.out_state
        labels = _labelled(self.out_ndim, o.axis, "g")
        rest = [lab for lab in labels if lab != "ex" and (lab in ("o", "n") or lab[1] not in
                                                            self.offset_dims)]
        order = ["ex", *rest, *(("g", d) for d in self.offset_dims)]
        gg = _arrange(expose(g, o, b), labels, order, [1, len(rest), len(self.offset_dims)])
        return ids, valid, gg

    def normalize(self, p, xp=jnp):
        return xp.reshape(p, (self.vocab, self.width))


def embed_layout(params: dict, shapes, idx_state: Rows, out_state: Rows):
    dn = params["dimension_numbers"]
    table, idx = shapes
    starts = tuple(int(d) for d in dn.start_index_map)
    mode = str(params.get("mode", "")).upper()
    if getattr(dn, "operand_batching_dims", ()) or 0 not in starts or idx[-1] != len(starts):
        return "a gather that is not a row lookup"
    if tuple(params["slice_sizes"]) != (1, *table[1:]):
        return "a gather that is not a row lookup"
    if starts != (0,) and "CLIP" not in mode:
        # Other start indices (Equinox's weight[(id,)] passes a column start too) select
        # whole dimensions: clamped, any value reads the full row. Dropped, a nonzero
        # start would drop it: the row would depend on a value the plan cannot see.
        return "a gather that is not a row lookup"
    batch_out, _ = gather_output_axes(dn, len(table), len(idx))
    offset = tuple(int(d) for d in dn.offset_dims)
    if list(offset) != sorted(offset) or batch_out != list(range(len(batch_out))):
        return "a gather whose output dimensions are permuted"
    return EmbedLayout(
        idx_state=idx_state, out_state=out_state, out_ndim=len(batch_out) + len(offset),
        offset_dims=offset, vocab=table[0], width=math.prod(table[1:]),
        mode="clip" if "CLIP" in mode else "drop", id_column=starts.index(0),
        positions=idx_state.outer * idx_state.inner * math.prod(
            n for d, n in enumerate(idx[:-1]) if d != idx_state.axis),
    )


def index_map(layout, chain_fn, leaf_shape: tuple[int, ...]) -> np.ndarray:
    """Which leaf entry each normalized entry is: ``normalize(chain(arange))``."""
    ids = np.arange(math.prod(leaf_shape)).reshape(leaf_shape)
    return np.asarray(layout.normalize(chain_fn(ids), np))
