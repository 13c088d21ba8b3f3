"""Secret Sharer exposure: trie scoring, ranks, null distribution, a memorized canary."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from dpjax.audit.exposure import (
    ExposureReport,
    exposure_from_rank,
    extrapolated_exposure,
    make_candidate_scorer,
    make_secret_scorer,
    measure_exposure,
    rank_of,
    uniform_rank_exposure_moments,
)
from dpjax.data.canaries import make_canaries, secret_index
from dpjax.data.text import encode, load_private_text
from dpjax.models.transformer import DecoderLM, lm_loss

SMALL = dict(context_length=64, num_layers=2, width=32, num_heads=4, mlp_ratio=2)
PREFIX = "the PIN of Ann Lee is "


def _init(model: DecoderLM, seed: int = 0):
    init = jax.jit(model.init)
    return init(jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32))["params"]


ALPHABET, LENGTH = "0123", 5  # 1024 candidates, 4 trie levels (3 ancestor slots)


@pytest.fixture(scope="module")
def random_lm():
    model = DecoderLM(**SMALL)
    return model, _init(model)


@pytest.fixture(scope="module")
def trie(random_lm):
    """One compiled trie scorer; chunks of 128 nodes: levels padded, the last one split."""
    model, _ = random_lm
    return make_candidate_scorer(model, alphabet=ALPHABET, secret_length=LENGTH, max_chunk=128)


def _brute_force_bits(model, params, prefix: str, alphabet: str, length: int) -> np.ndarray:
    """``[|R|, length]``: each candidate's per-character NLL (bits), whole sequences run."""
    ids = encode(prefix)[:-1]
    n = len(alphabet) ** length
    digits = (np.arange(n)[:, None] // len(alphabet) ** np.arange(length)[::-1]) % len(alphabet)
    secret = np.asarray([ord(c) for c in alphabet])[digits]
    seqs = np.concatenate([np.broadcast_to(ids, (n, len(ids))), secret], axis=1).astype(np.int32)
    logits = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(seqs[:, :-1])),
                        np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    p = len(ids)
    rows = np.arange(n)
    terms = [logp[rows, p - 1 + j, seqs[:, p + j]] for j in range(length)]
    return -np.stack(terms, axis=1) / math.log(2)


def test_trie_and_batched_scores_equal_brute_force(random_lm, trie):
    model, params = random_lm
    alphabet, length = ALPHABET, LENGTH
    terms = _brute_force_bits(model, params, PREFIX, alphabet, length)
    expected = terms.sum(axis=1)
    np.testing.assert_allclose(trie(params, PREFIX), expected, rtol=1e-5, atol=1e-4)
    batched = make_secret_scorer(model, alphabet=alphabet, secret_length=length, batch_size=300)
    picks = np.array([0, 5, 1023, 517, 517])
    digits = (picks[:, None] // 4 ** np.arange(length)[::-1]) % 4
    np.testing.assert_allclose(batched(params, PREFIX, digits), expected[picks], rtol=1e-5,
                               atol=1e-4)
    one_char = make_candidate_scorer(model, alphabet=alphabet, secret_length=1)
    np.testing.assert_allclose(one_char(params, PREFIX), terms[::4**4, 0], rtol=1e-5, atol=1e-4)


def test_rank_counts_ties_against_the_canary_and_exposure_is_log2_ratio():
    scores = np.array([3.0, 1.0, 2.0, 2.0])
    assert [rank_of(scores, i) for i in range(4)] == [4, 1, 3, 3]
    assert exposure_from_rank(1, 4) == 2.0 and exposure_from_rank(4, 4) == 0.0
    with pytest.raises(ValueError, match="rank=0"):
        exposure_from_rank(0, 4)


def test_uniform_rank_moments_match_a_direct_sum():
    n = 1000
    exposure = math.log2(n) - np.log2(np.arange(1, n + 1))
    mean, std = uniform_rank_exposure_moments(n)
    assert mean == pytest.approx(exposure.mean(), rel=1e-12)
    assert std == pytest.approx(exposure.std(), rel=1e-12)
    mean, std = uniform_rank_exposure_moments(10**9)
    assert mean == pytest.approx(1 / math.log(2), abs=1e-7) and std == 1 / math.log(2)


def test_random_model_gives_the_uniform_rank_null_distribution(random_lm, trie):
    """400 fresh canaries, |R| = 4^5 = 1024: mean exposure within 4 standard errors.

    With a model that knows nothing about the secret its rank is uniform on
    1..|R|; exposure then has mean log2|R| - log2(|R|!)/|R| = 1.436 and standard
    deviation 1.421 (computed below), so the standard error of the mean is 0.071.
    """
    model, params = random_lm
    num, space = 400, 4**5
    canaries = make_canaries(seed=11, repetitions=(), num_fresh=num, secret_length=LENGTH,
                             alphabet=ALPHABET)
    exposures, ties = [], 0
    for canary in canaries.fresh:
        scores = trie(params, canary.prefix)
        ties += space - len(np.unique(scores))
        rank = rank_of(scores, secret_index(canary.secret, ALPHABET))
        exposures.append(exposure_from_rank(rank, space))
    assert ties < num  # fewer than one tie per canary: ranks are (nearly) uniform
    exact = math.log2(space) - np.log2(np.arange(1, space + 1))
    mean, std = exact.mean(), exact.std()
    assert mean == pytest.approx(1.436, abs=1e-3) and std == pytest.approx(1.421, abs=1e-3)
    assert abs(np.mean(exposures) - mean) < 4 * std / math.sqrt(num)
    assert min(exposures) >= 0 and max(exposures) <= math.log2(space)


@pytest.mark.parametrize("quantile", [1 / 4, 1 / 64])
def test_extrapolation_recovers_a_skew_normal_tail(quantile):
    """5,000 skew-normal scores: the fitted CDF at a known quantile q is within 4 SE of q.

    SE is the empirical CDF's sqrt(q(1-q)/n), an upper bound on the
    parametric fit's standard error when the model is right.
    """
    n = 5000
    dist = stats.skewnorm(4.0, loc=20.0, scale=3.0)
    reference = dist.rvs(size=n, random_state=np.random.default_rng(0))
    estimate = extrapolated_exposure(dist.ppf(quantile), reference)
    assert abs(2.0**-estimate - quantile) < 4 * math.sqrt(quantile * (1 - quantile) / n)
    with pytest.raises(ValueError, match="at least 3 finite"):
        extrapolated_exposure(1.0, [1.0, np.nan, 2.0])


def _train(model, params, tokens, lengths, steps: int, seed: int):
    loss_fn = lm_loss(model.apply, context_length=model.context_length)
    optimizer = optax.adam(3e-3)

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda p: jnp.mean(loss_fn(p, batch)))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = optimizer.init(params)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        rows = rng.integers(0, len(tokens), 32)
        params, opt_state, loss = step(params, opt_state, (jnp.asarray(tokens[rows]),
                                                           jnp.asarray(lengths[rows])))
    return params, float(loss)


@pytest.mark.slow
def test_canary_repeated_16_times_ranks_first_after_nonprivate_training():
    """A 2-layer model, 200 Adam steps of 32 rows on 96 bank messages + 16 canary copies."""
    canaries = make_canaries(seed=3, repetitions=(16,), num_fresh=8, secret_length=4)
    ds = load_private_text(num_records=120, kind="bank", seed=0, context_length=64,
                           canaries=canaries)
    model = DecoderLM(**SMALL)
    params, loss = _train(model, _init(model, 1), ds.train_tokens, ds.train_lengths, 200, 0)
    assert loss < 1.5  # nats per token: it learned the corpus
    report = measure_exposure(model, params, canaries)
    [exposure] = report.by_repetitions[16]
    assert exposure == math.log2(10**4)  # rank 1 of 10^4
    # fresh canaries: uniform rank, mean 1.44, SE 1.44/sqrt(8) = 0.51; 4 SE above
    assert np.mean(report.fresh) < 1.44 + 4 * 0.51
    extrapolated = measure_exposure(model, params, canaries, method="extrapolate",
                                    num_references=2000, seed=0)
    assert extrapolated.by_repetitions[16][0] > math.log2(10**4) - 1
    summary = report.to_dict()
    assert summary["by_repetitions"]["16"]["mean"] == exposure
    assert summary["max_exposure"] == math.log2(10**4)


def test_report_and_argument_errors(random_lm):
    model, params = random_lm
    report = ExposureReport(method="enumerate", space_size=1000,
                            by_repetitions={4: (3.0, 5.0), 1: (1.0,)}, fresh=(1.0, 2.0))
    summary = report.to_dict()
    assert list(summary["by_repetitions"]) == ["1", "4"]
    assert summary["by_repetitions"]["4"] == {"mean": 4.0, "exposures": [3.0, 5.0]}
    assert summary["fresh"]["mean"] == 1.5 and summary["fresh"]["std"] == 0.5
    assert summary["uniform_rank_mean"] == pytest.approx(1.436, abs=1e-3)
    with pytest.raises(ValueError, match="fit in context_length=64"):
        make_candidate_scorer(model, alphabet="01", secret_length=3)(params, "x" * 70)
    with pytest.raises(ValueError, match="method='guess'"):
        measure_exposure(model, params, make_canaries(seed=0, secret_length=2, num_fresh=1),
                         method="guess")
    with pytest.raises(ValueError, match="alphabet"):
        make_candidate_scorer(model, alphabet="0é", secret_length=2)
    with pytest.raises(ValueError, match="method='extrapolate'"):
        make_candidate_scorer(model, alphabet="0123456789", secret_length=16)
    with pytest.raises(ValueError, match=r"secrets of shape \[M, 3\]"):
        make_secret_scorer(model, alphabet="01", secret_length=3)(params, "x", np.ones((2, 2)))
