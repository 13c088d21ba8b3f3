"""The memory-lean fast path: norms from one backward pass, the clipped sum from a second.

Book-keeping (:mod:`~dpjax.fast_clipping.core`) keeps every layer's inputs and
output gradients until all norms are known. Here one forward pass is
differentiated twice instead:

1. with cotangent ``1`` on every loss row: each tapped operation's output
   gradient ``G`` gives that operation's per-example norm terms as soon as it
   exists, and nothing else is kept;
2. with cotangent ``f_i`` (the clip factor of row ``i``, one pass per clipping
   group): the parameter gradient of ``sum_i f_i loss_i`` *is* the clipped sum,
   since the plan proved that row ``i`` of the loss depends on example ``i`` only.

So the peak memory is that of an ordinary backward pass (the forward's
residuals are shared by both), at the price of a second backward pass. A row
whose gradient is not finite has ``f_i = 0``, but ``0 * NaN`` is ``NaN``: every
tapped operation therefore has a custom VJP whose parameter cotangent skips
(``where``, not a product) the rows of its operands and output gradient that
are not finite. A skipped row is one of those with ``f_i = 0``: a row with
``f_i > 0`` has a finite gradient, hence finite operands and output gradients
at every layer. Other rows with ``f_i = 0`` contribute exactly ``0 * finite = 0``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

import dpjax.fast_clipping.layouts as layouts
import dpjax.fast_clipping.program as prog
from dpjax.fast_clipping.batch_axes import Const, Rows
from dpjax.fast_clipping.plan import Plan

LINEAR = frozenset({"add", "sub"})  # VJPs that need no primal values


def _is_float(x) -> bool:
    return jnp.issubdtype(x.dtype, jnp.inexact)


def bad_rows(x: jax.Array, s: Rows, b: int) -> jax.Array:
    """``[B]``: whether example ``i``'s rows of ``x`` hold a value that is not finite."""
    exposed = layouts.expose(x, s, b)
    return ~jnp.all(jnp.isfinite(exposed), axis=tuple(range(1, exposed.ndim)))


def row_mask(bad: jax.Array, s: Rows, shape: tuple[int, ...], b: int) -> jax.Array:
    """A boolean of ``shape``: True on the entries of the examples marked in ``bad``."""
    along = jnp.broadcast_to(bad.reshape(1, b, 1), (s.outer, b, s.inner)).reshape(-1)
    return along.reshape([-1 if d == s.axis else 1 for d in range(len(shape))])


def sanitized(op: prog.Op, plan: Plan) -> Callable[..., jax.Array]:
    """``op`` as a function whose cotangents of parameter-derived operands skip bad rows."""
    program, b = plan.program, plan.batch_size
    states = [plan.states[a] if isinstance(a, int) else Const() for a in op.ins]
    avals = [program.aval(a) for a in op.ins]
    out_state = plan.states[op.outs[0]]
    batched = [k for k, s in enumerate(states) if isinstance(s, Rows) and _is_float(avals[k])]
    params = [k for k, s in enumerate(states) if isinstance(s, Const) and s.leaves
              and _is_float(avals[k])]
    floats = [k for k, a in enumerate(avals) if _is_float(a)]
    linear = op.name in LINEAR

    def apply(vals):
        return prog.bind(op.eqn, vals)[0]

    def grads_of(vals, ct, wrt):
        """Cotangents of the operands ``wrt`` (primal values not needed for linear ops)."""
        if linear:
            shapes = [jax.ShapeDtypeStruct(avals[k].shape, avals[k].dtype) for k in wrt]

            def partial(*xs):
                full = [jnp.zeros(a.shape, a.dtype) for a in avals]
                for k, x in zip(wrt, xs, strict=True):
                    full[k] = x
                return apply(full)

            return jax.linear_transpose(partial, *shapes)(ct)

        def partial(*xs):
            full = list(vals)
            for k, x in zip(wrt, xs, strict=True):
                full[k] = x
            return apply(full)

        _, vjp_fn = jax.vjp(partial, *[vals[k] for k in wrt])
        return vjp_fn(ct)

    @jax.custom_vjp
    def f(*vals):
        return apply(list(vals))

    def fwd(*vals):
        return apply(list(vals)), (() if linear else vals)

    def bwd(res, ct):
        vals = None if linear else list(res)
        cts: list[Any] = [None] * len(avals)
        others = [k for k in floats if k not in params]
        for k, g in zip(others, grads_of(vals, ct, others) if others else (), strict=True):
            cts[k] = g
        bad = bad_rows(ct, out_state, b)
        if not linear:
            for k in batched:
                bad = bad | bad_rows(vals[k], states[k], b)
            vals = [jnp.where(row_mask(bad, states[k], avals[k].shape, b), 0, v)
                    if k in batched else v for k, v in enumerate(vals)]
        clean_ct = jnp.where(row_mask(bad, out_state, ct.shape, b), 0, ct)
        for k, g in zip(params, grads_of(vals, clean_ct, params), strict=True):
            cts[k] = g
        return tuple(cts)

    f.defvjp(fwd, bwd)
    return f
