"""Which parameterized layers a loss calls, what they were given and what came back.

A loss ``loss_fn(params, batch)`` is opaque, but it runs Flax modules, and a
``flax.linen.intercept_methods`` interceptor sees each module method call while
the loss is traced. An *owner call* is the outermost call of a module that owns
parameters (``self.param``) directly; its own parameters are matched to the
leaves of ``params`` by identity (the loss hands them to Flax unchanged).

:func:`discover` traces the loss once to plan: which modules can be handled
layer by layer (:class:`Layer`) and which parameter leaves must fall back to
whole-model per-example gradients. A module is handled layer by layer only if
every leaf it owns is used nowhere but inside its own calls (checked on the
jaxpr, with the layers' outputs cut off) and every array it is given or returns
carries the batch on its leading axis.

:func:`capture` then runs the loss once, adding a zero perturbation ``Z`` to the
output of each planned call, and differentiates the summed loss with respect to
the perturbations only: ``dL/dZ`` is each call's output gradient ``G``, row ``i``
of which depends on example ``i`` alone (layers do not mix examples).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

PyTree = Any
MAX_PROBES = 8


@dataclasses.dataclass(frozen=True, eq=False)
class Call:
    """One owner call as seen while tracing: enough to replay and check it."""

    index: int
    path: tuple[str, ...]
    method: str
    module: nn.Module  # an unbound clone with the same attributes
    own: dict[str, int | None]  # own param name -> flat params leaf index (None: not a leaf)
    arg_def: Any  # treedef of (args, kwargs)
    arg_static: tuple[Any, ...]  # the leaves of (args, kwargs), None where an array goes
    arg_shapes: tuple[jax.ShapeDtypeStruct, ...]
    out_shape: PyTree  # ShapeDtypeStructs of the output
    batched: bool


@dataclasses.dataclass(frozen=True, eq=False)
class Layer:
    """A module handled on its own: all its owner calls and the leaves it owns."""

    path: tuple[str, ...]
    calls: tuple[Call, ...]
    leaves: dict[str, int]

    @property
    def module(self) -> nn.Module:
        return self.calls[0].module

    @property
    def name(self) -> str:
        return "/".join(self.path) or type(self.module).__name__


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """Layers handled one by one, and the leaves left to whole-model vmap."""

    layers: tuple[Layer, ...]
    leftover: tuple[int, ...]
    num_calls: int


def _is_array(x: Any) -> bool:
    return isinstance(x, jax.Array | jax.ShapeDtypeStruct) or hasattr(x, "__array__")


def own_params(module: nn.Module) -> dict[str, Any]:
    """The parameters a module created itself (not those of its children)."""
    if module.scope is None:
        return {}
    params = module.variables.get("params", {})
    return {k: v for k, v in params.items() if not isinstance(v, Mapping)}


class _Walker:
    """An interceptor that numbers owner calls and hands each to ``on_call``."""

    def __init__(self, on_call: Callable[..., Any]):
        self.on_call = on_call
        self.active: set[tuple[str, ...]] = set()
        self.count = 0

    def __call__(self, next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "setup" or module.scope is None:
            return next_fun(*args, **kwargs)
        own = own_params(module)
        path = tuple(module.path)
        if not own or path in self.active:
            return next_fun(*args, **kwargs)
        index, self.count = self.count, self.count + 1
        self.active.add(path)
        try:
            return self.on_call(index, context, own, next_fun, args, kwargs)
        finally:
            self.active.discard(path)


def _batched(arrays: list[Any], out: PyTree, batch_size: int) -> bool:
    for a in arrays:
        if a.ndim < 1 or a.shape[0] != batch_size:
            return False
    for o in jax.tree_util.tree_leaves(out):
        if not (_is_array(o) and jnp.issubdtype(o.dtype, jnp.floating)):
            return False
        if o.ndim < 1 or o.shape[0] != batch_size:
            return False
    return True


def _needed_inputs(jaxpr) -> list[bool]:
    """Which inputs of a jaxpr its outputs (or effects) depend on, conservatively."""
    needed = {v for v in jaxpr.outvars if isinstance(v, jex_core.Var)}
    for eqn in reversed(jaxpr.eqns):
        if eqn.effects or any(v in needed for v in eqn.outvars):
            needed.update(v for v in eqn.invars if isinstance(v, jex_core.Var))
    return [v in needed for v in jaxpr.invars]


def batch_size_of(batch: PyTree) -> int:
    return jax.tree_util.tree_leaves(batch)[0].shape[0]


def _probe(loss_fn, params, batch, keep: set[int]) -> tuple[list[Call], list[bool]]:
    """Traces the loss with every owner call's output cut off (except ``keep``)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    b = batch_size_of(batch)
    calls: list[Call] = []

    def probe(leaf_values, batch):
        ids = {id(v): i for i, v in enumerate(leaf_values)}

        def on_call(index, context, own, next_fun, args, kwargs):
            flat, arg_def = jax.tree_util.tree_flatten((args, kwargs))
            arrays = [x for x in flat if _is_array(x)]
            out = next_fun(*args, **kwargs)
            call = Call(
                index=index,
                path=tuple(context.module.path),
                method=context.method_name,
                module=context.module.clone(parent=None),
                own={k: ids.get(id(v)) for k, v in own.items()},
                arg_def=arg_def,
                arg_static=tuple(None if _is_array(x) else x for x in flat),
                arg_shapes=tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays),
                out_shape=jax.tree_util.tree_map(
                    lambda o: jax.ShapeDtypeStruct(jnp.shape(o), jnp.result_type(o)), out
                ),
                batched=_batched(arrays, out, b),
            )
            calls.append(call)
            if index in keep or not call.batched or None in call.own.values():
                return out
            return jax.tree_util.tree_map(jnp.zeros_like, out)

        with nn.intercept_methods(_Walker(on_call)):
            return loss_fn(jax.tree_util.tree_unflatten(treedef, leaf_values), batch)

    shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), leaves)
    batch_shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
    closed = jax.make_jaxpr(probe)(shapes, batch_shapes)
    return calls, _needed_inputs(closed.jaxpr)[: len(leaves)]


def _modules(calls: list[Call]) -> dict[tuple[str, ...], list[Call]]:
    by_path: dict[tuple[str, ...], list[Call]] = {}
    for call in calls:
        by_path.setdefault(call.path, []).append(call)
    return by_path


def _claimable(calls: list[Call], needed: list[bool], owners: dict[int, int]) -> bool:
    own = calls[0].own
    if any(i is None or needed[i] or owners[i] > 1 for i in own.values()):
        return False
    return all(c.batched and c.own == own for c in calls)


def discover(loss_fn, params: PyTree, batch: PyTree) -> Plan:
    """Plans the fast path for ``loss_fn`` at these shapes (runs nothing)."""
    num_leaves = len(jax.tree_util.tree_leaves(params))
    keep: set[int] = set()
    for _ in range(MAX_PROBES):
        calls, needed = _probe(loss_fn, params, batch, keep)
        modules = _modules(calls)
        owners: dict[int, int] = {}
        for module_calls in modules.values():
            for i in set(module_calls[0].own.values()) - {None}:
                owners[i] = owners.get(i, 0) + 1
        rejected = {
            c.index
            for module_calls in modules.values()
            if not _claimable(module_calls, needed, owners)
            for c in module_calls
        }
        if rejected <= keep:
            break
        keep |= rejected
    else:
        raise RuntimeError(f"Expected the layer plan to settle within {MAX_PROBES} traces.")
    layers = tuple(
        Layer(path, tuple(cs), dict(cs[0].own))
        for path, cs in modules.items()
        if cs[0].index not in keep
    )
    claimed = {i for layer in layers for i in layer.leaves.values()}
    leftover = tuple(i for i in range(num_leaves) if i not in claimed)
    return Plan(layers=layers, leftover=leftover, num_calls=len(calls))


@dataclasses.dataclass(frozen=True, eq=False)
class Captured:
    """What one planned call was given (its array arguments), and its output gradient."""

    arrays: tuple[jax.Array, ...]
    variables: PyTree
    out_grad: PyTree

    def args(self, call: Call, arrays=None) -> tuple[tuple, dict]:
        """Rebuilds ``(args, kwargs)`` of the call, optionally with other arrays."""
        it = iter(self.arrays if arrays is None else arrays)
        flat = [next(it) if s is None else s for s in call.arg_static]
        return jax.tree_util.tree_unflatten(call.arg_def, flat)


def capture(loss_fn, plan: Plan, params: PyTree, batch: PyTree):
    """Runs the loss once; returns ``(losses [B], {call index: Captured})``.

    The output gradient ``G`` of each planned call is that of ``sum_i loss_i``;
    its row ``i`` is example ``i``'s own, since no layer mixes examples.
    """
    planned = {c.index: c for layer in plan.layers for c in layer.calls}
    zeros = {
        i: jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), c.out_shape)
        for i, c in planned.items()
    }

    def forward(perturbations):
        seen = {}

        def on_call(index, context, own, next_fun, args, kwargs):
            if index not in perturbations:
                return next_fun(*args, **kwargs)
            call = planned[index]
            if tuple(context.module.path) != call.path or context.method_name != call.method:
                raise RuntimeError(
                    f"Expected owner call {index} to be {call.path}.{call.method}; got "
                    f"{tuple(context.module.path)}.{context.method_name}: the loss must call "
                    "its layers in the same order every time it is traced."
                )
            flat = jax.tree_util.tree_leaves((args, kwargs))
            seen[index] = (
                tuple(x for x in flat if _is_array(x)),
                dict(context.module.variables),
            )
            out = next_fun(*args, **kwargs)
            return jax.tree_util.tree_map(jnp.add, out, perturbations[index])

        with nn.intercept_methods(_Walker(on_call)):
            losses = loss_fn(params, batch)
        return losses, seen

    losses, vjp_fn, seen = jax.vjp(forward, zeros, has_aux=True)
    (out_grads,) = vjp_fn(jnp.ones_like(losses))
    captured = {
        i: Captured(arrays=seen[i][0], variables=seen[i][1], out_grad=out_grads[i]) for i in seen
    }
    return losses, captured
