"""Fast per-example clipping for any JAX loss: DP-SGD at about the cost of ordinary training.

The loss is traced to its jaxpr; a symbolic analysis proves which values hold
one row per example (:mod:`~dpjax.fast_clipping.batch_axes`) and finds where
each parameter leaf meets the batch (:mod:`~dpjax.fast_clipping.plan`): dense
and convolution kernels and embedding tables get ghost norms and book-keeping
(no ``[B, |params|]`` tensor), biases and norm scales small per-example
gradients, and anything else per-example gradients by ``jax.vmap`` of just
those leaves. Works the same on Flax Linen, Flax NNX, Equinox and plain
functions of a dict, since only the jaxpr is read.

Entry point: :func:`make_chunk`, reached through
``dpjax.clipped_grad(..., method="fast" | "fast_lean" | "auto")``; ``"fast_lean"``
is the memory-lean mode (:mod:`~dpjax.fast_clipping.lean`). See docs/fast_clipping.md.
"""

from dpjax.fast_clipping.batch_axes import Const, Mixed, Rows, analyze
from dpjax.fast_clipping.core import capture, describe, fast_clip_and_sum, make_chunk
from dpjax.fast_clipping.layouts import conv_patches
from dpjax.fast_clipping.norms import RHO, use_ghost
from dpjax.fast_clipping.plan import LeafPlan, Plan, discover

__all__ = [
    "RHO",
    "Const",
    "LeafPlan",
    "Mixed",
    "Plan",
    "Rows",
    "analyze",
    "capture",
    "conv_patches",
    "describe",
    "discover",
    "fast_clip_and_sum",
    "make_chunk",
    "use_ghost",
]
