"""Flax models that never mix examples in the forward pass.

Every model here uses per-example normalization only (GroupNorm/LayerNorm):
BatchNorm-like layers would let one example's output depend on the others, so
per-example clipping would no longer bound an example's contribution.
:func:`check_no_batch_mixing` refuses such models.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn

from dpjax.models.check import BatchMixingError, check_no_batch_mixing
from dpjax.models.nets import CNN1D, DPCNN, MLP, WideResNet
from dpjax.models.transformer import DecoderLM

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "dp_cnn": DPCNN,
    "cnn1d": CNN1D,
    "wide_resnet": WideResNet,
    "transformer": DecoderLM,
}
MODELS = tuple(_REGISTRY)
LANGUAGE_MODELS = ("transformer",)
"""Models over token ids (``num_classes`` is their vocabulary size)."""


def get_model(name: str, num_classes: int, **options) -> nn.Module:
    """Builds model ``name`` with ``num_classes`` outputs (a language model's vocabulary
    size); options are its fields."""
    if name not in _REGISTRY:
        raise ValueError(f"Expected model={name!r} to be one of {list(MODELS)}.")
    cls = _REGISTRY[name]
    outputs = "vocab_size" if name in LANGUAGE_MODELS else "num_classes"
    fields = set(cls.__dataclass_fields__) - {"parent", "name", outputs}
    unknown = set(options) - fields
    if unknown:
        raise ValueError(
            f"Unknown option(s) {sorted(unknown)} for model={name!r}; accepted: {sorted(fields)}."
        )
    return cls(**{outputs: num_classes}, **options)


__all__ = [
    "CNN1D",
    "DPCNN",
    "DecoderLM",
    "LANGUAGE_MODELS",
    "MLP",
    "MODELS",
    "BatchMixingError",
    "WideResNet",
    "check_no_batch_mixing",
    "get_model",
]
