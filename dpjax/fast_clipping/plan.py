"""Where each parameter leaf meets the batch, and how its per-example norm is computed.

The loss is traced to a :class:`~dpjax.fast_clipping.program.Program` and
analysed (:mod:`~dpjax.fast_clipping.batch_axes`). A *use* of a leaf is an
operation of the loss with a batched operand and an operand ``P`` computed
from parameters only (the leaf itself, a reshaped kernel, ``W0 + A @ B``, a
broadcast bias). Every use gets one of:

* **fast**: a ``dot_general``, ``conv_general_dilated`` or row-lookup ``gather``
  whose ``P`` is the leaf up to reshapes, transposes and casts: ghost norm or
  outer product for the norm, book-keeping for the sum
  (:mod:`~dpjax.fast_clipping.layouts`, :mod:`~dpjax.fast_clipping.norms`);
* **generic**: an operation whose per-example VJP can be taken row by row
  (elementwise operations such as biases and norm scales, and the three above
  when ``P`` is any function of parameters): per-example gradients of ``P``,
  then of the leaves through ``P``'s own VJP;
* **no rule** (``P`` used inside a ``scan``, a ``custom_jvp``, an unknown
  primitive, ...).

A leaf whose uses are all fast, of one kind and the same entry order, is
*fast* (several uses are stacked along the positions, so a layer called twice
is exact). A leaf with any other mix of fast and generic uses (a tied
embedding, a LoRA product, a kernel also penalized) is *materialized*: its
per-example gradient is the sum over uses, and its norm is taken after the sum.
A leaf with a use that has no rule falls back to per-example gradients by
``jax.vmap`` of the whole loss; so do all leaves when the loss is not proven to
give one row per example. A loss that is proven to *mix* examples is refused
(:class:`~dpjax.models.check.BatchMixingError`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import dpjax.fast_clipping.layouts as layouts
import dpjax.fast_clipping.norms as norms
import dpjax.fast_clipping.program as prog
from dpjax.fast_clipping.batch_axes import (
    ELEMENTWISE,
    Const,
    Mixed,
    Rows,
    State,
    analyze,
    gather_output_axes,
    output_states,
)
from dpjax.models.check import BatchMixingError

STRUCTURAL = frozenset({"reshape", "transpose", "squeeze", "broadcast_in_dim", "copy", "copy_p",
                        "convert_element_type"})
ALIGNED = ELEMENTWISE | {"concatenate", "pad", "dynamic_update_slice"}
TRANSPARENT = frozenset({"optimization_barrier", "device_put"})  # each result is its operand
FAST, MATERIALIZED, VMAP, UNUSED = "fast", "materialized", "vmap", "unused"


@dataclasses.dataclass(frozen=True, eq=False)
class Use:
    """One operation where a parameter-derived operand meets the batch."""

    op: prog.Op
    pos: int  # operand position of P
    target: int  # the variable whose per-example gradient is formed (P, or a broadcast's input)
    leaves: frozenset[int]
    layout: Any  # a layouts.*Layout (fast-capable) or None
    leaf: int | None  # the leaf P is a reshape of (fast-capable), else None
    chain: tuple[prog.Op, ...]  # structural operations from that leaf to P
    slice_axis: int | None  # P is uniform along this full-size batch axis: use its first slice
    generic: bool
    reason: str  # why there is no rule ("" when there is one)

    @property
    def fast(self) -> bool:
        return self.layout is not None and self.leaf is not None


@dataclasses.dataclass(frozen=True)
class LeafPlan:
    """How one parameter leaf is treated: ``how`` in fast / materialized / vmap / unused."""

    index: int
    name: str
    how: str
    kind: str  # dense / conv / embed for fast leaves, else ""
    reason: str  # why a leaf falls back to vmap
    uses: tuple[Use, ...]

    @property
    def positions(self) -> int:
        """T of a fast leaf: its uses' positions, stacked."""
        return sum(u.layout.positions for u in self.uses)


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """The fast path's plan for one loss at one set of shapes."""

    program: prog.Program
    states: dict[int, State]
    batch_size: int
    leaves: tuple[LeafPlan, ...]
    verdict: str  # "" when the loss is proven per-example, else why everything uses vmap

    @property
    def taps(self) -> list[prog.Op]:
        """Operations whose operands and output gradient are captured."""
        ops = {u.op.index: u.op for lp in self.leaves if lp.how in (FAST, MATERIALIZED)
               for u in lp.uses}
        return [ops[i] for i in sorted(ops)]

    def describe(self) -> dict[str, str]:
        """``{leaf name: how it is computed}`` (see :func:`~dpjax.fast_clipping.core.describe`)."""
        out = {}
        for lp in self.leaves:
            if lp.how == FAST:
                _, k, f = lp.uses[0].layout.nkf
                out[lp.name] = f"{lp.kind}: {norms.branch(lp.positions, k, f)}"
            elif lp.how == MATERIALIZED:
                out[lp.name] = "per-example: " + ", ".join(sorted({u.op.name for u in lp.uses}))
            elif lp.how == VMAP:
                out[lp.name] = f"vmap: {lp.reason}"
            else:
                out[lp.name] = "unused"
        return out

    def of(self, how: str) -> list[LeafPlan]:
        return [lp for lp in self.leaves if lp.how == how]

    def fallbacks(self) -> dict[str, str]:
        """``{leaf name: reason}`` for every leaf computed by vmap."""
        return {lp.name: lp.reason for lp in self.of(VMAP)}


def leaf_names(params: Any) -> list[str]:
    paths, _ = jax.tree_util.tree_flatten_with_path(params)
    return [jax.tree_util.keystr(p) for p, _ in paths]


def discover(loss_fn, params: Any, batch: Any) -> Plan:
    """Plans the fast path for ``loss_fn`` at the shapes of ``params`` and ``batch`` (runs nothing).

    Raises :class:`~dpjax.models.check.BatchMixingError` when the loss provably
    mixes examples: per-example clipping could not bound one example's
    contribution to it.
    """
    program = prog.trace(loss_fn, params, batch)
    n_leaves = len(jax.tree_util.tree_leaves(params))
    batch_leaves = jax.tree_util.tree_leaves(batch)
    b = batch_leaves[0].shape[0]
    in_states = [Const(frozenset({i})) for i in range(n_leaves)]
    in_states += [Rows(0)] * len(batch_leaves)
    states = analyze(program, in_states, b)
    names = leaf_names(params)
    outs = output_states(program, states)
    verdict = _verdict(program, outs, b)
    if verdict:
        leaves = tuple(LeafPlan(i, names[i], VMAP, "", verdict, ()) for i in range(n_leaves))
        return Plan(program, states, b, leaves, verdict)
    uses = _uses(program, states, n_leaves)
    leaves = tuple(_leaf_plan(i, names[i], [u for u in uses if i in u.leaves], program)
                   for i in range(n_leaves))
    return Plan(program, states, b, leaves, "")


def _verdict(program: prog.Program, outs: list[State], b: int) -> str:
    if len(outs) != 1:
        return f"the loss returns {len(outs)} arrays, not one array of per-example losses"
    (out,) = outs
    if isinstance(out, Mixed) and out.mixing:
        raise BatchMixingError(
            f"The loss mixes examples: {out.reason}. Per-example clipping of a loss whose "
            "rows depend on other examples does not bound one example's contribution. Keep "
            "every operation within one example (GroupNorm/LayerNorm, not BatchNorm; no "
            "batch statistics), or pass method='vmap', which evaluates each example alone "
            "(a different model: batch statistics become per-example statistics)."
        )
    if isinstance(out, Mixed):
        return f"the loss is not proven to give one row per example: {out.reason}"
    shape = program.shape(program.outputs[0])
    if out != Rows(0) or shape != (b,):
        return f"the loss returns {shape} with batch layout {out}, not per-example losses [{b}]"
    return ""


def _uses(program: prog.Program, states: dict[int, State], n_leaves: int) -> list[Use]:
    leaf_of = {program.inputs[i]: i for i in range(n_leaves)}

    def state(a):
        return Const() if isinstance(a, prog.Lit) else states[a]

    found = []
    for op in program.live_ops():
        ins = [state(a) for a in op.ins]
        if not any(isinstance(s, Rows) for s in ins) or op.name in TRANSPARENT or not op.outs:
            continue
        if not _inexact(program.aval(op.outs[0])):  # e.g. a comparison: no gradient flows
            continue
        for pos, s in enumerate(ins):
            if isinstance(s, Const) and s.leaves and _inexact(program.aval(op.ins[pos])):
                found.append(_use(program, states, leaf_of, op, pos, ins))
    return found


def _inexact(aval) -> bool:
    return jnp.issubdtype(aval.dtype, jnp.inexact)


def _use(program, states, leaf_of, op: prog.Op, pos: int, ins: list[State]) -> Use:
    var = op.ins[pos]
    leaves = ins[pos].leaves
    out = states[op.outs[0]]
    shapes = [program.shape(a) for a in op.ins]
    layout, reason = None, ""
    if op.name == "dot_general":
        layout = layouts.dense_layout(op.params, pos, shapes, ins[1 - pos], out)
    elif op.name == "conv_general_dilated":
        layout = (layouts.conv_layout(op.params, shapes, program.shape(op.outs[0]), ins[0], out)
                  if pos == 1
                  else "the parameter is the convolution's input")
    elif op.name == "gather":
        layout = (layouts.embed_layout(op.params, shapes, ins[1], out) if pos == 0
                  else "the parameter is a gather's indices")
    generic = False
    if isinstance(layout, str):
        reason, layout = f"{op.name}: {layout}", None
        generic = op.name == "gather" and pos == 0
    elif layout is not None:
        generic = True
    target, slice_axis = var, None
    if op.name in ALIGNED:
        slice_axis, reason = _aligned_slice(program, op, pos, out)
        generic = not reason
    elif layout is None and not generic and not reason:
        reason = f"used by {op.name}, which has no per-example rule"
    chain = _chain(program, var, leaf_of) if layout is not None else None
    leaf, chain_ops = (chain if chain is not None else (None, ()))
    return Use(op, pos, target, leaves, layout, leaf, chain_ops, slice_axis, generic, reason)


def _aligned_slice(program, op: prog.Op, pos: int, out: Rows) -> tuple[int | None, str]:
    """For operations whose operands line up with the output: how P is taken per example.

    ``(None, "")``: P is the same for every example (a scalar, or size 1 along the
    batch axis). ``(axis, "")``: P has the batch axis's size but is uniform along
    it (a broadcast bias, a positional table looked up at ``arange``): each
    example uses its first slice. Otherwise no rule.
    """
    shape = program.shape(op.ins[pos])
    if len(shape) == 0 or shape[out.axis] == 1:
        return None, ""
    if out.axis in uniform_axes(program, op.ins[pos], {}):
        return out.axis, ""
    return None, f"{op.name}: a parameter-derived operand varies along the batch axis"


def uniform_axes(program: prog.Program, var, memo: dict) -> frozenset[int]:
    """Axes along which a batch-independent value is provably constant (broadcasts, iota)."""
    if isinstance(var, prog.Lit):
        return frozenset(range(len(program.shape(var))))
    if var in memo:
        return memo[var]
    shape = program.shape(var)
    found = {d for d, n in enumerate(shape) if n == 1}
    producer = program.producer.get(var)
    if producer is not None:
        op = program.ops[producer]
        p = op.params
        if op.name == "broadcast_in_dim":
            dims = [int(d) for d in p["broadcast_dimensions"]]
            src = uniform_axes(program, op.ins[0], memo)
            found |= {d for d in range(len(shape)) if d not in dims} | {dims[j] for j in src}
        elif op.name == "iota":
            found |= set(range(len(shape))) - {int(p["dimension"])}
        elif op.name in ELEMENTWISE and len(op.outs) == 1:
            found |= set(range(len(shape))).intersection(*(
                uniform_axes(program, a, memo) if len(program.shape(a)) == len(shape)
                else range(len(shape)) for a in op.ins))
        elif op.name == "transpose":
            perm = list(p["permutation"])
            found |= {perm.index(d) for d in uniform_axes(program, op.ins[0], memo)}
        elif op.name == "gather":
            operand, indices = (program.shape(a) for a in op.ins)
            batch_out, window_out = gather_output_axes(p["dimension_numbers"], len(operand),
                                                       len(indices))
            # An index batching dimension pairs each index row with its own operand
            # slice: uniform indices do not make the output uniform along it.
            paired = set(getattr(p["dimension_numbers"], "start_indices_batching_dims", ()))
            idx = uniform_axes(program, op.ins[1], memo) - paired
            found |= {batch_out[j] for j in idx if j < len(batch_out)}
            found |= {window_out[d] for d in uniform_axes(program, op.ins[0], memo)
                      if d in window_out and p["slice_sizes"][d] == operand[d]}
    memo[var] = frozenset(found)
    return memo[var]


def first_slice(program: prog.Program, var, axis: int, known: dict[int, Any]) -> Any:
    """``var``'s first slice along ``axis`` (kept, of size 1), from the values in ``known``.

    Where :func:`uniform_axes` proved ``var`` constant along ``axis``, the slice is
    computed from sliced operands (broadcasts to size 1, a shorter ``iota``,
    elementwise operations, transposes, gathers at sliced indices): the same
    function of the parameters as ``slice(var)``, but its pullback has the slice's
    size, not the batch axis's (a per-example pullback of ``slice(var)`` pads each
    example's cotangent to the full ``[B, ...]`` value). Elsewhere it is
    ``slice(var)`` of the whole value.
    """
    memo: dict = {}

    def whole(a):
        return a.value if isinstance(a, prog.Lit) else prog.evaluate(program, [a], known)[0]

    def sliced(a, d: int):
        shape = program.shape(a)
        if shape[d] == 1:
            return whole(a)
        producer = program.producer.get(a) if isinstance(a, int) else None
        if producer is None or a in known or d not in uniform_axes(program, a, memo):
            return jax.lax.slice_in_dim(whole(a), 0, 1, axis=d)
        op = program.ops[producer]
        p = op.params
        new_shape = shape[:d] + (1,) + shape[d + 1:]
        if op.name == "broadcast_in_dim":
            dims = tuple(int(j) for j in p["broadcast_dimensions"])
            x = sliced(op.ins[0], dims.index(d)) if d in dims else whole(op.ins[0])
            return jax.lax.broadcast_in_dim(x, new_shape, dims)
        if op.name == "iota":
            return jax.lax.broadcasted_iota(p["dtype"], new_shape, int(p["dimension"]))
        if op.name in ELEMENTWISE and len(op.outs) == 1:
            vals = [sliced(x, d) if len(program.shape(x)) == len(shape) else whole(x)
                    for x in op.ins]
            return prog.bind(op.eqn, vals)[0]
        if op.name == "transpose":
            return prog.bind(op.eqn, [sliced(op.ins[0], int(p["permutation"][d]))])[0]
        if op.name == "gather":
            operand, indices = (program.shape(x) for x in op.ins)
            dn = p["dimension_numbers"]
            batch_out, window_out = gather_output_axes(dn, len(operand), len(indices))
            if d in batch_out:
                vals = [whole(op.ins[0]), sliced(op.ins[1], batch_out.index(d))]
                return prog.bind(op.eqn, vals)[0]
            (e,) = [j for j, o in window_out.items() if o == d]
            sizes = list(p["slice_sizes"])
            sizes[e] = 1
            out = op.eqn.primitive.bind(sliced(op.ins[0], e), whole(op.ins[1]),
                                        **{**p, "slice_sizes": tuple(sizes)})
            return out
        return jax.lax.slice_in_dim(whole(a), 0, 1, axis=d)

    return sliced(var, axis)


def _chain(program: prog.Program, var, leaf_of: dict[int, int]):
    """``(leaf, ops)`` when ``var`` is a leaf up to reshapes, transposes and float casts."""
    ops = []
    while isinstance(var, int) and var not in leaf_of:
        producer = program.producer.get(var)
        if producer is None:
            return None
        op = program.ops[producer]
        if not _structural(program, op):
            return None
        ops.append(op)
        var = op.ins[0]
    return (leaf_of[var], tuple(reversed(ops))) if isinstance(var, int) else None


def _structural(program: prog.Program, op: prog.Op) -> bool:
    if op.name not in STRUCTURAL or len(op.ins) != 1 or not isinstance(op.ins[0], int):
        return False
    src, dst = program.aval(op.ins[0]), program.aval(op.outs[0])
    if op.name == "reshape" and op.params.get("dimensions") is not None:
        return False
    if op.name == "broadcast_in_dim" and math.prod(src.shape) != math.prod(dst.shape):
        return False
    return jnp.issubdtype(src.dtype, jnp.floating) and jnp.issubdtype(dst.dtype, jnp.floating)


def apply_chain(ops: tuple[prog.Op, ...], x, xp=np):
    """The structural chain on numpy index arrays (``xp=np``)."""
    for op in ops:
        p = op.params
        if op.name in ("reshape", "broadcast_in_dim"):
            x = xp.reshape(x, tuple(p["new_sizes"] if op.name == "reshape" else p["shape"]))
        elif op.name == "transpose":
            x = xp.transpose(x, tuple(p["permutation"]))
        elif op.name == "squeeze":
            x = xp.squeeze(x, axis=tuple(int(d) for d in p["dimensions"]))
    return x


def chain_values(ops: tuple[prog.Op, ...], leaf: jax.Array) -> jax.Array:
    """The structural chain on values, exactly as the loss computes it (casts included)."""
    for op in ops:
        (leaf,) = prog.bind(op.eqn, [leaf])
    return leaf


def _signature(use: Use, program: prog.Program) -> tuple:
    leaf_shape = program.shape(program.inputs[use.leaf])
    ids = layouts.index_map(use.layout, lambda x: apply_chain(use.chain, x), leaf_shape)
    kind = "embed" if use.layout.kind == "embed" else "linear"
    return kind, ids.shape, ids.tobytes()


def _leaf_plan(index: int, name: str, uses: list[Use], program: prog.Program) -> LeafPlan:
    if not uses:
        return LeafPlan(index, name, UNUSED, "", "", ())
    missing = [u for u in uses if not (u.fast or u.generic)]
    if missing:
        return LeafPlan(index, name, VMAP, "", missing[0].reason, tuple(uses))
    if all(u.fast and u.leaf == index for u in uses):
        if len({_signature(u, program) for u in uses}) == 1:
            kinds = sorted({u.layout.kind for u in uses})
            return LeafPlan(index, name, FAST, "+".join(kinds), "", tuple(uses))
    return LeafPlan(index, name, MATERIALIZED, "", "", tuple(uses))
