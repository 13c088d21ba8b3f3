"""The decoder LM: causal, no mixing across rows, per-record loss, LoRA partition, eval."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import dpjax
from dpjax.data.text import PAD, encode, tokenize_records
from dpjax.models import check_no_batch_mixing
from dpjax.models.lm_eval import generate, make_lm_evaluator
from dpjax.models.lora import merge_params, num_params, split_params, trainable_loss
from dpjax.models.transformer import DecoderLM, lm_loss, trainable_mask

CONTEXT = 16
SMALL = dict(context_length=CONTEXT, num_layers=2, width=32, num_heads=4, mlp_ratio=2)


def _init(model: DecoderLM, seed: int = 0):
    init = jax.jit(model.init)  # one compile instead of op-by-op dispatch
    return init(jax.random.PRNGKey(seed), jnp.zeros((1, CONTEXT), jnp.int32))["params"]


@pytest.fixture(scope="module")
def small():
    model = DecoderLM(**SMALL)
    return model, _init(model)


ROWS = 4


def _forward(model: DecoderLM, params):
    """The jitted forward pass ``tokens [N <= 4, 16] -> logits`` as numpy.

    Inputs are padded to 4 rows so that one compile serves every call (rows do
    not mix: ``test_rows_do_not_mix``).
    """
    forward = jax.jit(model.apply)

    def run(tokens):
        padded = np.zeros((ROWS, CONTEXT), np.int32)
        padded[:len(tokens)] = tokens
        return np.asarray(forward({"params": params}, jnp.asarray(padded)))[:len(tokens)]

    return run


@pytest.fixture(scope="module")
def apply(small):
    return _forward(*small)


@pytest.fixture(scope="module")
def sum_loss(small):
    """The jitted per-row summed NLL of the small model, on [4, 17] batches."""
    model, _ = small
    return jax.jit(lm_loss(model.apply, context_length=CONTEXT, reduction="sum"))


def _random_tokens(rows: int, length: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (rows, length)).astype(np.int32)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_position_t_does_not_see_later_tokens(positions, apply):
    if positions == "rotary":
        model = DecoderLM(**{**SMALL, "positions": positions})
        apply = _forward(model, _init(model))
    tokens = _random_tokens(3, CONTEXT, 0)
    t = 6
    changed = tokens.copy()
    changed[:, t + 1:] = (changed[:, t + 1:] + 101) % 256
    before, after = apply(tokens), apply(changed)
    np.testing.assert_allclose(after[:, :t + 1], before[:, :t + 1], rtol=0, atol=1e-6)
    assert np.abs(after[:, t + 1:] - before[:, t + 1:]).max() > 1e-3  # the check can fail


def test_rows_do_not_mix(small, sum_loss):
    model, params = small
    loss_fn = sum_loss
    tokens = _random_tokens(4, CONTEXT + 1, 1)
    lengths = np.array([17, 12, 9, 17], np.int32)
    tokens[np.arange(CONTEXT + 1)[None] >= lengths[:, None]] = PAD
    before = np.asarray(loss_fn(params, (jnp.asarray(tokens), jnp.asarray(lengths))))
    changed = tokens.copy()
    changed[0, 1:] = (changed[0, 1:] + 7) % 256
    after = np.asarray(loss_fn(params, (jnp.asarray(changed), jnp.asarray(lengths))))
    np.testing.assert_array_equal(after[1:], before[1:])
    assert abs(after[0] - before[0]) > 1e-3
    check_no_batch_mixing(model, jnp.asarray(tokens[:2, :CONTEXT]))


def test_lm_loss_is_the_masked_next_token_nll_summed_over_windows(small, apply, sum_loss):
    model, params = small
    records = ["w" * 40 + "END", "short one"]  # 45 and 11 tokens
    tokens, lengths, _ = tokenize_records(records, context_length=CONTEXT, overflow="windows",
                                          max_windows=3)
    batch = (jnp.asarray(tokens), jnp.asarray(lengths))
    summed_fn = lm_loss(model.apply, context_length=CONTEXT, reduction="sum")
    mean_fn = lm_loss(model.apply, context_length=CONTEXT)
    summed, mean = (np.asarray(a) for a in jax.jit(
        lambda p, b: (summed_fn(p, b), mean_fn(p, b)))(params, batch))
    expected, counts = np.zeros(2), np.zeros(2)
    for row in range(2):  # each window run alone; targets up to the record's last token
        windows = _log_softmax(apply(tokens[row, :-1].reshape(3, CONTEXT)))
        for w in range(3):
            logp = windows[w]
            for i in range(CONTEXT):
                target_pos = w * CONTEXT + i + 1
                if target_pos < lengths[row]:
                    expected[row] -= logp[i, tokens[row, target_pos]]
                    counts[row] += 1
    assert counts.tolist() == [44, 10]
    np.testing.assert_allclose(summed, expected, rtol=1e-5)
    np.testing.assert_allclose(mean, expected / counts, rtol=1e-5)
    truncated, t_lengths, cut = tokenize_records(records + ["c", "d"], context_length=CONTEXT)
    assert truncated.shape == (4, CONTEXT + 1) and cut == 1  # one row, not three
    one = np.asarray(sum_loss(params, (jnp.asarray(truncated), jnp.asarray(t_lengths))))
    logp = _log_softmax(apply(truncated[:1, :-1])[0])
    np.testing.assert_allclose(one[0], -logp[np.arange(16), truncated[0, 1:]].sum(), rtol=1e-5)


@pytest.mark.slow
def test_lm_loss_works_with_per_example_clipping(small):
    model, params = small
    tokens, lengths, _ = tokenize_records(["abc", "hello world", "x" * 30], context_length=CONTEXT)
    loss_fn = lm_loss(model.apply, context_length=CONTEXT)
    grad_fn = dpjax.clipped_grad(loss_fn, l2_clip_norm=0.01)  # jitted
    summed, norms = grad_fn(params, (jnp.asarray(tokens), jnp.asarray(lengths)),
                            jnp.array([1.0, 1.0, 0.0]))
    total = math.sqrt(sum(float(np.sum(np.asarray(g, np.float64)**2))
                          for g in jax.tree_util.tree_leaves(summed)))
    assert np.all(np.asarray(norms) > 0.01)  # all rows clipped: the bound binds
    assert total <= 2 * 0.01 + 1e-6


def _adapter_size(layers: int, width: int, mlp: int, rank: int) -> int:
    attention = 4 * (width * rank + rank * width)
    mlp_in, mlp_out = width * rank + rank * mlp * width, mlp * width * rank + rank * width
    return layers * (attention + mlp_in + mlp_out)


def test_lora_with_zero_b_equals_the_base_model_and_only_adapters_train(small, apply):
    _, base_params = small
    lora = DecoderLM(**SMALL, lora_rank=4, lora_alpha=8.0)
    lora_params = _init(lora, 1)
    flat = traverse_util.flatten_dict(lora_params)
    for path, leaf in traverse_util.flatten_dict(base_params).items():
        assert flat[path].shape == leaf.shape
        flat[path] = leaf
    lora_params = traverse_util.unflatten_dict(flat)
    mask = trainable_mask(lora_params, "lora")
    trainable, frozen = split_params(lora_params, mask)
    names = {path[-1] for path in traverse_util.flatten_dict(trainable)}
    assert names == {"lora_a", "lora_b"}
    assert num_params(trainable) == _adapter_size(2, 32, 2, 4)
    assert num_params(trainable) + num_params(frozen) == num_params(lora_params)
    merged = traverse_util.flatten_dict(merge_params(trainable, frozen))
    assert merged.keys() == flat.keys()
    assert all(np.array_equal(np.asarray(merged[k]), np.asarray(flat[k])) for k in flat)

    tokens, lengths, _ = tokenize_records(["canary 123", "more text here", "x" * 20],
                                          context_length=CONTEXT)
    batch = (jnp.asarray(tokens), jnp.asarray(lengths))
    loss = trainable_loss(lm_loss(lora.apply, context_length=CONTEXT), frozen)

    @jax.jit
    def logits_and_grads(trainable):  # one compile for both checks
        logits = lora.apply({"params": merge_params(trainable, frozen)}, batch[0][:, :-1])
        return logits, jax.grad(lambda t: jnp.sum(loss(t, batch)))(trainable)

    logits, grads = logits_and_grads(trainable)
    # two differently compiled float32 programs: equal up to rounding (rtol 1e-5)
    np.testing.assert_allclose(np.asarray(logits), apply(tokens[:, :-1]), rtol=1e-5, atol=1e-6)
    nonzero_b = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.1 if path[-1].key == "lora_b" else x, trainable)
    changed, _ = logits_and_grads(nonzero_b)
    assert np.abs(np.asarray(changed) - np.asarray(logits)).max() > 1e-2  # the check can fail
    flat_grads = {k: np.asarray(g) for k, g in traverse_util.flatten_dict(grads).items()}
    assert set(flat_grads) == set(traverse_util.flatten_dict(trainable))
    # with B = 0 the gradient reaches B, not A (d/dA of (x A) B is 0 at B = 0)
    assert all(not g.any() for p, g in flat_grads.items() if p[-1] == "lora_a")
    assert all(g.any() for p, g in flat_grads.items() if p[-1] == "lora_b")


def test_trainable_mask_full_and_last_layer(small):
    _, params = small
    full, _ = split_params(params, trainable_mask(params, "full"))
    assert num_params(full) == num_params(params)
    last, _ = split_params(params, trainable_mask(params, "last_layer"))
    assert set(last) == {"ln_f", "head"}
    assert num_params(last) == 2 * 32 + 32 * 259 + 259
    with pytest.raises(ValueError, match="lora_rank > 0"):
        trainable_mask(params, "lora")
    with pytest.raises(ValueError, match="trainable='all'"):
        trainable_mask(params, "all")


def test_evaluator_bits_per_byte_and_accuracy(small, apply):
    model, params = small
    records = ["first record", "b", "a third, longer record than the others"]
    tokens, lengths, _ = tokenize_records(records, context_length=CONTEXT)
    metrics = make_lm_evaluator(model.apply, context_length=CONTEXT, batch_size=2)(
        params, tokens, lengths)
    logp = _log_softmax(apply(tokens[:, :-1]))
    nll, correct, count = 0.0, 0, 0
    for row in range(3):
        for i in range(lengths[row] - 1):
            nll -= logp[row, i, tokens[row, i + 1]]
            correct += int(np.argmax(logp[row, i]) == tokens[row, i + 1])
            count += 1
    assert metrics["num_tokens"] == count == 13 + 2 + 16  # the third is cut to 17 tokens
    np.testing.assert_allclose(metrics["bits_per_byte"], nll / count / math.log(2), rtol=1e-5)
    assert metrics["accuracy"] == correct / count


def test_generate_with_cache_equals_greedy_full_forward(small, apply):
    model, params = small
    prompt, steps = "PIN ", 8
    ids = list(encode(prompt)[:-1])
    for _ in range(steps):  # causal: padding after the last token does not change its logits
        padded = np.full((1, CONTEXT), PAD, np.int32)
        padded[0, :len(ids)] = ids
        ids.append(int(np.argmax(apply(padded)[0, len(ids) - 1])))
    new = ids[len(encode(prompt)) - 1:]
    stops = [i for i, t in enumerate(new) if t >= 257]  # EOS or PAD ends a sample
    new = new[:stops[0]] if stops else new
    expected = bytes(t for t in new if t < 256).decode("utf-8", errors="replace")
    assert generate(model, params, prompt, max_new_tokens=steps) == [expected]
    sampled = generate(model, params, prompt, max_new_tokens=steps, temperature=1.0,
                       key=jax.random.PRNGKey(0), num_samples=3)
    assert len(sampled) == 3
    with pytest.raises(ValueError, match="fit in context_length"):
        generate(model, params, prompt, max_new_tokens=CONTEXT - 4)
    with pytest.raises(ValueError, match="PRNG key"):
        generate(model, params, prompt, temperature=0.5)


def test_model_fields_are_validated():
    tokens = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        DecoderLM(width=30, num_heads=4).init(jax.random.PRNGKey(0), tokens)
    with pytest.raises(ValueError, match="positions='alibi'"):
        DecoderLM(positions="alibi").init(jax.random.PRNGKey(0), tokens)
    with pytest.raises(ValueError, match="context_length=8"):
        DecoderLM(**{**SMALL, "context_length": 8}).init(jax.random.PRNGKey(0),
                                                          jnp.zeros((1, 9), jnp.int32))
    with pytest.raises(ValueError, match="reduction='max'"):
        lm_loss(None, context_length=8, reduction="max")
