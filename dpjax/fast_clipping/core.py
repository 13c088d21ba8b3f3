"""The fast clipped sum of one chunk, and the ``make_chunk`` entry point.

One forward pass evaluates the loss's program
(:func:`~dpjax.fast_clipping.program.run`) with a zero perturbation ``Z`` added
to the output of every planned use; one backward pass of ``sum_i loss_i`` with
respect to the perturbations gives each use's output gradient ``G``, whose row
``i`` is example ``i``'s own (the plan proved the loss per-example). From the
captured operands and ``G``:

1. per-example squared norms of every leaf (:mod:`~dpjax.fast_clipping.norms`);
2. factors ``f_i = mask_i * min(1, C / ||g_i||)`` per clipping group, 0 on rows
   whose norm is not finite (:func:`dpjax.clip_math.group_factors`);
3. each leaf's clipped sum ``sum_i f_i g_i``: book-keeping for fast leaves, a
   weighted sum of per-example gradients for the others.

Leaves the plan sends to vmap get their per-example gradients from
``jax.vmap`` over the whole loss, restricted to those leaves.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

import dpjax._validate as _validate
import dpjax.fast_clipping.layouts as layouts
import dpjax.fast_clipping.lean as lean
import dpjax.fast_clipping.norms as norms
import dpjax.fast_clipping.program as prog
from dpjax.clip_math import (
    LossFn,
    group_factors,
    group_leaves,
    per_example_grads,
)
from dpjax.fast_clipping.batch_axes import Rows
from dpjax.fast_clipping.plan import (
    FAST,
    MATERIALIZED,
    UNUSED,
    VMAP,
    LeafPlan,
    Plan,
    Use,
    chain_values,
    discover,
    first_slice,
)
from dpjax.models.check import BatchMixingError

PyTree = Any
ChunkFn = Callable[[PyTree, PyTree, jax.Array], tuple[PyTree, jax.Array]]
METHODS = ("fast", "fast_lean", "auto")
logger = logging.getLogger("dpjax.fast_clipping")


def capture(plan: Plan, leaves: list[jax.Array], batch_leaves: list[jax.Array],
            reweighted: tuple[int, ...] = ()):
    """Runs the loss once: ``({op index: operands}, {op index: output gradient}, reweigh)``.

    With ``reweighted`` leaves (the two-pass mode, :mod:`~dpjax.fast_clipping.lean`),
    ``reweigh(f)`` is ``{leaf: gradient of sum_i f_i loss_i}`` from the same forward
    pass, skipping rows that are not finite; otherwise it is None.
    """
    program = plan.program
    taps = plan.taps
    zeros = {op.index: jnp.zeros(program.shape(op.outs[0]), program.aval(op.outs[0]).dtype)
             for op in taps}
    wrapped = {op.index: lean.sanitized(op, plan) for op in taps} if reweighted else {}

    def forward(diff_leaves, perturbations):
        seen = {}
        full = list(leaves)
        for i, v in zip(reweighted, diff_leaves, strict=True):
            full[i] = v

        def hook(op, invals):
            if op.index not in perturbations:
                return None
            seen[op.index] = invals
            out = wrapped[op.index](*invals) if wrapped else prog.bind(op.eqn, invals)[0]
            return [out + perturbations[op.index]]

        (losses,) = prog.run(program, [*full, *batch_leaves], hook)
        return losses, seen

    diff = [leaves[i] for i in reweighted]
    losses, vjp_fn, seen = jax.vjp(forward, diff, zeros, has_aux=True)
    _, grads = vjp_fn(jnp.ones_like(losses))
    if not reweighted:
        return seen, grads, None

    def reweigh(factor):
        sums, _ = vjp_fn(factor.astype(losses.dtype))
        return dict(zip(reweighted, sums, strict=True))

    return seen, grads, reweigh


def _state(plan: Plan, atom) -> Any:
    return plan.states[atom] if isinstance(atom, int) else None


def _normal_form(use: Use, plan: Plan, seen, grads):
    op, b = use.op, plan.batch_size
    vals, g = seen[op.index], grads[op.index]
    lay = use.layout
    if lay.kind == "embed":
        return lay.operands(vals[1], g, b)
    x_pos = 0 if lay.kind == "conv" else 1 - lay.p_pos
    return lay.operands(vals[x_pos], g, b)


def _fast_terms(lp: LeafPlan, plan: Plan, seen, grads, leaves: list[jax.Array]):
    """Norms and book-keeping of a leaf whose uses all share one normal form."""
    first = lp.uses[0]
    leaf = leaves[lp.index]
    _, k, f = first.layout.nkf
    if first.layout.kind == "conv" and norms.branch(lp.positions, k, f) == "direct":
        # A convolution's own VJP per example: no [B, T, K] patches (several times the
        # input's size), and on CPU faster than patches times output gradients.
        chain = jax.vmap(lambda g: jax.vjp(lambda w: chain_values(first.chain, w), leaf)[1](g)[0])
        per_use = [per_example_target_grads(u, plan, seen, grads, leaves) for u in lp.uses]
        per_example = sum(chain(g) for g, _ in per_use)
        bad = functools.reduce(_either, [bad for _, bad in per_use])
        terms = norms.Terms(_with_bad_rows(norms.row_sq_norms(per_example), bad), "direct",
                            lambda f, ok: norms.weighted_rows(per_example, f, ok))
        return terms, lambda x: x.astype(leaf.dtype)
    forms = [_normal_form(u, plan, seen, grads) for u in lp.uses]
    if first.layout.kind == "embed":
        ids = jnp.concatenate([f[0] for f in forms], axis=1)
        valid = jnp.concatenate([f[1] for f in forms], axis=1)
        g = jnp.concatenate([f[2] for f in forms], axis=1)
        terms = norms.embed_terms(ids, valid, g, first.layout.vocab)
    else:
        a = jnp.concatenate([f[0] for f in forms], axis=2)
        g = jnp.concatenate([f[1] for f in forms], axis=2)
        terms = norms.linear_terms(a, g)

    def to_leaf(normal):
        _, vjp_fn = jax.vjp(lambda w: first.layout.normalize(chain_values(first.chain, w)), leaf)
        (out,) = vjp_fn(normal.astype(leaf.dtype))
        return out

    return terms, to_leaf


def _expose_rows(x: jax.Array, s: Rows, b: int) -> jax.Array:
    """``[B, ...]``: example ``i``'s rows of ``x``, the batch axis kept with size outer * inner."""
    y = layouts.expose(x, s, b)  # [B, *pre, outer, inner, *post]
    return y.reshape((b,) + x.shape[: s.axis] + (s.outer * s.inner,) + x.shape[s.axis + 1 :])


def per_example_target_grads(use: Use, plan: Plan, seen, grads, leaves):
    """``([B, *target.shape], bad)``: each example's gradient of the use's target; rows to drop.

    A row-wise VJP of the one operation, vmapped over examples. jax's batching
    of a convolution's kernel VJP can mix examples through ``0 * NaN`` (a NaN
    row then turns every row NaN), so for convolutions the rows whose output
    gradient, or a read input pixel, is not finite are zeroed first and
    returned in ``bad`` (exactly the rows whose kernel gradient is not
    finite); elsewhere ``bad`` is None and NaN stays in its row.
    """
    program, op, b = plan.program, use.op, plan.batch_size
    vals = list(seen[op.index])
    rows = [k for k, a in enumerate(op.ins) if isinstance(_state(plan, a), Rows)]
    out_state = plan.states[op.outs[0]]
    x_rows = [_expose_rows(vals[k], plan.states[op.ins[k]], b) for k in rows]
    g_rows = _expose_rows(grads[op.index], out_state, b)
    bad = None
    if op.name == "conv_general_dilated":
        params = {**op.params, "rhs_shape": program.shape(op.ins[1])}
        read = layouts.conv_read_mask(params, program.shape(op.ins[0]))
        spatial = [d + 1 for d in op.params["dimension_numbers"].lhs_spec[2:]]
        x = jnp.moveaxis(x_rows[0], spatial, list(range(1, 1 + len(spatial))))
        x_bad = ~jnp.isfinite(x) & read.reshape(read.shape + (1,) * (x.ndim - 1 - read.ndim))
        bad = jnp.any(x_bad.reshape(b, -1), axis=1)
        bad = bad | ~jnp.all(jnp.isfinite(g_rows).reshape(b, -1), axis=1)
        x_rows = [jnp.where(_row_factor(bad, v.ndim), 0, v) for v in x_rows]
        g_rows = jnp.where(_row_factor(bad, g_rows.ndim), 0, g_rows)
    target = vals[use.pos]
    if use.slice_axis is not None:  # uniform along the batch axis: one slice per example
        target = jax.lax.slice_in_dim(target, 0, 1, axis=use.slice_axis)
        shape = list(program.shape(op.ins[use.pos]))
        shape[use.slice_axis] = out_state.outer * out_state.inner

    def one(xs, g):
        def f(t):
            full = list(vals)
            for k, v in zip(rows, xs, strict=True):
                full[k] = v
            full[use.pos] = t if use.slice_axis is None else jnp.broadcast_to(t, shape)
            return prog.bind(op.eqn, full)[0]

        _, vjp_fn = jax.vjp(f, target)
        return vjp_fn(g.astype(program.aval(op.outs[0]).dtype))[0]

    return jax.vmap(one)(x_rows, g_rows), bad


def _row_factor(v: jax.Array, ndim: int) -> jax.Array:
    return v.reshape((-1,) + (1,) * (ndim - 1))


def _either(a: jax.Array | None, b: jax.Array | None) -> jax.Array | None:
    return b if a is None else (a if b is None else a | b)


def _with_bad_rows(sq: jax.Array, bad: jax.Array | None) -> jax.Array:
    return sq if bad is None else jnp.where(bad, jnp.nan, sq)


def _materialized_grads(plan: Plan, seen, grads, leaves, wanted: set[int]):
    """``{leaf: ([B, *leaf.shape], bad)}``: per-example gradients summed over uses; rows to drop."""
    out: dict[int, jax.Array] = {}
    bad_rows: dict[int, jax.Array | None] = {}
    done = set()
    for lp in plan.leaves:
        if lp.index not in wanted:
            continue
        for use in lp.uses:
            if id(use) in done:
                continue
            done.add(id(use))
            ids = sorted(i for i in use.leaves if i in wanted)
            per_target, bad = per_example_target_grads(use, plan, seen, grads, leaves)
            known_inputs = [plan.program.inputs[i] for i in ids]

            def phi(*values, use=use, known_inputs=known_inputs):
                known = dict(zip(known_inputs, values, strict=True))
                if use.slice_axis is not None:
                    return first_slice(plan.program, use.target, use.slice_axis, known)
                return prog.evaluate(plan.program, [use.target], known)[0]

            _, vjp_fn = jax.vjp(phi, *[leaves[i] for i in ids])
            contributions = jax.vmap(vjp_fn)(per_target)
            for i, c in zip(ids, contributions, strict=True):
                out[i] = c if i not in out else out[i] + c
                bad_rows[i] = _either(bad_rows.get(i), bad)
    return {i: (g, bad_rows[i]) for i, g in out.items()}


def _leftover_grads(loss_fn, params, batch, indices: list[int]) -> list[jax.Array]:
    """Per-example gradients [B, ...] of the given leaves only, by vmap over the whole loss."""
    leaves, treedef = jax.tree_util.tree_flatten(params)

    def partial_loss(sub, batch):
        full = list(leaves)
        for i, v in zip(indices, sub, strict=True):
            full[i] = v
        return loss_fn(jax.tree_util.tree_unflatten(treedef, full), batch)

    return per_example_grads(partial_loss, [leaves[i] for i in indices], batch)


def fast_clip_and_sum(
    loss_fn: LossFn,
    plan: Plan,
    params: PyTree,
    batch: PyTree,
    mask: jax.Array,
    l2_clip_norm: float | PyTree,
    *,
    two_pass: bool = False,
) -> tuple[PyTree, jax.Array, dict[str, str]]:
    """``(clipped_sum, per_example_norms, branches)`` of one chunk along ``plan``.

    The same numbers as :func:`dpjax.clipping.clip_and_sum` of the per-example
    gradients: each row's contribution (per group) has L2 norm at most its
    bound (up to the relative ``norms.RHO`` of ghost norms, see
    :mod:`~dpjax.fast_clipping.norms`); masked and non-finite rows contribute
    exactly 0. ``branches`` says how each leaf was computed. ``two_pass`` takes
    the clipped sum of the planned leaves from a second, reweighted backward
    pass instead of book-keeping (:mod:`~dpjax.fast_clipping.lean`).
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    batch_leaves = jax.tree_util.tree_leaves(batch)
    b = plan.batch_size
    computed = tuple(lp.index for lp in plan.leaves if lp.how in (FAST, MATERIALIZED))
    seen, grads, reweigh = (
        capture(plan, leaves, batch_leaves, computed if two_pass else ())
        if plan.taps else ({}, {}, None)
    )
    leaf_sq: dict[int, jax.Array] = {}
    weighers: dict[int, Callable[[jax.Array, jax.Array], jax.Array]] = {}
    branches: dict[str, str] = {}
    for lp in plan.of(FAST):
        terms, to_leaf = _fast_terms(lp, plan, seen, grads, leaves)
        leaf_sq[lp.index] = terms.sq
        weighers[lp.index] = lambda f, ok, t=terms, tl=to_leaf: tl(t.weighted_sum(f, ok))
        branches[lp.name] = f"{lp.kind}: {terms.branch}"
    materialized = {lp.index for lp in plan.of(MATERIALIZED)}
    for i, (per_example, bad) in _materialized_grads(plan, seen, grads, leaves,
                                                     materialized).items():
        leaf_sq[i] = _with_bad_rows(norms.row_sq_norms(per_example), bad)
        weighers[i] = lambda f, ok, g=per_example: norms.weighted_rows(g, f, ok)
    vmapped = [lp.index for lp in plan.of(VMAP)]
    if vmapped:
        for i, g in zip(vmapped, _leftover_grads(loss_fn, params, batch, vmapped), strict=True):
            leaf_sq[i] = norms.row_sq_norms(g)
            weighers[i] = lambda f, ok, g=g: norms.weighted_rows(g, f, ok)
    for lp in plan.of(UNUSED):
        leaf_sq[lp.index] = jnp.zeros((b,), jnp.float32)
        weighers[lp.index] = lambda f, ok, shape=leaves[lp.index].shape: jnp.zeros(shape)
    branches = {**plan.describe(), **branches}

    index_tree = jax.tree_util.tree_unflatten(treedef, list(range(len(leaves))))
    bounds, groups = group_leaves(l2_clip_norm, index_tree)
    members = [jax.tree_util.tree_leaves(g) for g in groups]
    group_sq = [sum((leaf_sq[i] for i in m), jnp.zeros((b,), jnp.float32)) for m in members]
    per_example_norms, row_ok, factors = group_factors(group_sq, mask, bounds)
    summed = [None] * len(leaves)
    for m, factor in zip(members, factors, strict=True):
        reweighed = reweigh(factor) if reweigh is not None and set(m) & set(computed) else {}
        for i in m:
            value = reweighed[i] if i in reweighed else weighers[i](factor, row_ok)
            summed[i] = value.astype(leaves[i].dtype)
    return jax.tree_util.tree_unflatten(treedef, summed), per_example_norms, branches


def describe(loss_fn: LossFn, params: PyTree, batch: PyTree) -> dict[str, str]:
    """How the fast path computes each parameter leaf: ``{leaf name: "kind: branch"}``.

    Kinds: ``dense``, ``conv``, ``embed`` with branch ``outer`` / ``ghost`` /
    ``direct``; ``per-example: <primitives>`` (gradients materialized per
    example, summed over the uses: biases, norm scales, tied or composed
    parameters); ``vmap: <reason>``; ``unused``. Traces the loss; runs nothing.
    """
    return discover(loss_fn, params, batch).describe()


def _make_logger() -> Callable[..., None]:
    said: set[str] = set()

    def log_once(level: int, message: str, *args) -> None:
        text = message % args
        if text not in said:
            said.add(text)
            logger.log(level, text)

    return log_once


def make_chunk(
    loss_fn: LossFn,
    *,
    l2_clip_norm: float | PyTree,
    method: str,
    fallback: ChunkFn,
    two_pass: bool = False,
) -> ChunkFn:
    """``chunk(params, batch, mask) -> (clipped_sum, per_example_norms)`` by the fast path.

    Reached through ``dpjax.clipped_grad(..., method="fast" | "fast_lean" | "auto")``,
    which validates the arguments and jits (and microbatches) the chunk. The same
    contract, and the same numbers up to float rounding, as the vmap path
    (``fallback``): each row's contribution has L2 norm at most
    ``sensitivity(l2_clip_norm)``; masked and non-finite rows contribute 0.

    Every method plans the loss from its jaxpr (:func:`~dpjax.fast_clipping.plan.discover`):
    leaves with a rule take the fast path, the others per-example vmap (logged
    once, with the reason, at WARNING). A loss not proven to give one row per
    example goes entirely to ``fallback``; a loss proven to *mix* examples is
    refused with :class:`~dpjax.models.check.BatchMixingError` by every method.
    They differ on an unexpected failure while planning: ``"fast"`` and
    ``"fast_lean"`` raise it, ``"auto"`` logs it and uses ``fallback``.

    ``"fast_lean"`` (or ``two_pass=True`` with another method) is the memory-lean
    mode: per-example norms from one backward pass, the clipped sum from a
    second, reweighted one (about the memory of an ordinary gradient, one extra
    backward pass per clipping group; :mod:`~dpjax.fast_clipping.lean`). The
    default keeps each layer's inputs and output gradients for book-keeping (no
    second pass).
    """
    _validate.one_of("method", method, METHODS)
    two_pass = two_pass or method == "fast_lean"
    log_once = _make_logger()

    def chunk(params, batch, mask):
        b = jax.tree_util.tree_leaves(batch)[0].shape[0]
        if b == 1:  # one example: its gradient is the batch gradient, vmap costs nothing extra
            return fallback(params, batch, mask)
        try:
            plan = discover(loss_fn, params, batch)
        except BatchMixingError:
            raise
        except Exception as err:  # noqa: BLE001 (auto falls back on any planning failure)
            if method != "auto":
                raise
            log_once(logging.WARNING, "clipping method 'auto': vmap path (%s: %s)",
                     type(err).__name__, err)
            return fallback(params, batch, mask)
        if plan.verdict:
            log_once(logging.WARNING, "clipping method %r: vmap path (%s)", method, plan.verdict)
            return fallback(params, batch, mask)
        if not plan.of(FAST) and not plan.of(MATERIALIZED):
            reasons = "; ".join(f"{n} ({why})" for n, why in plan.fallbacks().items())
            log_once(logging.WARNING, "clipping method %r: vmap path (no leaf has a rule: %s)",
                     method, reasons)
            return fallback(params, batch, mask)
        summed, norms_, _ = fast_clip_and_sum(loss_fn, plan, params, batch, mask, l2_clip_norm,
                                              two_pass=two_pass)
        fallbacks = plan.fallbacks()
        log_once(
            logging.WARNING if fallbacks else logging.INFO,
            "clipping method %r: fast path (%s); per-example vmap for: %s",
            method,
            "two backward passes" if two_pass else "ghost norms + book-keeping, one backward pass",
            "; ".join(f"{name} ({why})" for name, why in fallbacks.items()) or "none",
        )
        return summed, norms_

    return chunk
