"""Refusing models whose forward pass mixes examples (privacy rule 3)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

MIXING_LAYERS = (nn.BatchNorm,)


class BatchMixingError(ValueError):
    """The model has a layer whose output for one example depends on the others."""


def check_no_batch_mixing(model: nn.Module, example_input: jax.Array) -> None:
    """Raises :class:`BatchMixingError` if ``model`` mixes examples.

    Named layers (BatchNorm) and batch statistics are found by tracing; any
    other mixing by a ``jax.jvp`` check when ``example_input`` has two or more
    rows of floats.

    Per-example clipping bounds an example's contribution only if no other
    example's output depends on it; BatchNorm normalizes with statistics of the
    whole batch. Use GroupNorm or LayerNorm instead.
    """
    found: list[str] = []

    def interceptor(next_fun, args, kwargs, context):
        if isinstance(context.module, MIXING_LAYERS):
            found.append(f"{type(context.module).__name__} at {'/'.join(context.module.path)}")
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), example_input)
    collections = set(variables) - {"params"}
    if found or "batch_stats" in collections:
        what = ", ".join(sorted(set(found))) or f"collections {sorted(collections)}"
        raise BatchMixingError(
            f"Model {type(model).__name__} mixes examples in its forward pass ({what}): "
            "per-example clipping would not bound an example's contribution. "
            "Use GroupNorm or LayerNorm instead of BatchNorm."
        )
    _check_rows_are_independent(model, example_input)


def _check_rows_are_independent(model: nn.Module, example_input: jax.Array) -> None:
    """Catches mixing layers not named above (e.g. ``x - x.mean(0)`` in a custom layer).

    With at least two rows of a float input, a tangent on row 0 alone must
    leave every other row's output tangent exactly 0 (``jax.jvp``; one small
    forward pass). Integer inputs (token ids) cannot be perturbed: skipped.
    """
    x = jnp.asarray(example_input)
    if x.ndim < 1 or x.shape[0] < 2 or not jnp.issubdtype(x.dtype, jnp.floating):
        return
    params = model.init(jax.random.PRNGKey(0), x)
    tangent = jnp.zeros_like(x).at[0].set(1.0)
    _, out = jax.jvp(lambda v: model.apply(params, v), (x,), (tangent,))
    leaked = [o for o in jax.tree_util.tree_leaves(out) if jnp.any(o[1:] != 0)]
    if leaked:
        raise BatchMixingError(
            f"Model {type(model).__name__} mixes examples in its forward pass: the outputs "
            "of other examples change when only example 0's input does, so per-example "
            "clipping would not bound an example's contribution. Normalize per example "
            "(GroupNorm, LayerNorm) and keep every operation within one example."
        )
