"""Refusing models whose forward pass mixes examples (privacy rule 3)."""

from __future__ import annotations

import flax.linen as nn
import jax

MIXING_LAYERS = (nn.BatchNorm,)


class BatchMixingError(ValueError):
    """The model has a layer whose output for one example depends on the others."""


def check_no_batch_mixing(model: nn.Module, example_input: jax.Array) -> None:
    """Raises :class:`BatchMixingError` if ``model`` contains BatchNorm or keeps batch stats.

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
