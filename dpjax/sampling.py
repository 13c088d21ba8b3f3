"""Batch samplers: index batches padded to one physical size, with masks.

A sampler is a pure function of ``(secret, step)``: the batch of step ``t`` is
the stream ``(SAMPLING, t)`` of the run's 256-bit secret (ChaCha20, see
:mod:`dpjax.randomness`), the same whenever it is drawn, so a resumed run sees
the same data order. Without the secret the batches cannot be replayed. Given a
``seed`` instead, the sampler uses ``seeded_secret(seed)``: reproducible, and
replayable by anyone who knows the seed.
Every chunk has the same shape ``[physical_batch_size]``, so a jitted step
compiles once; padded rows have ``mask = 0``.

- :class:`PoissonSampler`: each example is included independently with
  probability ``sample_rate`` (what the Poisson accountant assumes). A batch
  larger than the physical size is split into several chunks whose clipped sums
  the caller adds before drawing noise once; nothing is ever truncated. With
  ``num_parties = n > 1`` (secure aggregation at example level) example ``i``
  belongs to the fixed shard ``i mod n``, and every chunk is party-major: rows
  ``[p r, (p + 1) r)`` hold party ``p``'s sampled examples, so adding or
  removing one example changes only its own party's rows.
- :class:`FixedSizeSampler`: ``batch_size`` examples uniformly without
  replacement, independently each step (replace-one accounting).

Shuffled epochs are deliberately not offered: their guarantee is not what
either accountant computes.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

import dpjax._validate as _validate
from dpjax.randomness import Secret, Stream, host_secret_words, host_uniform, host_words
from dpjax.randomness import StreamKey as _StreamKey
from dpjax.randomness import seeded_secret as _seeded_secret


@dataclasses.dataclass(frozen=True)
class Chunk:
    """``indices [P]`` into the dataset and ``mask [P]`` (1 = real row, 0 = padding)."""

    indices: np.ndarray
    mask: np.ndarray


def default_physical_batch_size(num_examples: int, sample_rate: float, multiple: int = 8) -> int:
    """Expected batch size plus 3 standard deviations, rounded up to ``multiple``.

    A Poisson batch overflows it (and takes a second chunk) in about 0.1% of steps.
    """
    mean = sample_rate * num_examples
    size = math.ceil(mean + 3 * math.sqrt(mean * (1 - sample_rate)))
    size = max(1, min(size, num_examples))
    return multiple * math.ceil(size / multiple)


THIRD_CHUNK_PROBABILITY = 1e-12  # per party and step, at the default rows


def default_party_rows(num_examples: int, sample_rate: float, num_parties: int) -> int:
    """Rows per party of a sharded Poisson chunk: the largest shard's expected count plus 3
    binomial standard deviations, rounded up (at least 1, at most the shard's size).

    Shard ``p`` holds the examples ``i`` with ``i mod num_parties == p``; the largest has
    ``ceil(N / n)`` of them, so each party overflows into a second chunk in 0.1-0.4% of
    steps (the binomial tail beyond 3 sigma: 0.13% for a Gaussian, more for the skewed
    binomial of a small expected count), independently of the others. ``r`` is raised
    until needing a third chunk (more than ``2 r`` sampled: distributed noise refuses such
    a step, ``DistributedNoiseSum.max_chunks``) has probability at most
    ``THIRD_CHUNK_PROBABILITY = 1e-12`` per party and step by a Chernoff bound; this binds
    only for small expected counts (``m`` below ~10: e.g. ``r = 8`` at ``m = 1``).

    Compute cost: with ``m = q N / n`` expected rows per party, a chunk has about
    ``n (m + 3 sqrt(m))`` rows against ``n m + 3 sqrt(n m)`` for the unsharded default
    (:func:`default_physical_batch_size`): every party pays its own margin. At ``q N = 256``
    and ``n = 16`` that is ``16 x 28 = 448`` rows against 304 (1.47x); at ``n = 4``,
    ``4 x 88 = 352`` (1.16x).
    """
    _validate.positive_int("num_examples", num_examples)
    _validate.sample_rate("sample_rate", sample_rate)
    _validate.positive_int("num_parties", num_parties)
    shard = math.ceil(num_examples / num_parties)
    mean = sample_rate * shard
    rows = math.ceil(mean + 3 * math.sqrt(mean * (1 - sample_rate)))
    while _third_chunk_bound(mean, 2 * rows + 1) > THIRD_CHUNK_PROBABILITY:
        rows += 1
    return max(1, min(rows, shard))


def _third_chunk_bound(mean: float, count: int) -> float:
    """Chernoff: ``P(X >= count) <= e^-m (e m / count)^count`` for a binomial ``X`` of mean
    ``m < count`` (its mgf is below the Poisson's)."""
    if count <= mean:
        return 1.0
    return math.exp(-mean + count * (1 + math.log(mean / count)))


def _source_words(seed: int | None, secret: Secret | None) -> np.ndarray:
    """The sampler's secret words: ``secret``, else the seeded-mode secret of ``seed``."""
    if secret is not None:
        return host_secret_words(secret)
    if seed is None:
        raise ValueError("Expected a seed or a secret for the sampler; got neither.")
    return host_secret_words(_seeded_secret(seed))


def _step_key(words: np.ndarray, step: int) -> _StreamKey:
    if isinstance(step, bool) or not isinstance(step, int | np.integer) or not 0 <= step < 2**32:
        raise ValueError(f"Expected step={step!r} to be an integer in [0, 2^32).")
    nonce = np.array([int(Stream.SAMPLING), int(step), 0], np.uint32)
    return _StreamKey(words, nonce)


def _pad_chunks(selected: np.ndarray, physical_batch_size: int) -> list[Chunk]:
    n_chunks = max(1, math.ceil(len(selected) / physical_batch_size))
    total = n_chunks * physical_batch_size
    indices = np.zeros(total, np.int32)
    mask = np.zeros(total, np.float32)
    indices[: len(selected)] = selected
    mask[: len(selected)] = 1.0
    return [
        Chunk(indices[i : i + physical_batch_size], mask[i : i + physical_batch_size])
        for i in range(0, total, physical_batch_size)
    ]


def _shard_chunks(selected: np.ndarray, physical_batch_size: int,
                  num_parties: int) -> list[Chunk]:
    """``selected`` (sorted indices) packed party-major: party ``p = i mod num_parties`` fills
    rows ``[p r, (p + 1) r)`` of chunk 0, then the same rows of chunk 1, ..., in index order
    (``r = physical_batch_size // num_parties``). Whether a row is filled, and by which
    example, depends only on the sampled examples of that row's own party. With one party
    this is :func:`_pad_chunks`."""
    rows = physical_batch_size // num_parties
    party = selected % num_parties
    order = np.argsort(party, kind="stable")  # by party; index order kept within a party
    counts = np.bincount(party, minlength=num_parties)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(len(selected), np.int64)
    rank[order] = np.arange(len(selected)) - np.repeat(starts, counts)
    n_chunks = max(1, math.ceil(int(counts.max(initial=0)) / rows))
    position = (rank // rows) * physical_batch_size + party * rows + rank % rows
    indices = np.zeros(n_chunks * physical_batch_size, np.int32)
    mask = np.zeros(n_chunks * physical_batch_size, np.float32)
    indices[position] = selected
    mask[position] = 1.0
    return [
        Chunk(indices[i : i + physical_batch_size], mask[i : i + physical_batch_size])
        for i in range(0, len(indices), physical_batch_size)
    ]


@dataclasses.dataclass(frozen=True)
class PoissonSampler:
    """Poisson sampling with rate ``sample_rate`` over ``num_examples`` examples.

    ``num_parties > 1``: the chunks are split among that many parties by fixed shards
    (example ``i`` in party ``i mod num_parties``, see :func:`_shard_chunks`); the default
    physical size is then ``num_parties * default_party_rows(...)``. Guarantee: the sampled
    set does not depend on ``num_parties``, and adding or removing one example changes only
    the rows (indices and masks, in every chunk) of that example's own party.
    """

    num_examples: int
    sample_rate: float
    physical_batch_size: int | None = None
    seed: int | None = 0
    secret: Secret | None = dataclasses.field(default=None, compare=False)
    num_parties: int = 1
    sampling = "poisson"

    def __post_init__(self):
        _validate.positive_int("num_examples", self.num_examples)
        _validate.sample_rate("sample_rate", self.sample_rate)
        _validate.positive_int("num_parties", self.num_parties)
        if self.physical_batch_size is None:
            size = (default_physical_batch_size(self.num_examples, self.sample_rate)
                    if self.num_parties == 1 else self.num_parties * default_party_rows(
                        self.num_examples, self.sample_rate, self.num_parties))
            object.__setattr__(self, "physical_batch_size", size)
        _validate.positive_int("physical_batch_size", self.physical_batch_size)
        if self.physical_batch_size % self.num_parties:
            raise ValueError(
                f"Expected physical_batch_size={self.physical_batch_size} to be a multiple of "
                f"num_parties={self.num_parties}: every party holds an equal block of rows."
            )
        object.__setattr__(self, "_words", _source_words(self.seed, self.secret))

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * self.num_examples

    def sample(self, step: int) -> list[Chunk]:
        """The chunks of step ``step``: one in the common case, more on overflow.

        Example ``i`` is included iff ``u_i < sample_rate`` for ``u_i`` uniform
        with 53 bits from the stream ``(SAMPLING, step)``: independently, with
        probability ``sample_rate`` up to ``2^-53``.
        """
        return _shard_chunks(self.selected(step), self.physical_batch_size, self.num_parties)

    def selected(self, step: int) -> np.ndarray:
        """The sorted indices of the examples step ``step`` includes (before packing)."""
        u = host_uniform(_step_key(self._words, step), self.num_examples)
        return np.flatnonzero(u < self.sample_rate)


@dataclasses.dataclass(frozen=True)
class FixedSizeSampler:
    """``batch_size`` distinct examples drawn uniformly, independently each step."""

    num_examples: int
    batch_size: int
    seed: int | None = 0
    secret: Secret | None = dataclasses.field(default=None, compare=False)
    sampling = "fixed_size"

    def __post_init__(self):
        _validate.positive_int("num_examples", self.num_examples)
        _validate.positive_int("batch_size", self.batch_size)
        if self.batch_size > self.num_examples:
            raise ValueError(
                f"Expected batch_size={self.batch_size} <= num_examples={self.num_examples}."
            )
        object.__setattr__(self, "_words", _source_words(self.seed, self.secret))

    @property
    def sample_rate(self) -> float:
        return self.batch_size / self.num_examples

    @property
    def physical_batch_size(self) -> int:
        return self.batch_size

    @property
    def expected_batch_size(self) -> float:
        return float(self.batch_size)

    def sample(self, step: int) -> list[Chunk]:
        """The ``batch_size`` examples with the smallest 64-bit keys of the stream
        ``(SAMPLING, step)``: a uniform subset (up to ties of 64-bit keys, probability
        below ``N^2 / 2^65``, broken by index)."""
        words = host_words(_step_key(self._words, step), 2 * self.num_examples).astype(np.uint64)
        keys = (words[0::2] << np.uint64(32)) | words[1::2]
        chosen = np.argpartition(keys, self.batch_size - 1)[: self.batch_size]
        return _pad_chunks(np.sort(chosen), self.batch_size)
