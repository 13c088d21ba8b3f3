"""Closed choices that decide a privacy guarantee, as enums.

A guarantee-carrying choice (how batches are sampled, which neighbouring relation
the accountant assumes, how clipped sums are aggregated, which noise is added,
which accountant) is one of these values, never a free string compared in
several files: an unknown value fails where it is converted (``Sampling(x)``),
and every branch on it names the member. Performance choices that do not change
the guarantee (the clipping method) live here too, apart, so that configuration
code can list what it accepts without importing the heavy modules.
"""

from __future__ import annotations

import enum


class Sampling(enum.StrEnum):
    """How each step's batch is drawn; decides the neighbouring relation."""

    POISSON = "poisson"  # each example independently with probability q
    FIXED_SIZE = "fixed_size"  # B of N uniformly without replacement, fresh each step


class Relation(enum.StrEnum):
    """Neighbouring datasets the guarantee is stated for."""

    ADD_OR_REMOVE_ONE = "add_or_remove_one"
    REPLACE_ONE = "replace_one"


class Unit(enum.StrEnum):
    """What one neighbour adds, removes or replaces."""

    EXAMPLE = "example"
    USER = "user"  # all of one user's examples (dpjax.federated: a party is a user)


class Accountant(enum.StrEnum):
    """dp-accounting's accountants."""

    RDP = "rdp"
    PLD = "pld"


class Aggregation(enum.StrEnum):
    """How the clipped sums of a step's rows are added up."""

    SUM = "sum"  # in the clear, by whoever runs the step
    SECAGG = "secagg"  # parties' sums through secure aggregation


class Noise(enum.StrEnum):
    """The noise of the mechanism: central Gaussian, or discrete noise each SecAgg party
    adds to its integer vector (distributed DP)."""

    GAUSSIAN = "gaussian"
    SKELLAM = "skellam"
    DDGAUSS = "ddgauss"


class Randomness(enum.StrEnum):
    """Where a run's secret comes from (:mod:`dpjax.randomness`); decides whether the
    run can be replayed by whoever knows its seed."""

    SECURE = "secure"
    SEEDED = "seeded"


class ClippingMethod(enum.StrEnum):
    """How per-example clipping is computed: a performance choice, same guarantee."""

    VMAP = "vmap"
    FAST = "fast"
    # The fast path with two backward passes and the update as its own program: about
    # the memory of non-private training, for one more backward pass.
    FAST_LEAN = "fast_lean"
    AUTO = "auto"


def relation_of(sampling: Sampling | str) -> Relation:
    """The relation a sampler's accounting event is defined for: Poisson subsampling
    amplifies add/remove-one, sampling without replacement replace-one."""
    if Sampling(sampling) is Sampling.POISSON:
        return Relation.ADD_OR_REMOVE_ONE
    return Relation.REPLACE_ONE


def contributions_changed(relation: Relation | str) -> int:
    """How many rows' clipped contributions a neighbour changes: one for add/remove-one,
    two (one removed, one added) for replace-one. The sensitivity of a clipped sum under
    ``relation`` is this times the sensitivity of one row; the accountant and the
    mechanism both use this one function."""
    return 1 if Relation(relation) is Relation.ADD_OR_REMOVE_ONE else 2


def values(choice: type[enum.Enum]) -> tuple[str, ...]:
    """The accepted strings of a choice, for error messages and validation."""
    return tuple(str(member.value) for member in choice)
