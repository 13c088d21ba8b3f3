"""XLA's own estimates of a compiled program's memory: what the benchmarks and the memory
tests compare (issue 14's "XLA's own estimate"), defined once.

Nothing here runs a program or touches data: each estimate lowers and compiles.
"""

from __future__ import annotations

from typing import Any

import jax


def compiled_peak_bytes(fn, *args: Any) -> int:
    """Arguments + outputs + temporaries - aliased (donated) bytes of ``fn`` compiled for
    ``args`` (``fn`` jitted or not)."""
    lowered = (fn if hasattr(fn, "lower") else jax.jit(fn)).lower(*args)
    m = lowered.compile().memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
            - m.alias_size_in_bytes)


def step_peak_bytes(step, state, batch, mask) -> int:
    """A :class:`~dpjax.train.DPStep`'s whole step: its one program's estimate, or, for a
    step run as two programs (``step.parts.split``, the memory-lean clipping method), the
    larger of the clipped sum's and the update's, the update's with the batch and mask
    the caller holds meanwhile."""
    if not step.parts.split:
        return compiled_peak_bytes(step.step, state, batch, mask)
    partial, _ = jax.eval_shape(step.clipped_sum, state.params, batch, mask)
    held = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves((batch, mask)))
    return max(compiled_peak_bytes(step.clipped_sum, state.params, batch, mask),
               compiled_peak_bytes(step.apply, state, partial) + held)
