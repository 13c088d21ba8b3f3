"""Canaries for the Secret Sharer exposure audit (Carlini et al. 2019).

A canary is a record ``prefix + secret``, e.g. ``"the PIN of Ana Diaz is 583910"``:
the secret is drawn uniformly from the candidate space ``alphabet ** secret_length``
(10^6 six-digit PINs by default). Inserted canaries go into the private
training split ``r`` times each (``r`` in ``repetitions``, default 1, 4, 16);
fresh canaries, drawn the same way, are never inserted and give the null
distribution of exposure. Each copy is its own record, i.e. its own unit of
privacy: a canary repeated ``r`` times is protected only by group privacy of
size ``r``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

import dpjax.data._checks as _checks

DEFAULT_TEMPLATE = "the PIN of {name} is "
DEFAULT_ALPHABET = "0123456789"


@dataclasses.dataclass(frozen=True)
class Canary:
    """One canary: ``prefix + secret``; ``repetitions`` copies inserted (0: fresh)."""

    prefix: str
    secret: str
    repetitions: int

    @property
    def text(self) -> str:
        return self.prefix + self.secret


@dataclasses.dataclass(frozen=True)
class CanarySet:
    """The inserted and the fresh canaries of one audit, and how they were drawn.

    Attributes:
      inserted: canaries put into the training split (``repetitions >= 1``).
      fresh: never-inserted canaries (``repetitions == 0``) for the null distribution.
      alphabet: the secret's characters (each one ASCII byte, i.e. one token).
      secret_length: characters per secret; the candidate space has
        ``len(alphabet) ** secret_length`` secrets.
      seed: the seed of the names, the secrets and the insertion positions.
    """

    inserted: tuple[Canary, ...]
    fresh: tuple[Canary, ...]
    alphabet: str
    secret_length: int
    seed: int

    def __post_init__(self) -> None:
        check_alphabet(self.alphabet)
        _checks.int_at_least("secret_length", self.secret_length, 1)
        for c in self.inserted + self.fresh:
            if len(c.secret) != self.secret_length or set(c.secret) - set(self.alphabet):
                raise ValueError(f"Expected canary secret {c.secret!r} to be "
                                 f"{self.secret_length} characters of {self.alphabet!r}.")
        if any(c.repetitions < 1 for c in self.inserted):
            raise ValueError("Expected every inserted canary to have repetitions >= 1.")
        if any(c.repetitions != 0 for c in self.fresh):
            raise ValueError("Expected every fresh canary to have repetitions == 0.")

    @property
    def space_size(self) -> int:
        """``|R| = len(alphabet) ** secret_length``."""
        return len(self.alphabet) ** self.secret_length


def check_alphabet(alphabet: str) -> None:
    """Distinct printable ASCII characters (one byte token each), at least two."""
    if (not isinstance(alphabet, str) or len(alphabet) < 2 or len(set(alphabet)) != len(alphabet)
            or not all(32 <= ord(ch) < 127 for ch in alphabet)):
        raise ValueError(f"Expected alphabet={alphabet!r} to be at least 2 distinct printable "
                         "ASCII characters.")


def secret_index(secret: str, alphabet: str) -> int:
    """The secret's index in the candidate space: its digits in base ``len(alphabet)``."""
    base = len(alphabet)
    index = 0
    for ch in secret:
        index = index * base + alphabet.index(ch)
    return index


def index_secret(index: int, alphabet: str, secret_length: int) -> str:
    """The inverse of :func:`secret_index`."""
    base = len(alphabet)
    chars = []
    for _ in range(secret_length):
        index, digit = divmod(index, base)
        chars.append(alphabet[digit])
    return "".join(reversed(chars))


def make_canaries(
    *,
    seed: int,
    repetitions: Sequence[int] = (1, 4, 16),
    canaries_per_repetition: int = 1,
    num_fresh: int = 16,
    secret_length: int = 6,
    alphabet: str = DEFAULT_ALPHABET,
    template: str = DEFAULT_TEMPLATE,
) -> CanarySet:
    """Draws the canaries: distinct fake names, distinct uniform secrets.

    ``canaries_per_repetition`` canaries are made for each count in
    ``repetitions``, plus ``num_fresh`` fresh ones. Each secret is uniform on
    the candidate space (independent uniform characters), drawn with numpy's
    ``default_rng(seed)``; names come from ``faker`` seeded with ``seed``.
    """
    from faker import Faker

    _checks.seed("seed", seed)
    check_alphabet(alphabet)
    _checks.int_at_least("secret_length", secret_length, 1)
    _checks.int_at_least("canaries_per_repetition", canaries_per_repetition, 1)
    _checks.int_at_least("num_fresh", num_fresh, 0)
    if isinstance(repetitions, str) or not all(_checks.is_int(r) and r >= 1
                                               for r in repetitions):
        raise ValueError(f"Expected repetitions={repetitions!r} to be a sequence of integers "
                         ">= 1.")
    if not isinstance(template, str) or template.count("{name}") != 1:
        raise ValueError(f"Expected template={template!r} to contain '{{name}}' once.")
    counts = [int(r) for r in repetitions for _ in range(canaries_per_repetition)]
    total = len(counts) + num_fresh
    space = len(alphabet) ** secret_length
    if total > space:
        raise ValueError(f"Expected at most {space} canaries (the candidate space); asked for "
                         f"{total}.")
    fake = Faker("en_US")
    fake.seed_instance(seed)
    names: list[str] = []
    while len(names) < total:
        name = fake.name()
        if name not in names:
            names.append(name)
    rng = np.random.default_rng(seed)
    drawn: list[str] = []
    while len(drawn) < total:
        digits = rng.integers(0, len(alphabet), secret_length)
        secret = "".join(alphabet[d] for d in digits)
        if secret not in drawn:
            drawn.append(secret)
    made = [Canary(template.format(name=n), s, r)
            for n, s, r in zip(names, drawn, counts + [0] * num_fresh, strict=True)]
    return CanarySet(inserted=tuple(made[:len(counts)]), fresh=tuple(made[len(counts):]),
                     alphabet=alphabet, secret_length=secret_length, seed=seed)


def insert_canaries(records: Sequence[str], canaries: CanarySet) -> list[str]:
    """``records`` plus ``repetitions`` copies of each inserted canary, at random positions.

    Every copy is a separate record (one row, one unit of privacy). The
    positions are a permutation drawn from ``default_rng([seed, 1])``.
    """
    copies = [c.text for c in canaries.inserted for _ in range(c.repetitions)]
    combined = list(records) + copies
    order = np.random.default_rng([canaries.seed, 1]).permutation(len(combined))
    return [combined[i] for i in order]
