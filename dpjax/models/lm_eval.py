"""Evaluating and sampling a :class:`~dpjax.models.transformer.DecoderLM`.

:func:`make_lm_evaluator` gives bits per byte and next-token accuracy on a
split; :func:`generate` samples continuations of a prompt with a key/value
cache (each new token runs one position through the model, attending to the
cached prompt and earlier samples: O(L) work per token, O(L^2) attention overall).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dpjax.data.text import PAD, decode, encode
from dpjax.models.transformer import DecoderLM, token_losses

PyTree = Any


def make_lm_evaluator(
    apply_fn: Callable[..., jax.Array], *, context_length: int, batch_size: int = 64
) -> Callable[[PyTree, np.ndarray, np.ndarray], dict[str, float]]:
    """``evaluate(params, tokens, lengths) -> metrics`` over a whole split, in batches.

    Metrics: ``bits_per_byte`` = total NLL / ln 2 / number of predicted tokens,
    where a record's predicted tokens are its bytes and its EOS (EOS plays the
    role of the newline ending a line of a text file; BOS is never predicted);
    ``accuracy`` = share of those tokens that are the argmax prediction;
    ``nll`` = mean NLL in nats per predicted token; ``num_tokens``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"Expected batch_size={batch_size!r} to be an integer >= 1.")

    @jax.jit
    def sums(params, tokens, lengths):
        nll, correct, real = token_losses(apply_fn, params, tokens, lengths, context_length)
        return (jnp.sum(jnp.where(real, nll, 0.0)), jnp.sum(correct & real), jnp.sum(real))

    def evaluate(params: PyTree, tokens: np.ndarray, lengths: np.ndarray) -> dict[str, float]:
        total_nll, total_correct, total = 0.0, 0, 0
        for start in range(0, len(tokens), batch_size):
            chunk_t, chunk_l = tokens[start:start + batch_size], lengths[start:start + batch_size]
            pad = batch_size - len(chunk_t)
            if pad:  # zero-length rows have no real targets
                chunk_t = np.concatenate([chunk_t, np.full((pad, tokens.shape[1]), PAD,
                                                           tokens.dtype)])
                chunk_l = np.concatenate([chunk_l, np.zeros(pad, lengths.dtype)])
            s_nll, s_correct, s_total = sums(params, jnp.asarray(chunk_t), jnp.asarray(chunk_l))
            total_nll += float(s_nll)
            total_correct += int(s_correct)
            total += int(s_total)
        n = max(total, 1)
        return {"bits_per_byte": total_nll / math.log(2) / n, "accuracy": total_correct / n,
                "nll": total_nll / n, "num_tokens": total}

    return evaluate


def generate(
    model: DecoderLM,
    params: PyTree,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    key: jax.Array | None = None,
    num_samples: int = 1,
) -> list[str]:
    """``num_samples`` continuations of ``prompt`` (greedy if ``temperature == 0``).

    The prompt is encoded as ``[BOS, bytes...]`` and must leave room for
    ``max_new_tokens`` in ``context_length``; a sample ends at EOS (or PAD) or
    after ``max_new_tokens`` tokens. The prompt runs once and each new token is
    one cached step (see module doc), all in one compiled ``lax.scan``,
    compiled on each call (this is for inspection, not throughput).
    """
    for name, value in (("max_new_tokens", max_new_tokens), ("num_samples", num_samples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Expected {name}={value!r} to be an integer >= 1.")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"Expected temperature={temperature!r} to be finite and >= 0.")
    if temperature > 0 and key is None:
        raise ValueError("Expected a PRNG key for temperature > 0 sampling; got key=None.")
    ids = encode(prompt)[:-1]
    p = len(ids)
    if p + max_new_tokens > model.context_length:
        raise ValueError(f"Expected the prompt ({p} tokens with BOS) plus max_new_tokens="
                         f"{max_new_tokens} to fit in context_length={model.context_length}.")
    extend = functools.partial(model.apply, method=DecoderLM.extend)
    heads = model.num_heads
    buf_shape = (num_samples, max_new_tokens, heads, model.width // heads)

    def pick(logits, t, key):
        if temperature == 0:
            return jnp.argmax(logits, axis=-1)
        return jax.random.categorical(jax.random.fold_in(key, t), logits / temperature)

    @jax.jit
    def run(params, ids, key):
        variables = {"params": params}
        logits, kv = extend(variables, ids[None], jnp.arange(p)[None])
        shared = [(k[0], v[0]) for k, v in kv]
        shared_mask = jnp.ones(p, bool)
        past = [(jnp.zeros(buf_shape), jnp.zeros(buf_shape)) for _ in range(model.num_layers)]
        first = jnp.broadcast_to(logits[0, -1], (num_samples, logits.shape[-1]))

        def step(carry, t):
            """Picks token t, runs it at position p + t and caches its keys/values at slot t."""
            past, logits = carry
            token = pick(logits, t, key)
            mask = jnp.broadcast_to(jnp.arange(max_new_tokens) < t, (num_samples, max_new_tokens))
            positions = jnp.full((num_samples, 1), p + t)
            out, new = extend(variables, token[:, None], positions, past, mask, shared,
                              shared_mask)
            past = [(jax.lax.dynamic_update_slice_in_dim(pk, nk, t, axis=1),
                     jax.lax.dynamic_update_slice_in_dim(pv, nv, t, axis=1))
                    for (pk, pv), (nk, nv) in zip(past, new, strict=True)]
            return (past, out[:, 0]), token

        _, tokens = jax.lax.scan(step, (past, first), jnp.arange(max_new_tokens))
        return tokens.T

    key = jax.random.PRNGKey(0) if key is None else key
    samples = np.asarray(run(params, jnp.asarray(ids), key))
    return [decode(row) for row in samples]
