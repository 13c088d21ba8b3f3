"""A loss as one flat list of primitive applications, and an evaluator for it.

``jax.make_jaxpr`` turns ``loss_fn(params, batch)`` into a jaxpr whose inputs are
the flat parameter leaves followed by the flat batch leaves. Calls that only
name a sub-computation (``jit``, ``closed_call``, ``remat``) are inlined, so a
layer inside a jitted helper is found like any other; everything else
(``scan``, ``cond``, ``while``, ``custom_jvp_call``, ``custom_vjp_call``) stays one
operation whose sub-jaxprs the batch analysis reads
(:mod:`~dpjax.fast_clipping.batch_axes`).

:func:`run` evaluates the program on values (tracers, under ``jit``) by binding
each primitive as ``jax.core.eval_jaxpr`` does, with a hook that may replace
any operation's evaluation: that is how the fast path taps layers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

INLINED = frozenset({"jit", "pjit", "closed_call", "core_call", "remat", "remat2", "checkpoint"})


@dataclasses.dataclass(frozen=True)
class Lit:
    """A literal operand (a Python or numpy scalar baked into the jaxpr)."""

    value: Any


Atom = int | Lit


@dataclasses.dataclass(frozen=True, eq=False)
class Op:
    """One primitive application; operands and results are variable ids."""

    index: int
    eqn: Any  # the jax JaxprEqn (primitive, params, context)
    ins: tuple[Atom, ...]
    outs: tuple[int, ...]

    @property
    def name(self) -> str:
        return self.eqn.primitive.name

    @property
    def params(self) -> dict[str, Any]:
        return self.eqn.params


@dataclasses.dataclass(frozen=True, eq=False)
class Program:
    """Flat operations, the abstract value of every variable, and the wiring."""

    ops: tuple[Op, ...]
    avals: dict[int, Any]
    consts: dict[int, Any]
    inputs: tuple[int, ...]
    outputs: tuple[Atom, ...]
    producer: dict[int, int]

    def aval(self, a: Atom) -> Any:
        if isinstance(a, Lit):
            return jax.typeof(a.value)
        return self.avals[a]

    def shape(self, a: Atom) -> tuple[int, ...]:
        return tuple(self.aval(a).shape)

    def live_ops(self) -> list[Op]:
        """The operations the outputs depend on (effects kept), in order."""
        needed = {a for a in self.outputs if isinstance(a, int)}
        live = []
        for op in reversed(self.ops):
            if op.eqn.effects or needed.intersection(op.outs):
                live.append(op)
                needed.update(a for a in op.ins if isinstance(a, int))
        return live[::-1]


def flatten(closed: Any) -> Program:
    """The flat program of a ``ClosedJaxpr``: inputs are its invars, in order."""
    counter = itertools.count()
    ops: list[Op] = []
    avals: dict[int, Any] = {}
    consts: dict[int, Any] = {}
    producer: dict[int, int] = {}

    def fresh(var) -> int:
        i = next(counter)
        avals[i] = var.aval
        return i

    def walk(jaxpr, const_ids: Sequence[Atom], in_ids: Sequence[Atom]) -> list[Atom]:
        env: dict[Any, Atom] = {}
        env.update(zip(jaxpr.constvars, const_ids, strict=True))
        env.update(zip(jaxpr.invars, in_ids, strict=True))

        def read(v) -> Atom:
            return Lit(v.val) if isinstance(v, jex_core.Literal) else env[v]

        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            name = eqn.primitive.name
            if name in INLINED:
                inner, inner_consts = _callee(eqn)
                ids = []
                for c in inner_consts:
                    cid = next(counter)
                    avals[cid] = jax.typeof(c)
                    consts[cid] = c
                    ids.append(cid)
                outs = walk(inner, ids, ins)
                env.update(zip(eqn.outvars, outs, strict=True))
                continue
            out_ids = tuple(fresh(v) for v in eqn.outvars)
            op = Op(len(ops), eqn, tuple(ins), out_ids)
            ops.append(op)
            for o in out_ids:
                producer[o] = op.index
            env.update(zip(eqn.outvars, out_ids, strict=True))
        return [read(v) for v in jaxpr.outvars]

    const_ids = []
    for var, value in zip(closed.jaxpr.constvars, closed.consts, strict=True):
        cid = fresh(var)
        consts[cid] = value
        const_ids.append(cid)
    input_ids = [fresh(v) for v in closed.jaxpr.invars]
    outputs = walk(closed.jaxpr, const_ids, input_ids)
    return Program(tuple(ops), avals, consts, tuple(input_ids), tuple(outputs), producer)


def _callee(eqn) -> tuple[Any, list[Any]]:
    """The (open jaxpr, consts) an inlined call runs."""
    for key in ("jaxpr", "call_jaxpr"):
        inner = eqn.params.get(key)
        if inner is None:
            continue
        if hasattr(inner, "consts"):
            return inner.jaxpr, list(inner.consts)
        return inner, []
    raise ValueError(f"Expected call primitive {eqn.primitive.name!r} to carry a jaxpr.")


def bind(eqn, invals: Sequence[Any]) -> list[Any]:
    """Applies ``eqn``'s primitive to ``invals`` exactly as ``jax.core.eval_jaxpr`` does."""
    params = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(params, tuple):  # older jax: (subfuns, params)
        subfuns, params = params
        invals = (*subfuns, *invals)
    ctx = getattr(eqn, "ctx", None)
    manager = ctx.manager if ctx is not None else contextlib.nullcontext()
    with manager:
        out = eqn.primitive.bind(*invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


Hook = Callable[[Op, list[Any]], list[Any] | None]


def run(program: Program, inputs: Sequence[Any], hook: Hook | None = None) -> list[Any]:
    """Evaluates the program's outputs from its inputs.

    ``hook(op, invals)`` is called for every live operation; when it returns a
    list, that list is used as the operation's results instead of binding it.
    """
    env: dict[int, Any] = dict(program.consts)
    env.update(zip(program.inputs, inputs, strict=True))

    def read(a: Atom) -> Any:
        return a.value if isinstance(a, Lit) else env[a]

    for op in program.live_ops():
        invals = [read(a) for a in op.ins]
        outs = hook(op, invals) if hook is not None else None
        if outs is None:
            outs = bind(op.eqn, invals)
        env.update(zip(op.outs, outs, strict=True))
    return [read(a) for a in program.outputs]


def evaluate(program: Program, targets: Sequence[Atom], known: dict[int, Any]) -> list[Any]:
    """The values of ``targets`` from the values in ``known`` (and the closed-over constants).

    Only the operations the targets depend on are evaluated; every input they
    reach must be in ``known``.
    """
    needed = {a for a in targets if isinstance(a, int)}
    order = []
    for op in reversed(program.ops):
        if needed.intersection(op.outs):
            order.append(op)
            needed.update(a for a in op.ins if isinstance(a, int) and a not in known)
    env: dict[int, Any] = dict(program.consts)
    env.update(known)

    def read(a: Atom) -> Any:
        return a.value if isinstance(a, Lit) else env[a]

    for op in reversed(order):
        if all(o in env for o in op.outs):
            continue
        env.update(zip(op.outs, bind(op.eqn, [read(a) for a in op.ins]), strict=True))
    return [read(a) for a in targets]


def trace(fn: Callable[..., Any], *args: Any) -> Program:
    """The flat program of ``fn(*args)`` at the shapes and dtypes of ``args``."""
    shapes = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)), args)
    return flatten(jax.make_jaxpr(fn)(*shapes))
