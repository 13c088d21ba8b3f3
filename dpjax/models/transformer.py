"""A decoder-only transformer LM (Flax Linen) and its per-record loss.

``DecoderLM`` maps token ids ``[N, T]`` to next-token logits ``[N, T, V]``:
token embedding (+ learned positions, or rotary positions on queries and
keys), ``num_layers`` pre-LayerNorm blocks (causal multi-head attention, GELU
MLP), a final LayerNorm and an untied output head. Nothing mixes rows:
LayerNorm is per token and attention stays within a row, so one row's output
depends only on that row's tokens (privacy rule 3).

Attention projections and MLP kernels are :class:`~dpjax.models.lora.LoRADense`
layers; ``lora_rank > 0`` adds adapters, and :func:`trainable_mask` says which
leaves are trained (``"full"``, ``"lora"``, ``"last_layer"``).

:meth:`DecoderLM.extend` is the same forward pass with a key/value cache: new
tokens attend to a cache shared by all rows (a common prompt), to per-row
cached keys (masked) and causally to each other. :func:`generate` and the
exposure audit use it. Evaluation and sampling live in
:mod:`dpjax.models.lm_eval`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from dpjax.models.lora import LoRADense, is_adapter

PyTree = Any
KV = tuple[jax.Array, jax.Array]

POSITIONS = ("learned", "rotary")
REDUCTIONS = ("sum", "mean")
TRAINABLE = ("full", "lora", "last_layer")
LAST_LAYER = ("ln_f", "head")
"""Top-level modules trained by ``trainable="last_layer"``: final LayerNorm and output head."""
_ROTARY_BASE = 10_000.0


def rotary(x: jax.Array, positions: jax.Array) -> jax.Array:
    """Rotary position embedding (Su et al. 2021) of ``x [N, T, H, D]`` at ``positions [N, T]``."""
    half = x.shape[-1] // 2
    freqs = _ROTARY_BASE ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions[..., None].astype(jnp.float32) * freqs
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    x1, x2 = x[..., :half], x[..., half:2 * half]
    rotated = [x1 * cos - x2 * sin, x1 * sin + x2 * cos, x[..., 2 * half:]]
    return jnp.concatenate(rotated, axis=-1).astype(x.dtype)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
           shared: KV | None = None, shared_mask: jax.Array | None = None) -> jax.Array:
    """Softmax attention of ``q [N, T, H, D]`` over per-row keys and optional shared keys.

    ``k, v [N, S, H, D]`` with ``mask [N or 1, T, S]``; ``shared = (k, v) [P, H, D]``
    (the same for every row) with ``shared_mask [P]``. Every query must see at
    least one key (its own). Returns ``[N, T, H, D]``.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    neg = jnp.finfo(q.dtype).min
    scores = jnp.einsum("nthd,nshd->nhts", q, k) * scale
    scores = jnp.where(mask[:, None], scores, neg)
    if shared is None:
        return jnp.einsum("nhts,nshd->nthd", jax.nn.softmax(scores, axis=-1), v)
    shared_k, shared_v = shared
    shared_scores = jnp.einsum("nthd,phd->nhtp", q, shared_k) * scale
    shared_scores = jnp.where(shared_mask[None, None, None, :], shared_scores, neg)
    weights = jax.nn.softmax(jnp.concatenate([shared_scores, scores], axis=-1), axis=-1)
    p = shared_k.shape[0]
    return (jnp.einsum("nhtp,phd->nthd", weights[..., :p], shared_v)
            + jnp.einsum("nhts,nshd->nthd", weights[..., p:], v))


class Attention(nn.Module):
    """Causal multi-head self-attention with LoRA-able query/key/value/out projections."""

    width: int
    num_heads: int
    positions: str
    lora_rank: int
    lora_alpha: float

    @nn.compact
    def __call__(self, x, positions, past, past_mask, shared, shared_mask):
        n, t, _ = x.shape
        heads, dim = self.num_heads, self.width // self.num_heads

        def project(name):
            dense = LoRADense(self.width, self.lora_rank, self.lora_alpha, name=name)
            return dense(x).reshape(n, t, heads, dim)

        q, k, v = project("query"), project("key"), project("value")
        if self.positions == "rotary":
            q, k = rotary(q, positions), rotary(k, positions)
        causal = jnp.tril(jnp.ones((t, t), bool))[None]
        if past is None:
            keys, values, mask = k, v, causal
        else:
            keys = jnp.concatenate([past[0], k], axis=1)
            values = jnp.concatenate([past[1], v], axis=1)
            seen = jnp.broadcast_to(past_mask[:, None, :], (n, t, past_mask.shape[1]))
            mask = jnp.concatenate([seen, jnp.broadcast_to(causal, (n, t, t))], axis=-1)
        y = attend(q, keys, values, mask, shared, shared_mask).reshape(n, t, self.width)
        out = LoRADense(self.width, self.lora_rank, self.lora_alpha, name="out")(y)
        return out, (k, v)


class Block(nn.Module):
    """Pre-LayerNorm block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    width: int
    num_heads: int
    mlp_ratio: int
    positions: str
    lora_rank: int
    lora_alpha: float

    @nn.compact
    def __call__(self, x, positions, past, past_mask, shared, shared_mask):
        attention = Attention(self.width, self.num_heads, self.positions, self.lora_rank,
                              self.lora_alpha, name="attn")
        h, kv = attention(nn.LayerNorm(name="ln_1")(x), positions, past, past_mask, shared,
                          shared_mask)
        x = x + h
        h = LoRADense(self.width * self.mlp_ratio, self.lora_rank, self.lora_alpha,
                      name="mlp_in")(nn.LayerNorm(name="ln_2")(x))
        h = LoRADense(self.width, self.lora_rank, self.lora_alpha, name="mlp_out")(nn.gelu(h))
        return x + h, kv


class DecoderLM(nn.Module):
    """Decoder-only transformer: ``tokens [N, T] -> logits [N, T, vocab_size]``, ``T <= context``.

    The default (2 layers, width 128, 4 heads, context 128, vocab 259) has
    479,747 parameters and trains on a CPU.
    """

    vocab_size: int = 259
    context_length: int = 128
    num_layers: int = 2
    width: int = 128
    num_heads: int = 4
    mlp_ratio: int = 4
    positions: str = "learned"
    lora_rank: int = 0
    lora_alpha: float = 8.0

    def setup(self) -> None:
        _check_fields(self)
        self.embed = nn.Embed(self.vocab_size, self.width)
        if self.positions == "learned":
            self.pos_embed = self.param("pos_embed", nn.initializers.normal(0.02),
                                        (self.context_length, self.width))
        self.blocks = [
            Block(self.width, self.num_heads, self.mlp_ratio, self.positions, self.lora_rank,
                  self.lora_alpha)
            for _ in range(self.num_layers)
        ]
        self.ln_f = nn.LayerNorm()
        self.head = nn.Dense(self.vocab_size)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        if tokens.ndim != 2 or tokens.shape[1] > self.context_length:
            raise ValueError(f"Expected tokens of shape [N, T] with T <= context_length="
                             f"{self.context_length}; got {tokens.shape}.")
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        logits, _ = self.extend(tokens, positions)
        return logits

    def extend(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        past: list[KV] | None = None,
        past_mask: jax.Array | None = None,
        shared: list[KV] | None = None,
        shared_mask: jax.Array | None = None,
    ) -> tuple[jax.Array, list[KV]]:
        """Runs ``tokens [N, T]`` at ``positions [N, T]`` against cached keys/values.

        Args:
          past: per layer ``(k, v) [N, S, H, D]``: each row's earlier tokens,
            visible where ``past_mask [N, S]`` is True.
          shared: per layer ``(k, v) [P, H, D]``: earlier tokens common to every
            row (a prompt), visible where ``shared_mask [P]`` is True.

        Returns:
          ``(logits [N, T, V], kv)`` with ``kv`` per layer ``(k, v) [N, T, H, D]``
          of the new tokens (rotary already applied). Positions must be below
          ``context_length``; callers check it (they are traced here).
        """
        x = self.embed(tokens)
        if self.positions == "learned":
            x = x + jnp.take(self.pos_embed, positions, axis=0)
        kvs = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, positions, None if past is None else past[i], past_mask,
                          None if shared is None else shared[i], shared_mask)
            kvs.append(kv)
        return self.head(self.ln_f(x)), kvs


def _check_fields(model: DecoderLM) -> None:
    for name in ("vocab_size", "context_length", "num_layers", "width", "num_heads",
                 "mlp_ratio"):
        value = getattr(model, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Expected {name}={value!r} to be an integer >= 1.")
    if model.width % model.num_heads:
        raise ValueError(f"Expected width={model.width} to be a multiple of "
                         f"num_heads={model.num_heads}.")
    if model.positions not in POSITIONS:
        raise ValueError(f"Expected positions={model.positions!r} to be one of "
                         f"{list(POSITIONS)}.")
    if isinstance(model.lora_rank, bool) or not isinstance(model.lora_rank, int) or (
            model.lora_rank < 0):
        raise ValueError(f"Expected lora_rank={model.lora_rank!r} to be an integer >= 0.")
    if not (math.isfinite(model.lora_alpha) and model.lora_alpha > 0):
        raise ValueError(f"Expected lora_alpha={model.lora_alpha!r} to be finite and > 0.")


def trainable_mask(params: PyTree, trainable: str) -> PyTree:
    """Which leaves of a :class:`DecoderLM`'s params are trained: a bool per leaf.

    ``"full"``: every leaf. ``"lora"``: the adapters (``lora_a``, ``lora_b``) only;
    the model needs ``lora_rank > 0``. ``"last_layer"``: the final LayerNorm and
    the output head (:data:`LAST_LAYER`). The same mask must decide what is
    differentiated, clipped and noised (:func:`dpjax.models.lora.split_params`).
    """
    if trainable not in TRAINABLE:
        raise ValueError(f"Expected trainable={trainable!r} to be one of {list(TRAINABLE)}.")
    flat = traverse_util.flatten_dict(params)
    if trainable == "full":
        keep = dict.fromkeys(flat, True)
    elif trainable == "lora":
        keep = {path: is_adapter(path) for path in flat}
        if not any(keep.values()):
            raise ValueError("Expected LoRA adapters in params for trainable='lora'; build "
                             "the model with lora_rank > 0.")
    else:
        keep = {path: path[0] in LAST_LAYER for path in flat}
    return traverse_util.unflatten_dict(keep)


def token_losses(apply_fn: Callable[..., jax.Array], params: PyTree, tokens: jax.Array,
                 lengths: jax.Array, context_length: int):
    """Per-target ``(nll [B, W*L], correct [B, W*L], real [B, W*L])`` of rows of W windows.

    Row ``[B, W*L + 1]`` window ``w`` feeds ``tokens[w*L : (w+1)*L]`` and predicts
    the next ``L`` tokens; windows of a row are separate model rows (no
    attention across windows), targets past ``lengths - 1`` are not real.
    """
    b, width = tokens.shape
    if (width - 1) % context_length or width < 2:
        raise ValueError(f"Expected rows of windows * context_length + 1 tokens with "
                         f"context_length={context_length}; got {width}.")
    windows = (width - 1) // context_length
    inputs = tokens[:, :-1].reshape(b * windows, context_length)
    targets = tokens[:, 1:]
    logits = apply_fn({"params": params}, inputs).reshape(b, windows * context_length, -1)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = jnp.argmax(logits, axis=-1) == targets
    real = jnp.arange(width - 1)[None, :] < (lengths[:, None] - 1)
    return nll, correct, real


def lm_loss(apply_fn: Callable[..., jax.Array], *, context_length: int,
            reduction: str = "mean") -> Callable[[PyTree, tuple[jax.Array, jax.Array]], jax.Array]:
    """``loss_fn(params, (tokens, lengths)) -> [B]``: each row's (= record's) next-token NLL.

    ``reduction="sum"`` adds the NLL (nats) over the row's real targets (all
    its windows); ``"mean"`` divides by their number. Padding contributes
    nothing, and a row's loss depends only on that row, so clipping its
    gradient bounds the contribution of one record.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"Expected reduction={reduction!r} to be one of {list(REDUCTIONS)}.")
    if isinstance(context_length, bool) or not isinstance(context_length, int) or (
            context_length < 1):
        raise ValueError(f"Expected context_length={context_length!r} to be an integer >= 1.")

    def loss_fn(params: PyTree, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        tokens, lengths = batch
        nll, _, real = token_losses(apply_fn, params, tokens, lengths, context_length)
        total = jnp.sum(jnp.where(real, nll, 0.0), axis=1)
        if reduction == "mean":
            total = total / jnp.maximum(jnp.sum(real, axis=1), 1)
        return total

    return loss_fn
