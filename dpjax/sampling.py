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
  the caller adds before drawing noise once; nothing is ever truncated.
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


@dataclasses.dataclass(frozen=True)
class PoissonSampler:
    """Poisson sampling with rate ``sample_rate`` over ``num_examples`` examples."""

    num_examples: int
    sample_rate: float
    physical_batch_size: int | None = None
    seed: int | None = 0
    secret: Secret | None = dataclasses.field(default=None, compare=False)
    sampling = "poisson"

    def __post_init__(self):
        _validate.positive_int("num_examples", self.num_examples)
        _validate.sample_rate("sample_rate", self.sample_rate)
        object.__setattr__(self, "_words", _source_words(self.seed, self.secret))
        if self.physical_batch_size is None:
            object.__setattr__(
                self,
                "physical_batch_size",
                default_physical_batch_size(self.num_examples, self.sample_rate),
            )
        _validate.positive_int("physical_batch_size", self.physical_batch_size)

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * self.num_examples

    def sample(self, step: int) -> list[Chunk]:
        """The chunks of step ``step``: one in the common case, more on overflow.

        Example ``i`` is included iff ``u_i < sample_rate`` for ``u_i`` uniform
        with 53 bits from the stream ``(SAMPLING, step)``: independently, with
        probability ``sample_rate`` up to ``2^-53``.
        """
        u = host_uniform(_step_key(self._words, step), self.num_examples)
        included = u < self.sample_rate
        return _pad_chunks(np.flatnonzero(included), self.physical_batch_size)


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
