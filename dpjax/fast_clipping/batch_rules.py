"""The states and per-primitive rules of the batch-axis analysis (:mod:`batch_axes`).

A value's state is :class:`Const` (independent of the batch), :class:`Rows` (one row
per example along an axis) or :class:`Mixed` (not proven); a rule maps the states of
one operation's operands to those of its results (:class:`Ctx`). This module holds the
rules of the primitives that do not contain sub-programs: elementwise operations,
layout changes (reshape, transpose, slicing, padding, concatenation), contractions
(``dot_general``, convolutions), gathers and scatters, reductions, windows.
:mod:`dpjax.fast_clipping.batch_axes` adds control flow and custom derivatives (which
analyse their sub-jaxprs) and runs the analysis.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import dpjax.fast_clipping.program as prog


@dataclasses.dataclass(frozen=True)
class Const:
    """Independent of the batch; ``leaves`` are the parameter leaves it depends on."""

    leaves: frozenset[int] = frozenset()


@dataclasses.dataclass(frozen=True)
class Rows:
    """Entry ``(o, i, n)`` of ``axis`` (size ``outer * B * inner``) depends on example i only."""

    axis: int
    outer: int = 1
    inner: int = 1

    def layout(self) -> tuple[int, int]:
        return self.outer, self.inner


@dataclasses.dataclass(frozen=True)
class Mixed:
    """Not proven per-example; ``mixing`` when a known operation combines examples."""

    mixing: bool
    reason: str


State = Const | Rows | Mixed
Rule = Callable[["Ctx"], list[State]]


@dataclasses.dataclass(frozen=True)
class Ctx:
    """One operation under analysis: its program, the operation and its operands' states."""

    program: prog.Program
    op: prog.Op
    ins: list[State]
    b: int

    def shape(self, k: int) -> tuple[int, ...]:
        return self.program.shape(self.op.ins[k])

    def out_shape(self, k: int = 0) -> tuple[int, ...]:
        return self.program.shape(self.op.outs[k])

    @property
    def n_out(self) -> int:
        return len(self.op.outs)

    def where(self) -> str:
        stack = str(getattr(getattr(self.op.eqn, "source_info", None), "name_stack", "") or "")
        shapes = ", ".join(str(self.program.aval(a).str_short()) for a in self.op.ins)
        return f"{self.op.name}({shapes})" + (f" in {stack}" if stack else "")

    def mixing(self, what: str) -> list[State]:
        return [Mixed(True, f"{self.where()} {what}")] * self.n_out

    def unknown(self, what: str) -> list[State]:
        return [Mixed(False, f"{self.where()} {what}")] * self.n_out

    def rows(self) -> list[tuple[int, Rows]]:
        return [(k, s) for k, s in enumerate(self.ins) if isinstance(s, Rows)]


def join(a: State, b: State) -> State:
    """The state of a value that is ``a`` on one path and ``b`` on another."""
    if isinstance(a, Mixed) or isinstance(b, Mixed):
        mixed = [s for s in (a, b) if isinstance(s, Mixed)]
        return next((s for s in mixed if s.mixing), mixed[0])
    if isinstance(a, Const) and isinstance(b, Const):
        return Const(a.leaves | b.leaves)
    if isinstance(a, Const):
        return b
    if isinstance(b, Const) or a == b:
        return a
    return Mixed(False, f"control flow joins two batch layouts ({a} and {b})")


def _same_layout(ctx: Ctx, axis_of: Callable[[int, Rows], int | None]) -> list[State] | Rows:
    """The one Rows layout all batched operands map to, or Mixed results."""
    found = set()
    for k, s in ctx.rows():
        axis = axis_of(k, s)
        if axis is None:
            return ctx.mixing("moves the batch axis")
        found.add((axis, s.outer, s.inner))
    if len(found) > 1:
        return ctx.mixing("combines values batched along different axes")
    (axis, outer, inner), = found
    return Rows(axis, outer, inner)


def elementwise(ctx: Ctx) -> list[State]:
    out = ctx.out_shape()

    def axis_of(k, s):
        shape = ctx.shape(k)
        return s.axis if len(shape) == len(out) and shape[s.axis] == out[s.axis] else None

    r = _same_layout(ctx, axis_of)
    return [r] * ctx.n_out if isinstance(r, Rows) else r


def _per_operand(ctx: Ctx) -> list[State]:
    return list(ctx.ins)


def _leading(ctx: Ctx) -> list[State]:
    """Operations that keep leading dimensions (random keys, bitcasts)."""
    out = ctx.out_shape()

    def axis_of(k, s):
        return s.axis if s.axis < len(out) and out[s.axis] == ctx.shape(k)[s.axis] else None

    r = _same_layout(ctx, axis_of)
    return [r] * ctx.n_out if isinstance(r, Rows) else r


def _broadcast_in_dim(ctx: Ctx) -> list[State]:
    (k, s), *rest = ctx.rows()
    if k != 0 or rest:
        return ctx.unknown("has a batched shape operand")
    dims = tuple(int(d) for d in ctx.op.params["broadcast_dimensions"])
    axis = dims[s.axis]
    if ctx.out_shape()[axis] != ctx.shape(0)[s.axis]:
        return ctx.mixing("broadcasts the batch axis")
    return [Rows(axis, s.outer, s.inner)]


def reshape_rows(in_shape: Sequence[int], s: Rows, out_shape: Sequence[int], b: int) -> Rows | None:
    """Where the example index lands after a row-major reshape, or None if it is split."""
    lo = math.prod(in_shape[s.axis + 1 :]) * s.inner  # flat-index stride of the example index
    hi = lo * b
    stride = 1
    for j in reversed(range(len(out_shape))):
        span = stride * out_shape[j]
        if stride <= lo and hi <= span and lo % stride == 0 and span % hi == 0:
            return Rows(j, outer=span // hi, inner=lo // stride)
        stride = span
    return None


def _reshape(ctx: Ctx) -> list[State]:
    (k, s), *rest = ctx.rows()
    if k != 0 or rest or ctx.op.params.get("dimensions") is not None:
        return ctx.unknown("reshapes with a transposition or dynamic shape")
    r = reshape_rows(ctx.shape(0), s, ctx.out_shape(), ctx.b)
    return [r] if r is not None else ctx.unknown("splits the batch axis")


def _squeeze(ctx: Ctx) -> list[State]:
    (_, s), = ctx.rows()
    dims = [d % len(ctx.shape(0)) for d in ctx.op.params["dimensions"]]
    return [Rows(s.axis - sum(d < s.axis for d in dims), s.outer, s.inner)]


def _transpose(ctx: Ctx) -> list[State]:
    (_, s), = ctx.rows()
    return [Rows(list(ctx.op.params["permutation"]).index(s.axis), s.outer, s.inner)]


def _reduce(ctx: Ctx) -> list[State]:
    axes = [int(a) for a in ctx.op.params["axes"]]

    def axis_of(k, s):
        return None if s.axis in axes else s.axis - sum(a < s.axis for a in axes)

    r = _same_layout(ctx, axis_of)
    if not isinstance(r, Rows):
        return ctx.mixing("reduces over the batch axis")
    return [r] * ctx.n_out


def _along(param: str, default: int | None = None) -> Rule:
    """Operations that act along one axis (cumulative sums, sort, top_k)."""

    def rule(ctx: Ctx) -> list[State]:
        ndim = len(ctx.shape(ctx.rows()[0][0]))
        along = ctx.op.params.get(param, default)
        along = ndim - 1 if along is None else int(along) % ndim
        r = _same_layout(ctx, lambda k, s: None if s.axis == along else s.axis)
        if not isinstance(r, Rows):
            return ctx.mixing("acts along the batch axis")
        return [r] * ctx.n_out

    return rule


def _rev(ctx: Ctx) -> list[State]:
    (_, s), = ctx.rows()
    if s.axis in [int(d) for d in ctx.op.params["dimensions"]]:
        return ctx.mixing("reverses the batch axis")
    return [s]


def _pad(ctx: Ctx) -> list[State]:
    (k, s), *rest = ctx.rows()
    if k != 0 or rest:
        return ctx.unknown("pads with a batched value")
    if tuple(ctx.op.params["padding_config"][s.axis]) != (0, 0, 0):
        return ctx.mixing("pads along the batch axis")
    return [s]


def _slice(ctx: Ctx) -> list[State]:
    (_, s), = ctx.rows()
    p = ctx.op.params
    full = p["start_indices"][s.axis] == 0 and p["limit_indices"][s.axis] == ctx.shape(0)[s.axis]
    if not full or (p.get("strides") is not None and p["strides"][s.axis] != 1):
        return ctx.mixing("slices the batch axis")
    return [s]


def _dynamic_slice(ctx: Ctx) -> list[State]:
    (k, s), *rest = ctx.rows()
    if k != 0 or rest:
        return ctx.unknown("has batched start indices")
    if ctx.op.params["slice_sizes"][s.axis] != ctx.shape(0)[s.axis]:
        return ctx.mixing("slices the batch axis")
    return [s]


def _dynamic_update_slice(ctx: Ctx) -> list[State]:
    if any(k > 1 for k, _ in ctx.rows()):
        return ctx.unknown("has batched start indices")
    full = ctx.shape(0)

    def axis_of(k, s):
        return s.axis if ctx.shape(k)[s.axis] == full[s.axis] else None

    r = _same_layout(ctx, axis_of)
    if isinstance(r, Rows) and ctx.shape(1)[r.axis] != full[r.axis]:
        return ctx.mixing("writes part of the batch axis")
    return [r] if isinstance(r, Rows) else r


def _concatenate(ctx: Ctx) -> list[State]:
    d = int(ctx.op.params["dimension"])
    r = _same_layout(ctx, lambda k, s: s.axis)
    if not isinstance(r, Rows):
        return r
    if r.axis != d:
        return [r]
    if len(ctx.rows()) != len(ctx.ins):
        return ctx.mixing("concatenates constants along the batch axis")
    return [Rows(d, r.outer * len(ctx.ins), r.inner)]


def _stack(ctx: Ctx) -> list[State]:
    """``stack`` (a primitive since jax 0.10) inserts a new axis ``d``: never the batch's."""
    d = int(ctx.op.params["axis"]) % len(ctx.out_shape())
    r = _same_layout(ctx, lambda k, s: s.axis if s.axis < d else s.axis + 1)
    return [r] if isinstance(r, Rows) else r


def _split(ctx: Ctx) -> list[State]:
    (_, s), = ctx.rows()
    if int(ctx.op.params["axis"]) % len(ctx.shape(0)) == s.axis:
        return ctx.mixing("splits the batch axis")
    return [s] * ctx.n_out


def dot_axes(lhs_ndim: int, rhs_ndim: int, dimension_numbers) -> tuple[dict[int, int], ...]:
    """Maps of lhs and rhs free / batch dimensions to ``dot_general`` output dimensions."""
    (lc, rc), (lb, rb) = dimension_numbers
    lhs_free = [d for d in range(lhs_ndim) if d not in lc and d not in lb]
    rhs_free = [d for d in range(rhs_ndim) if d not in rc and d not in rb]
    lhs_map = {int(d): j for j, d in enumerate(lb)}
    lhs_map.update({d: len(lb) + j for j, d in enumerate(lhs_free)})
    rhs_map = {int(d): j for j, d in enumerate(rb)}
    rhs_map.update({d: len(lb) + len(lhs_free) + j for j, d in enumerate(rhs_free)})
    return lhs_map, rhs_map


def _dot_general(ctx: Ctx) -> list[State]:
    (lc, rc), (lb, rb) = ctx.op.params["dimension_numbers"]
    lhs_map, rhs_map = dot_axes(len(ctx.shape(0)), len(ctx.shape(1)),
                                ctx.op.params["dimension_numbers"])
    sides = dict(ctx.rows())
    if len(sides) == 2:
        ls, rs = sides[0], sides[1]
        paired = ls.axis in lb and rs.axis in rb
        paired = paired and list(lb).index(ls.axis) == list(rb).index(rs.axis)
        if not paired or ls.layout() != rs.layout():
            return ctx.mixing("multiplies values of different examples")
        return [Rows(list(lb).index(ls.axis), ls.outer, ls.inner)]
    (k, s), = sides.items()
    if s.axis in (lc if k == 0 else rc):
        return ctx.mixing("contracts the batch axis")
    return [Rows((lhs_map if k == 0 else rhs_map)[s.axis], s.outer, s.inner)]


def _conv(ctx: Ctx) -> list[State]:
    sides = dict(ctx.rows())
    if 1 in sides:
        return ctx.unknown("has a kernel that depends on the batch")
    s = sides[0]
    dn = ctx.op.params["dimension_numbers"]
    if s.axis != dn.lhs_spec[0] or ctx.op.params["batch_group_count"] != 1:
        return ctx.mixing("convolves over the batch axis")
    return [Rows(dn.out_spec[0], s.outer, s.inner)]


def gather_output_axes(dn, operand_ndim: int, index_ndim: int) -> tuple[list[int], dict[int, int]]:
    """(output dims of the index batch dims, {operand dim: output dim}) of a gather."""
    offset = [int(d) for d in dn.offset_dims]
    out_ndim = len(offset) + index_ndim - 1
    batch_out = [d for d in range(out_ndim) if d not in offset]
    skipped = set(dn.collapsed_slice_dims) | set(getattr(dn, "operand_batching_dims", ()))
    window = [d for d in range(operand_ndim) if d not in skipped]
    return batch_out, dict(zip(window, offset, strict=True))


def _gather(ctx: Ctx) -> list[State]:
    dn = ctx.op.params["dimension_numbers"]
    op_shape, idx_shape = ctx.shape(0), ctx.shape(1)
    batch_out, window_out = gather_output_axes(dn, len(op_shape), len(idx_shape))
    operand_batching = list(getattr(dn, "operand_batching_dims", ()))
    index_batching = list(getattr(dn, "start_indices_batching_dims", ()))
    sides = dict(ctx.rows())
    if 0 in sides:
        s = sides[0]
        if s.axis in operand_batching:
            paired = index_batching[operand_batching.index(s.axis)]
            if 1 in sides and (sides[1].axis != paired or sides[1].layout() != s.layout()):
                return ctx.mixing("gathers across examples")
            return [Rows(batch_out[paired], s.outer, s.inner)]
        if 1 in sides or s.axis not in window_out:
            return ctx.mixing("gathers along the batch axis")
        if ctx.op.params["slice_sizes"][s.axis] != op_shape[s.axis]:
            return ctx.mixing("gathers part of the batch axis")
        return [Rows(window_out[s.axis], s.outer, s.inner)]
    s = sides[1]
    if s.axis == len(idx_shape) - 1 or s.axis in index_batching:
        return ctx.mixing("indexes with values of several examples")
    return [Rows(batch_out[s.axis], s.outer, s.inner)]


def _scatter(ctx: Ctx) -> list[State]:
    dn = ctx.op.params["dimension_numbers"]
    sides = dict(ctx.rows())
    if 1 in sides or 0 not in sides or getattr(dn, "operand_batching_dims", ()):
        return ctx.unknown("scatters with batched indices or into batched rows")
    s = sides[0]
    op_shape = ctx.shape(0)
    if s.axis in dn.inserted_window_dims or s.axis in dn.scatter_dims_to_operand_dims:
        return ctx.mixing("scatters along the batch axis")
    window = [d for d in range(len(op_shape)) if d not in dn.inserted_window_dims]
    update_axis = dn.update_window_dims[window.index(s.axis)]
    if ctx.shape(2)[update_axis] != op_shape[s.axis]:
        return ctx.mixing("scatters into part of the batch axis")
    if 2 in sides and (sides[2].axis != update_axis or sides[2].layout() != s.layout()):
        return ctx.mixing("scatters values of other examples")
    return [s] * ctx.n_out


def _window(ctx: Ctx) -> list[State]:
    p = ctx.op.params
    r = _same_layout(ctx, lambda k, s: s.axis)
    if not isinstance(r, Rows):
        return r
    a = r.axis
    trivial = p["window_dimensions"][a] == 1 and p["window_strides"][a] == 1
    trivial = trivial and tuple(p["padding"][a]) == (0, 0)
    trivial = trivial and (p.get("base_dilation") or (1,) * (a + 1))[a] == 1
    return [r] * ctx.n_out if trivial else ctx.mixing("has a window over the batch axis")


ELEMENTWISE = frozenset("""
abs acos acosh add and asin asinh atan atan2 atanh bessel_i0e bessel_i1e cbrt ceil clamp clz
complex conj convert_element_type copy copy_p cos cosh digamma div eq erf erf_inv erfc exp exp2
expm1 floor ge gt igamma igamma_grad_a igammac imag integer_pow is_finite le lgamma log log1p
logistic lt max min mul ne neg nextafter not or polygamma population_count pow
random_gamma_grad real reduce_precision regularized_incomplete_beta rem round rsqrt select_n
shift_left shift_right_arithmetic shift_right_logical sign sin sinh sqrt square stop_gradient
sub tan tanh xor zeta threefry2x32
""".split())

STRUCTURAL_RULES: dict[str, Rule] = {
    "broadcast_in_dim": _broadcast_in_dim,
    "reshape": _reshape,
    "squeeze": _squeeze,
    "transpose": _transpose,
    "rev": _rev,
    "pad": _pad,
    "slice": _slice,
    "dynamic_slice": _dynamic_slice,
    "dynamic_update_slice": _dynamic_update_slice,
    "concatenate": _concatenate,
    "stack": _stack,
    "split": _split,
    "dot_general": _dot_general,
    "conv_general_dilated": _conv,
    "gather": _gather,
    "optimization_barrier": _per_operand,
    "device_put": _per_operand,
    "bitcast_convert_type": _leading,
    "cumsum": _along("axis"),
    "cumprod": _along("axis"),
    "cummax": _along("axis"),
    "cummin": _along("axis"),
    "cumlogsumexp": _along("axis"),
    "sort": _along("dimension"),
    "top_k": _along("axis"),
}
for _name in ("reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
              "reduce_xor", "argmax", "argmin"):
    STRUCTURAL_RULES[_name] = _reduce
for _name in ("scatter", "scatter-add", "scatter_add", "scatter_mul", "scatter_min",
              "scatter_max", "scatter_sub"):
    STRUCTURAL_RULES[_name] = _scatter
for _name in ("reduce_window_sum", "reduce_window_max", "reduce_window_min", "reduce_window",
              "select_and_gather_add", "select_and_scatter_add"):
    STRUCTURAL_RULES[_name] = _window
for _name in ("random_bits", "random_split", "random_fold_in", "random_wrap", "random_unwrap",
              "random_seed"):
    STRUCTURAL_RULES[_name] = _leading
