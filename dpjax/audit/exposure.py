"""Secret Sharer exposure of canaries (Carlini, Liu, Erlingsson, Kos, Song 2019).

For a canary ``prefix + secret`` with the secret from the candidate space R
(``alphabet ** secret_length``), the log-perplexity of a candidate ``s`` is
``Px(s) = -sum_i log2 p(s_i | prefix, s_<i)`` (bits), its rank is
``|{r in R : Px(r) <= Px(s)}|`` (ties count against the canary, as in the
paper's definition; rank 1 = most likely), and

    exposure(s) = log2 |R| - log2 rank(s)        (in [0, log2 |R|]).

A secret the model knows nothing about has a uniformly random rank, so its
exposure has mean ``log2|R| - log2(|R|!)/|R|``, about ``1/ln 2 = 1.44`` bits.

Enumeration (:func:`make_candidate_scorer`) scores all of R with a prefix
trie and a key/value cache: the shared prefix runs once; level ``k`` of the
trie runs the ``A^k`` nodes' last character as one new position each
(``A = len(alphabet)``), attending to the cached prefix and to the node's
ancestors' cached keys, in chunks of at most ``max_chunk`` nodes. For 6-digit
PINs that is ``10 + 100 + ... + 10^5 ~ 1.1e5`` one-token steps instead of
``10^6`` full sequences; running each level as full ``prefix + digits``
sequences would cost about ``len(prefix)`` times more.

Extrapolation (:func:`extrapolated_exposure`), for spaces too large to
enumerate: fit a skew-normal distribution to the log-perplexities of
uniformly sampled candidates and take ``-log2 CDF(Px(secret))`` (the paper's
approximation by distribution modeling).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dpjax.data.canaries import Canary, CanarySet, check_alphabet, secret_index
from dpjax.data.text import encode
from dpjax.models.transformer import DecoderLM

PyTree = Any
METHODS = ("enumerate", "extrapolate")
MAX_ENUMERATED = 10**8
"""Largest candidate space :func:`make_candidate_scorer` enumerates (0.8 GB of float64 scores)."""


def uniform_rank_exposure_moments(space_size: int) -> tuple[float, float]:
    """Mean and standard deviation of the exposure of a uniformly random rank on 1..|R|.

    The mean is ``log2|R| - log2(|R|!)/|R|`` (exact, via ``lgamma``); the standard
    deviation is summed exactly up to ``|R| = 10^6`` and otherwise its limit
    ``1/ln 2`` (exposure tends to ``-log2 U``, U uniform: exponential with rate ln 2).
    """
    mean = math.log2(space_size) - math.lgamma(space_size + 1) / math.log(2) / space_size
    if space_size > 10**6:
        return mean, 1 / math.log(2)
    exposure = math.log2(space_size) - np.log2(np.arange(1, space_size + 1, dtype=np.float64))
    return mean, float(exposure.std())


def rank_of(scores: np.ndarray, index: int) -> int:
    """``|{r : scores[r] <= scores[index]}|``: 1 for the most likely candidate."""
    scores = np.asarray(scores)
    return int(np.sum(scores <= scores[index]))


def exposure_from_rank(rank: int, space_size: int) -> float:
    """``log2 |R| - log2 rank``."""
    if not 1 <= rank <= space_size:
        raise ValueError(f"Expected rank={rank!r} in [1, {space_size}].")
    return math.log2(space_size) - math.log2(rank)


def extrapolated_exposure(canary_score: float, reference_scores: Sequence[float]) -> float:
    """``-log2 F(canary_score)`` with ``F`` the skew-normal fitted to ``reference_scores``.

    ``reference_scores`` are log-perplexities of candidates drawn uniformly
    from the space (not the canary). The result may exceed ``log2 |R|`` for a
    canary far in the tail: it is an estimate, not a rank.
    """
    from scipy import stats

    reference = np.asarray(reference_scores, np.float64)
    if reference.ndim != 1 or reference.size < 3 or not np.all(np.isfinite(reference)):
        raise ValueError(f"Expected at least 3 finite reference_scores; got shape "
                         f"{reference.shape}.")
    shape, loc, scale = stats.skewnorm.fit(reference)
    return float(-stats.skewnorm.logcdf(canary_score, shape, loc, scale) / math.log(2))


def _prefix_cache(model: DecoderLM, params: PyTree, ids: jax.Array, prefix_len: jax.Array):
    """Runs the padded prefix once: next-token log-probs after it, and its keys/values."""
    capacity = ids.shape[0]
    logits, kv = model.apply({"params": params}, ids[None], jnp.arange(capacity)[None],
                             method=DecoderLM.extend)
    last = jax.lax.dynamic_index_in_dim(logits[0], prefix_len - 1, keepdims=False)
    shared = [(k[0], v[0]) for k, v in kv]
    return jax.nn.log_softmax(last), shared, jnp.arange(capacity) < prefix_len


def _alphabet_tokens(alphabet: str) -> jax.Array:
    check_alphabet(alphabet)
    return jnp.asarray([ord(ch) for ch in alphabet], jnp.int32)


def _prefix_ids(model: DecoderLM, prefix: str, secret_length: int) -> tuple[np.ndarray, int]:
    """``[BOS, prefix bytes]`` padded to ``context_length``, and its length."""
    ids = encode(prefix)[:-1]
    if len(ids) + secret_length - 1 > model.context_length:
        raise ValueError(f"Expected the prefix ({len(ids)} tokens with BOS) and secret_length="
                         f"{secret_length} - 1 to fit in context_length={model.context_length}.")
    padded = np.zeros(model.context_length, np.int32)
    padded[:len(ids)] = ids
    return padded, len(ids)


def _node_offsets(base: int, secret_length: int) -> list[int]:
    """``offsets[j]``: where the depth-``j`` trie nodes start in the key/value store."""
    offsets = [0, 0]
    for depth in range(1, secret_length - 1):
        offsets.append(offsets[-1] + base**depth)
    return offsets


def make_candidate_scorer(
    model: DecoderLM, *, alphabet: str, secret_length: int, max_chunk: int = 10_000
) -> Callable[[PyTree, str], np.ndarray]:
    """``score(params, prefix) -> Px [len(alphabet) ** secret_length]`` in bits, by trie.

    Entry ``i`` is the log-perplexity of the secret with index ``i``
    (:func:`dpjax.data.canaries.secret_index`) given ``[BOS] + prefix``.

    Every trie level runs in chunks of ``c = min(max_chunk, A^(L-1))`` nodes
    through one compiled step of fixed shapes (ancestors padded to ``L - 2``
    and masked), so compilation does not grow with ``secret_length`` and is
    shared by every prefix; levels smaller than ``c`` are padded (for 6-digit
    PINs and ``c = 10^4``: 1.4e5 token steps run for the 1.1e5 needed). Keys
    and values of depths ``1..L-2`` stay in one device buffer; log-probs are
    summed on the host in float64.
    """
    alpha = _alphabet_tokens(alphabet)
    base = len(alphabet)
    if isinstance(secret_length, bool) or not isinstance(secret_length, int) or (
            secret_length < 1):
        raise ValueError(f"Expected secret_length={secret_length!r} to be an integer >= 1.")
    if isinstance(max_chunk, bool) or not isinstance(max_chunk, int) or max_chunk < 1:
        raise ValueError(f"Expected max_chunk={max_chunk!r} to be an integer >= 1.")
    if base**secret_length > MAX_ENUMERATED:
        raise ValueError(f"Expected at most {MAX_ENUMERATED:.0e} candidates to enumerate; "
                         f"{alphabet!r} ** {secret_length} has {base**secret_length:.1e}. Use "
                         "extrapolation (method='extrapolate') for larger spaces.")
    chunk = min(max_chunk, base ** (secret_length - 1))
    offsets = _node_offsets(base, secret_length)
    stored = offsets[-1] + (base ** (secret_length - 2) if secret_length > 2 else 0)
    slots = max(secret_length - 2, 0)
    heads, dim = model.num_heads, model.width // model.num_heads
    buffer_shape = (model.num_layers, 2, stored + chunk, heads, dim)

    host_alpha = np.asarray(alpha)

    @jax.jit
    def prefix(params, ids, prefix_len):
        """The prefix's cache, the first character's NLL and an empty key/value store."""
        first, shared, shared_mask = _prefix_cache(model, params, ids, prefix_len)
        return -first[alpha], shared, shared_mask, jnp.zeros(buffer_shape)

    @jax.jit
    def step(params, shared, shared_mask, buffer, tokens, ancestors, ancestor_mask, positions):
        past = [(buffer[layer, 0][ancestors], buffer[layer, 1][ancestors])
                for layer in range(model.num_layers)]
        out, new = model.apply({"params": params}, tokens[:, None], positions[:, None], past,
                               ancestor_mask, shared, shared_mask, method=DecoderLM.extend)
        logp = jax.nn.log_softmax(out[:, 0])[:, alpha]
        return logp, jnp.stack([jnp.stack([k[:, 0], v[:, 0]]) for k, v in new])

    @functools.partial(jax.jit, donate_argnums=0)
    def write(buffer, new, offset):
        return jax.lax.dynamic_update_slice_in_dim(buffer, new, offset, axis=2)

    def score(params: PyTree, prefix_text: str) -> np.ndarray:
        ids, n = _prefix_ids(model, prefix_text, secret_length)
        first, shared, shared_mask, buffer = prefix(params, ids, np.int32(n))
        nll = np.asarray(first, np.float64)
        for depth in range(1, secret_length):
            size = base**depth
            children = np.empty((size, base), np.float64)
            for start in range(0, size, chunk):
                nodes = start + np.arange(chunk)
                anc = np.zeros((chunk, slots), np.int32)
                for j in range(1, depth):
                    anc[:, j - 1] = offsets[j] + np.minimum(nodes, size - 1) // base ** (depth - j)
                mask = np.broadcast_to(np.arange(slots) < depth - 1, (chunk, slots))
                logp, new = step(params, shared, shared_mask, buffer, host_alpha[nodes % base],
                                 anc, mask, np.full(chunk, n + depth - 1, np.int32))
                real = min(chunk, size - start)
                children[start:start + real] = np.asarray(logp, np.float64)[:real]
                if depth < secret_length - 1:
                    buffer = write(buffer, new, offsets[depth] + start)
            nll = (nll[:, None] - children).reshape(-1)
        return nll / math.log(2)

    return score


def make_secret_scorer(
    model: DecoderLM, *, alphabet: str, secret_length: int, batch_size: int = 1024
) -> Callable[[PyTree, str, np.ndarray], np.ndarray]:
    """``score(params, prefix, secrets) -> Px`` (bits) of given secrets, in batches.

    ``secrets`` is ``[M, secret_length]`` of character positions in
    ``alphabet`` (any space size: no index arithmetic). For sampled candidates
    (extrapolation): the prefix runs once per batch of ``batch_size`` secrets,
    each secret's characters as one cached extension.
    """
    alpha = _alphabet_tokens(alphabet)
    host_alpha = np.asarray(alpha)
    base = len(alphabet)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"Expected batch_size={batch_size!r} to be an integer >= 1.")

    @jax.jit
    def scores(params, ids, prefix_len, chars):
        first, shared, shared_mask = _prefix_cache(model, params, ids, prefix_len)
        nll = -first[chars[:, 0]]
        if secret_length > 1:
            n = chars.shape[0]
            positions = prefix_len + jnp.broadcast_to(jnp.arange(secret_length - 1),
                                                      (n, secret_length - 1))
            empty = jnp.zeros((n, 0, model.num_heads, model.width // model.num_heads))
            out, _ = model.apply({"params": params}, chars[:, :-1], positions,
                                 [(empty, empty)] * model.num_layers, jnp.ones((n, 0), bool),
                                 shared, shared_mask, method=DecoderLM.extend)
            logp = jax.nn.log_softmax(out, axis=-1)
            nll = nll - jnp.sum(jnp.take_along_axis(logp, chars[:, 1:, None], -1)[..., 0], -1)
        return nll / math.log(2)

    def score(params: PyTree, prefix: str, secrets: np.ndarray) -> np.ndarray:
        ids, n = _prefix_ids(model, prefix, secret_length)
        secrets = np.asarray(secrets)
        if (secrets.ndim != 2 or secrets.shape[1] != secret_length
                or not np.issubdtype(secrets.dtype, np.integer)
                or (secrets.size and (secrets.min() < 0 or secrets.max() >= base))):
            raise ValueError(f"Expected secrets of shape [M, {secret_length}] with integers in "
                             f"[0, {base}); got {secrets.dtype} {secrets.shape}.")
        out = []
        for start in range(0, len(secrets), batch_size):
            part = secrets[start:start + batch_size]
            padded = np.zeros((batch_size, secret_length), np.int32)
            padded[:len(part)] = host_alpha[part]
            padded[len(part):] = host_alpha[0]
            out.append(np.asarray(scores(params, ids, np.int32(n), padded))[:len(part)])
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0)

    return score


@dataclasses.dataclass(frozen=True)
class ExposureReport:
    """Exposure of every canary of a :class:`~dpjax.data.canaries.CanarySet`, in bits.

    ``by_repetitions[r]`` holds the exposures of the canaries inserted ``r``
    times; ``fresh`` those of never-inserted canaries (the null distribution).
    """

    method: str
    space_size: int
    by_repetitions: dict[int, tuple[float, ...]]
    fresh: tuple[float, ...]

    @property
    def max_exposure(self) -> float:
        return math.log2(self.space_size)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: per repetition count and for the fresh canaries, mean and values."""
        null_mean, null_std = uniform_rank_exposure_moments(self.space_size)

        def summary(values: tuple[float, ...]) -> dict[str, Any]:
            return {"mean": float(np.mean(values)) if values else None,
                    "exposures": [float(v) for v in values]}

        return {
            "method": self.method,
            "space_size": self.space_size,
            "max_exposure": self.max_exposure,
            "by_repetitions": {str(r): summary(v) for r, v in sorted(self.by_repetitions.items())},
            "fresh": {**summary(self.fresh),
                      "std": float(np.std(self.fresh)) if self.fresh else None},
            "uniform_rank_mean": null_mean,
            "uniform_rank_std": null_std,
        }


def measure_exposure(
    model: DecoderLM,
    params: PyTree,
    canaries: CanarySet,
    *,
    method: str = "enumerate",
    num_references: int = 4096,
    seed: int = 0,
    max_chunk: int = 10_000,
    batch_size: int = 1024,
) -> ExposureReport:
    """Exposure of each inserted and fresh canary under ``model`` with ``params``.

    ``"enumerate"`` ranks each secret among all ``|R|`` candidates
    (:func:`make_candidate_scorer`); ``"extrapolate"`` scores ``num_references``
    uniform candidates per canary (``default_rng(seed)``) and fits a skew-normal.
    """
    if method not in METHODS:
        raise ValueError(f"Expected method={method!r} to be one of {list(METHODS)}.")
    space = canaries.space_size
    if method == "enumerate":
        scorer = make_candidate_scorer(model, alphabet=canaries.alphabet,
                                       secret_length=canaries.secret_length, max_chunk=max_chunk)

        def exposure(canary: Canary) -> float:
            scores = scorer(params, canary.prefix)
            index = secret_index(canary.secret, canaries.alphabet)
            return exposure_from_rank(rank_of(scores, index), space)
    else:
        if isinstance(num_references, bool) or not isinstance(num_references, int) or (
                num_references < 3):
            raise ValueError(f"Expected num_references={num_references!r} to be an integer "
                             ">= 3.")
        scorer = make_secret_scorer(model, alphabet=canaries.alphabet,
                                    secret_length=canaries.secret_length, batch_size=batch_size)
        rng = np.random.default_rng(seed)
        length, base = canaries.secret_length, len(canaries.alphabet)

        def exposure(canary: Canary) -> float:
            reference = rng.integers(0, base, (num_references, length))
            secret = np.asarray([[canaries.alphabet.index(ch) for ch in canary.secret]])
            scores = scorer(params, canary.prefix, np.concatenate([secret, reference]))
            return extrapolated_exposure(scores[0], scores[1:])

    by_repetitions: dict[int, list[float]] = {}
    for canary in canaries.inserted:
        by_repetitions.setdefault(canary.repetitions, []).append(exposure(canary))
    fresh = tuple(exposure(c) for c in canaries.fresh)
    return ExposureReport(method=method, space_size=space,
                          by_repetitions={r: tuple(v) for r, v in by_repetitions.items()},
                          fresh=fresh)
