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
The states and the rules of primitives without sub-programs are in
:mod:`dpjax.fast_clipping.batch_rules`; this module runs the analysis and holds the
rules that recurse into sub-jaxprs (control flow, custom derivatives).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

import dpjax.fast_clipping.program as prog
from dpjax.fast_clipping.batch_rules import (  # noqa: F401  (re-exported: the analysis' API)
    ELEMENTWISE,
    STRUCTURAL_RULES,
    Const,
    Ctx,
    Mixed,
    Rows,
    Rule,
    State,
    dot_axes,
    elementwise,
    gather_output_axes,
    join,
    reshape_rows,
)

MAX_FIXED_POINT_ITERATIONS = 16


def analyze(program: prog.Program, in_states: Sequence[State], b: int) -> dict[int, State]:
    """The state of every variable of the program's live operations."""
    states: dict[int, State] = {c: Const() for c in program.consts}
    states.update(zip(program.inputs, in_states, strict=True))

    def read(a: prog.Atom) -> State:
        return Const() if isinstance(a, prog.Lit) else states[a]

    for op in program.live_ops():
        ins = [read(a) for a in op.ins]
        states.update(zip(op.outs, transfer(Ctx(program, op, ins, b)), strict=True))
    return states


def output_states(program: prog.Program, states: dict[int, State]) -> list[State]:
    return [Const() if isinstance(a, prog.Lit) else states[a] for a in program.outputs]


def run_states(program: prog.Program, in_states: Sequence[State], b: int) -> list[State]:
    return output_states(program, analyze(program, in_states, b))


def transfer(ctx: Ctx) -> list[State]:
    """The states of one operation's results from the states of its operands."""
    mixed = [s for s in ctx.ins if isinstance(s, Mixed)]
    if mixed:
        return [next((s for s in mixed if s.mixing), mixed[0])] * ctx.n_out
    if not ctx.rows():
        leaves = frozenset().union(*(s.leaves for s in ctx.ins)) if ctx.ins else frozenset()
        return [Const(leaves)] * ctx.n_out
    if ctx.op.name in ELEMENTWISE:
        return elementwise(ctx)
    rule = _RULES.get(ctx.op.name)
    if rule is None:
        return ctx.unknown("has no batch rule")
    return rule(ctx)


def _scan_counts(params: dict) -> tuple[int, int]:
    """(number of constants, number of carries) of a ``scan``, before and after jax 0.12."""
    if "num_consts" in params:
        return params["num_consts"], params["num_carry"]
    consts, carry, _ = params["ft_in"].unpack()  # jax >= 0.12: flat trees of the operands
    return len(list(consts.vals)), len(list(carry.vals))


def _scan(ctx: Ctx) -> list[State]:
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


def _cond(ctx: Ctx) -> list[State]:
    if not isinstance(ctx.ins[0], Const):
        return ctx.unknown("branches on a value that depends on the batch")
    outs = None
    for branch in ctx.op.params["branches"]:
        got = run_states(prog.flatten(branch), ctx.ins[1:], ctx.b)
        outs = got if outs is None else [join(a, b) for a, b in zip(outs, got, strict=True)]
    return outs


def _while(ctx: Ctx) -> list[State]:
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


def _custom_derivative(ctx: Ctx) -> list[State]:
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


def _vjp_states(ctx: Ctx, outs: list[State]) -> dict[int, State]:
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


_RULES: dict[str, Rule] = {
    **STRUCTURAL_RULES,
    "scan": _scan,
    "cond": _cond,
    "while": _while,
    "custom_jvp_call": _custom_derivative,
    "custom_vjp_call": _custom_derivative,
    "custom_vjp_call_jaxpr": _custom_derivative,
}
