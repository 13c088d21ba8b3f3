"""Fast per-example clipping: DP-SGD at about the cost of ordinary training.

Per-example gradient norms come from each layer's inputs and output gradients
(ghost norms, per layer the cheaper of the ghost and the direct form), and the
clipped sum from book-keeping (``A^T diag(f) G``), so no ``[B, |params|]``
tensor is built. Layers without a rule, and parameters no layer owns, fall back
to per-example gradients of just those parameters (``jax.vmap``).

Entry point: :func:`make_chunk`, reached through
``dpjax.clipped_grad(..., method="fast" | "auto")``. See docs/fast_clipping.md.
"""

from dpjax.fast_clipping.capture import Layer, Plan, capture, discover
from dpjax.fast_clipping.core import describe, fast_clip_and_sum, make_chunk
from dpjax.fast_clipping.rules import conv_patches, kind, use_ghost

__all__ = [
    "Layer",
    "Plan",
    "capture",
    "conv_patches",
    "describe",
    "discover",
    "fast_clip_and_sum",
    "kind",
    "make_chunk",
    "use_ghost",
]
