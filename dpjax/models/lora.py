"""LoRA adapters and the split of parameters into trainable and frozen leaves.

A :class:`LoRADense` with ``lora_rank = r > 0`` computes ``x @ (W + (alpha/r) A @ B) + b``
with ``A [in, r]`` (LeCun-normal) and ``B [r, out]`` zero-initialized, so a fresh
adapter leaves the base model unchanged (Hu et al. 2021, eq. (3), with their
``B A`` written here as ``A @ B`` acting on row vectors).

A *trainable mask* (a pytree of bools shaped like the params) decides which
leaves are trained: :func:`split_params` cuts the params into ``(trainable,
frozen)`` nested dicts, :func:`merge_params` puts them back, and
:func:`trainable_loss` differentiates a loss w.r.t. the trainable leaves only.
Gradients, clipping and noise then exist only for those leaves, so what is
clipped and what gets noise are decided by the same mask.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

PyTree = Any
ADAPTER_NAMES = ("lora_a", "lora_b")


class LoRADense(nn.Module):
    """A Dense layer with an optional rank-``lora_rank`` adapter on its kernel.

    Parameters: ``kernel [in, features]``, ``bias`` (if ``use_bias``) and, when
    ``lora_rank > 0``, ``lora_a [in, r]`` and ``lora_b [r, features]`` (zeros).
    """

    features: int
    lora_rank: int = 0
    lora_alpha: float = 1.0
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fan_in = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (fan_in, self.features))
        y = x @ kernel
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros_init(), (self.features,))
        if self.lora_rank > 0:
            a = self.param("lora_a", nn.initializers.lecun_normal(), (fan_in, self.lora_rank))
            b = self.param("lora_b", nn.initializers.zeros_init(), (self.lora_rank, self.features))
            # (x @ A) @ B equals x @ (A @ B) without forming the [in, out] product.
            y = y + (self.lora_alpha / self.lora_rank) * ((x @ a) @ b)
        return y


def is_adapter(path: tuple[str, ...]) -> bool:
    """Whether the leaf at ``path`` (a tuple of dict keys) is a LoRA adapter."""
    return path[-1] in ADAPTER_NAMES


def split_params(params: PyTree, mask: PyTree) -> tuple[PyTree, PyTree]:
    """``(trainable, frozen)``: nested dicts holding the leaves where ``mask`` is True / False.

    ``mask`` has the structure of ``params`` with a bool per leaf.
    """
    flat = traverse_util.flatten_dict(params)
    flat_mask = traverse_util.flatten_dict(mask)
    if set(flat) != set(flat_mask):
        raise ValueError("Expected mask to have the structure of params (a bool per leaf); "
                         f"they differ at {sorted(set(flat) ^ set(flat_mask))[:3]}.")
    trainable = {k: v for k, v in flat.items() if bool(flat_mask[k])}
    frozen = {k: v for k, v in flat.items() if not bool(flat_mask[k])}
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge_params(trainable: PyTree, frozen: PyTree) -> PyTree:
    """The full params from the two halves of :func:`split_params`."""
    flat_t = traverse_util.flatten_dict(trainable)
    flat_f = traverse_util.flatten_dict(frozen)
    overlap = set(flat_t) & set(flat_f)
    if overlap:
        raise ValueError(f"Expected disjoint trainable and frozen params; both hold "
                         f"{sorted(overlap)[:3]}.")
    return traverse_util.unflatten_dict({**flat_f, **flat_t})


def trainable_loss(loss_fn: Callable[[PyTree, PyTree], jax.Array],
                   frozen: PyTree) -> Callable[[PyTree, PyTree], jax.Array]:
    """``loss(trainable, batch) = loss_fn(merge_params(trainable, frozen), batch)``.

    Differentiating it w.r.t. its first argument gives gradients of the
    trainable leaves only, so per-example clipping and the noise cover exactly
    those leaves. ``frozen`` is closed over: under ``jit`` it becomes a
    compile-time constant (fine for small models; for large ones pass it as an
    argument and call :func:`merge_params` inside the step).
    """

    def loss(trainable: PyTree, batch: PyTree) -> jax.Array:
        return loss_fn(merge_params(trainable, frozen), batch)

    return loss


def num_params(params: PyTree) -> int:
    """Total number of scalars in ``params``."""
    return int(sum(jnp.size(leaf) for leaf in jax.tree_util.tree_leaves(params)))
