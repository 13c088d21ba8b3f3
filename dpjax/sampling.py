"""Batch samplers: index batches padded to one physical size, with masks.

A sampler is a pure function of ``(seed, step)``: the batch of step ``t`` is
the same whenever it is drawn, so a resumed run sees the same data order.
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

from dpjax import _validate


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


def _rng(seed: int, step: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, step]))


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
    seed: int = 0
    sampling = "poisson"

    def __post_init__(self):
        _validate.positive_int("num_examples", self.num_examples)
        _validate.sample_rate("sample_rate", self.sample_rate)
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
        """The chunks of step ``step``: one in the common case, more on overflow."""
        included = _rng(self.seed, step).random(self.num_examples) < self.sample_rate
        return _pad_chunks(np.flatnonzero(included), self.physical_batch_size)


@dataclasses.dataclass(frozen=True)
class FixedSizeSampler:
    """``batch_size`` distinct examples drawn uniformly, independently each step."""

    num_examples: int
    batch_size: int
    seed: int = 0
    sampling = "fixed_size"

    def __post_init__(self):
        _validate.positive_int("num_examples", self.num_examples)
        _validate.positive_int("batch_size", self.batch_size)
        if self.batch_size > self.num_examples:
            raise ValueError(
                f"Expected batch_size={self.batch_size} <= num_examples={self.num_examples}."
            )

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
        chosen = _rng(self.seed, step).choice(self.num_examples, self.batch_size, replace=False)
        return _pad_chunks(np.sort(chosen), self.batch_size)
