"""Which values of a loss hold one row per example: a symbolic analysis of its jaxpr.

Every variable of the loss's :class:`~dpjax.fast_clipping.program.Program` gets
a state:

* :class:`Const` -- it does not depend on the batch (it may depend on parameter
  leaves, which are recorded: those are the values a layer's weights become);
* :class:`Rows` -- along one axis, entry ``i`` (of ``outer * B * inner``, the
  example index ``i`` in the middle, so reshapes that merge the batch axis with
  its neighbours stay tracked) depends only on example ``i`` and constants;
* :class:`Mixed` -- not proven: ``mixing=True`` when a known operation combines
  or moves examples (a reduction over the batch axis, a contraction over it, a
  gather across it, ...), ``mixing=False`` when no rule covers it (an unknown
  primitive, a reshape that splits the batch axis, a scan over the examples).

Batch inputs start as ``Rows(axis=0)`` (the ``clipped_grad`` contract: every
batch array has the batch on its leading axis) and parameter leaves as
``Const({leaf})``. Axes are followed through every known primitive by its
parameters, never by comparing sizes, so a time-major ``[T, B, d]`` value with
``T == B`` is tracked correctly. Control flow (``scan``, ``cond``, ``while``) is
analysed through its sub-jaxprs (loop carries to a fixed point);
``custom_jvp_call`` / ``custom_vjp_call`` through their primal jaxpr *and* the
jaxpr of their VJP (the user's derivative rule), because a rule that mixes
examples would mix the per-example output gradients.

The analysis is conservative: a value is ``Rows`` only if the rules prove it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

import dpjax.fast_clipping.program as prog

MAX_FIXED_POINT_ITERATIONS = 16


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
Rule = Callable[["_Ctx"], list[State]]


@dataclasses.dataclass(frozen=True)
class _Ctx:
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


def analyze(program: prog.Program, in_states: Sequence[State], b: int) -> dict[int, State]:
    """The state of every variable of the program's live operations."""
    states: dict[int, State] = {c: Const() for c in program.consts}
    states.update(zip(program.inputs, in_states, strict=True))

    def read(a: prog.Atom) -> State:
        return Const() if isinstance(a, prog.Lit) else states[a]

    for op in program.live_ops():
        ins = [read(a) for a in op.ins]
        states.update(zip(op.outs, transfer(_Ctx(program, op, ins, b)), strict=True))
    return states


def output_states(program: prog.Program, states: dict[int, State]) -> list[State]:
    return [Const() if isinstance(a, prog.Lit) else states[a] for a in program.outputs]


def run_states(program: prog.Program, in_states: Sequence[State], b: int) -> list[State]:
    return output_states(program, analyze(program, in_states, b))


def transfer(ctx: _Ctx) -> list[State]:
    """The states of one operation's results from the states of its operands."""
    mixed = [s for s in ctx.ins if isinstance(s, Mixed)]
    if mixed:
        return [next((s for s in mixed if s.mixing), mixed[0])] * ctx.n_out
    if not ctx.rows():
        leaves = frozenset().union(*(s.leaves for s in ctx.ins)) if ctx.ins else frozenset()
        return [Const(leaves)] * ctx.n_out
    if ctx.op.name in ELEMENTWISE:
        return _elementwise(ctx)
    rule = _RULES.get(ctx.op.name)
    if rule is None:
        return ctx.unknown("has no batch rule")
    return rule(ctx)


def _same_layout(ctx: _Ctx, axis_of: Callable[[int, Rows], int | None]) -> list[State] | Rows:
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


def _elementwise(ctx: _Ctx) -> list[State]:
    out = ctx.out_shape()

    def axis_of(k, s):
        shape = ctx.shape(k)
        return s.axis if len(shape) == len(out) and shape[s.axis] == out[s.axis] else None

    r = _same_layout(ctx, axis_of)
    return [r] * ctx.n_out if isinstance(r, Rows) else r


def _per_operand(ctx: _Ctx) -> list[State]:
    return list(ctx.ins)


def _leading(ctx: _Ctx) -> list[State]:
    """Operations that keep leading dimensions (random keys, bitcasts)."""
    out = ctx.out_shape()

    def axis_of(k, s):
        return s.axis if s.axis < len(out) and out[s.axis] == ctx.shape(k)[s.axis] else None

    r = _same_layout(ctx, axis_of)
    return [r] * ctx.n_out if isinstance(r, Rows) else r


def _broadcast_in_dim(ctx: _Ctx) -> list[State]:
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


def _reshape(ctx: _Ctx) -> list[State]:
    (k, s), *rest = ctx.rows()
    if k != 0 or rest or ctx.op.params.get("dimensions") is not None:
        return ctx.unknown("reshapes with a transposition or dynamic shape")
    r = reshape_rows(ctx.shape(0), s, ctx.out_shape(), ctx.b)
    return [r] if r is not None else ctx.unknown("splits the batch axis")


def _squeeze(ctx: _Ctx) -> list[State]:
    (_, s), = ctx.rows()
    dims = [d % len(ctx.shape(0)) for d in ctx.op.params["dimensions"]]
    return [Rows(s.axis - sum(d < s.axis for d in dims), s.outer, s.inner)]


def _transpose(ctx: _Ctx) -> list[State]:
    (_, s), = ctx.rows()
    return [Rows(list(ctx.op.params["permutation"]).index(s.axis), s.outer, s.inner)]


def _reduce(ctx: _Ctx) -> list[State]:
    axes = [int(a) for a in ctx.op.params["axes"]]

    def axis_of(k, s):
        return None if s.axis in axes else s.axis - sum(a < s.axis for a in axes)

    r = _same_layout(ctx, axis_of)
    if not isinstance(r, Rows):
        return ctx.mixing("reduces over the batch axis")
    return [r] * ctx.n_out


def _along(param: str, default: int | None = None) -> Rule:
    """Operations that act along one axis (cumulative sums, sort, top_k)."""

    def rule(ctx: _Ctx) -> list[State]:
        ndim = len(ctx.shape(ctx.rows()[0][0]))
        along = ctx.op.params.get(param, default)
        along = ndim - 1 if along is None else int(along) % ndim
        r = _same_layout(ctx, lambda k, s: None if s.axis == along else s.axis)
        if not isinstance(r, Rows):
            return ctx.mixing("acts along the batch axis")
        return [r] * ctx.n_out

    return rule


def _rev(ctx: _Ctx) -> list[State]:
    (_, s), = ctx.rows()
    if s.axis in [int(d) for d in ctx.op.params["dimensions"]]:
        return ctx.mixing("reverses the batch axis")
    return [s]


def _pad(ctx: _Ctx) -> list[State]:
    (k, s), *rest = ctx.rows()
    if k != 0 or rest:
        return ctx.unknown("pads with a batched value")
    if tuple(ctx.op.params["padding_config"][s.axis]) != (0, 0, 0):
        return ctx.mixing("pads along the batch axis")
    return [s]


def _slice(ctx: _Ctx) -> list[State]:
    (_, s), = ctx.rows()
    p = ctx.op.params
    full = p["start_indices"][s.axis] == 0 and p["limit_indices"][s.axis] == ctx.shape(0)[s.axis]
    if not full or (p.get("strides") is not None and p["strides"][s.axis] != 1):
        return ctx.mixing("slices the batch axis")
    return [s]


def _dynamic_slice(ctx: _Ctx) -> list[State]:
    (k, s), *rest = ctx.rows()
    if k != 0 or rest:
        return ctx.unknown("has batched start indices")
    if ctx.op.params["slice_sizes"][s.axis] != ctx.shape(0)[s.axis]:
        return ctx.mixing("slices the batch axis")
    return [s]


def _dynamic_update_slice(ctx: _Ctx) -> list[State]:
    if any(k > 1 for k, _ in ctx.rows()):
        return ctx.unknown("has batched start indices")
    full = ctx.shape(0)

    def axis_of(k, s):
        return s.axis if ctx.shape(k)[s.axis] == full[s.axis] else None

    r = _same_layout(ctx, axis_of)
    if isinstance(r, Rows) and ctx.shape(1)[r.axis] != full[r.axis]:
        return ctx.mixing("writes part of the batch axis")
    return [r] if isinstance(r, Rows) else r


def _concatenate(ctx: _Ctx) -> list[State]:
    d = int(ctx.op.params["dimension"])
    r = _same_layout(ctx, lambda k, s: s.axis)
    if not isinstance(r, Rows):
        return r
    if r.axis != d:
        return [r]
    if len(ctx.rows()) != len(ctx.ins):
        return ctx.mixing("concatenates constants along the batch axis")
    return [Rows(d, r.outer * len(ctx.ins), r.inner)]


def _split(ctx: _Ctx) -> list[State]:
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


def _dot_general(ctx: _Ctx) -> list[State]:
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


def _conv(ctx: _Ctx) -> list[State]:
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


def _gather(ctx: _Ctx) -> list[State]:
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


def _scatter(ctx: _Ctx) -> list[State]:
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


def _window(ctx: _Ctx) -> list[State]:
    p = ctx.op.params
    r = _same_layout(ctx, lambda k, s: s.axis)
    if not isinstance(r, Rows):
        return r
    a = r.axis
    trivial = p["window_dimensions"][a] == 1 and p["window_strides"][a] == 1
    trivial = trivial and tuple(p["padding"][a]) == (0, 0)
    trivial = trivial and (p.get("base_dilation") or (1,) * (a + 1))[a] == 1
    return [r] * ctx.n_out if trivial else ctx.mixing("has a window over the batch axis")


def _scan_counts(params: dict) -> tuple[int, int]:
    """(number of constants, number of carries) of a ``scan``, before and after jax 0.12."""
    if "num_consts" in params:
        return params["num_consts"], params["num_carry"]
    consts, carry, _ = params["ft_in"].unpack()  # jax >= 0.12: flat trees of the operands
    return len(list(consts.vals)), len(list(carry.vals))


def _scan(ctx: _Ctx) -> list[State]:
    p = ctx.op.params
    nc, nk = _scan_counts(p)
    body = prog.flatten(p["jaxpr"])
    consts, carry, xs = ctx.ins[:nc], list(ctx.ins[nc : nc + nk]), ctx.ins[nc + nk :]
    sliced = []
    for s in xs:
        if isinstance(s, Rows) and s.axis == 0:
            return ctx.unknown("scans over the batch axis")
        sliced.append(Rows(s.axis - 1, s.outer, s.inner) if isinstance(s, Rows) else s)
    for _ in range(MAX_FIXED_POINT_ITERATIONS):
        outs = run_states(body, [*consts, *carry, *sliced], ctx.b)
        new = [join(c, o) for c, o in zip(carry, outs[:nk], strict=True)]
        if new == carry:
            break
        carry = new
    else:
        return ctx.unknown("has a carry whose batch layout does not settle")
    ys = [Rows(s.axis + 1, s.outer, s.inner) if isinstance(s, Rows) else s for s in outs[nk:]]
    return [*carry, *ys]


def _cond(ctx: _Ctx) -> list[State]:
    if not isinstance(ctx.ins[0], Const):
        return ctx.unknown("branches on a value that depends on the batch")
    outs = None
    for branch in ctx.op.params["branches"]:
        got = run_states(prog.flatten(branch), ctx.ins[1:], ctx.b)
        outs = got if outs is None else [join(a, b) for a, b in zip(outs, got, strict=True)]
    return outs


def _while(ctx: _Ctx) -> list[State]:
    p = ctx.op.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cond_consts, body_consts = ctx.ins[:cn], ctx.ins[cn : cn + bn]
    carry = list(ctx.ins[cn + bn :])
    body = prog.flatten(p["body_jaxpr"])
    for _ in range(MAX_FIXED_POINT_ITERATIONS):
        new = [join(c, o) for c, o in zip(carry, run_states(body, [*body_consts, *carry], ctx.b),
                                           strict=True)]
        if new == carry:
            break
        carry = new
    else:
        return ctx.unknown("has a carry whose batch layout does not settle")
    (pred,) = run_states(prog.flatten(p["cond_jaxpr"]), [*cond_consts, *carry], ctx.b)
    if not isinstance(pred, Const):
        return ctx.unknown("runs a number of iterations that depends on the batch")
    return carry


def _custom_derivative(ctx: _Ctx) -> list[State]:
    """custom_jvp / custom_vjp: the primal jaxpr, then the user's rule through its VJP."""
    outs = run_states(prog.flatten(ctx.op.params["call_jaxpr"]), ctx.ins, ctx.b)
    if any(isinstance(s, Mixed) for s in outs):
        return outs
    try:
        grads = _vjp_states(ctx, outs)
    except Exception as err:  # noqa: BLE001 (an untraceable rule is simply not proven)
        return ctx.unknown(f"has a derivative rule that could not be traced ({err})")
    for k, s in ctx.rows():
        g = grads.get(k)
        if isinstance(g, Mixed):
            return [Mixed(g.mixing, f"{ctx.where()}: its derivative rule: {g.reason}")] * ctx.n_out
        if g is not None and g != s and g != Const():
            return ctx.unknown("has a derivative rule that moves the batch axis")
    return outs


def _vjp_states(ctx: _Ctx, outs: list[State]) -> dict[int, State]:
    """States of the cotangents of the batched float operands, from the traced VJP."""
    in_avals = [ctx.program.aval(a) for a in ctx.op.ins]
    out_avals = [ctx.program.aval(o) for o in ctx.op.outs]
    float_in = [k for k, a in enumerate(in_avals) if jnp.issubdtype(a.dtype, jnp.inexact)]
    float_out = [k for k, a in enumerate(out_avals) if jnp.issubdtype(a.dtype, jnp.inexact)]
    eqn, n_in = ctx.op.eqn, len(in_avals)

    def pullback(*args):
        primals, cts = args[:n_in], args[n_in:]

        def f(*xs):
            full = list(primals)
            for k, x in zip(float_in, xs, strict=True):
                full[k] = x
            results = prog.bind(eqn, full)
            return [results[k] for k in float_out]

        _, vjp_fn = jax.vjp(f, *[primals[k] for k in float_in])
        return vjp_fn(list(cts))

    shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in in_avals]
    shapes += [jax.ShapeDtypeStruct(out_avals[k].shape, out_avals[k].dtype) for k in float_out]
    program = prog.flatten(jax.make_jaxpr(pullback)(*shapes))
    ct_states = [
        outs[k] if isinstance(outs[k], Rows)
        else Mixed(False, "cotangent of a batch-independent result")
        for k in float_out
    ]
    grads = run_states(program, [*ctx.ins, *ct_states], ctx.b)
    return dict(zip(float_in, grads, strict=True))


ELEMENTWISE = frozenset("""
abs acos acosh add and asin asinh atan atan2 atanh bessel_i0e bessel_i1e cbrt ceil clamp clz
complex conj convert_element_type copy copy_p cos cosh digamma div eq erf erf_inv erfc exp exp2
expm1 floor ge gt igamma igamma_grad_a igammac imag integer_pow is_finite le lgamma log log1p
logistic lt max min mul ne neg nextafter not or polygamma population_count pow
random_gamma_grad real reduce_precision regularized_incomplete_beta rem round rsqrt select_n
shift_left shift_right_arithmetic shift_right_logical sign sin sinh sqrt square stop_gradient
sub tan tanh xor zeta threefry2x32
""".split())

_RULES: dict[str, Rule] = {
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
    "split": _split,
    "dot_general": _dot_general,
    "conv_general_dilated": _conv,
    "gather": _gather,
    "optimization_barrier": _per_operand,
    "device_put": _per_operand,
    "bitcast_convert_type": _leading,
    "scan": _scan,
    "cond": _cond,
    "while": _while,
    "custom_jvp_call": _custom_derivative,
    "custom_vjp_call": _custom_derivative,
    "custom_vjp_call_jaxpr": _custom_derivative,
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
    _RULES[_name] = _reduce
for _name in ("scatter", "scatter-add", "scatter_add", "scatter_mul", "scatter_min",
              "scatter_max", "scatter_sub"):
    _RULES[_name] = _scatter
for _name in ("reduce_window_sum", "reduce_window_max", "reduce_window_min", "reduce_window",
              "select_and_gather_add", "select_and_scatter_add"):
    _RULES[_name] = _window
for _name in ("random_bits", "random_split", "random_fold_in", "random_wrap", "random_unwrap",
              "random_seed"):
    _RULES[_name] = _leading
