"""User sampling into a fixed number of party slots per round.

Each round ``t`` (a round is one DP step), every user is included independently
with probability ``sample_rate`` -- the same :class:`~dpjax.sampling.PoissonSampler`
as DP-SGD's, over users instead of examples, reading the stream
``(SAMPLING, t, 0)`` of the run's secret. The sampled users fill ``num_slots``
slots; the rest are *empty slots* (slot mask 0), which contribute exactly zero
to the sum (and, in distributed DP, are noise-only parties). ``num_slots`` is
public (from ``sample_rate``, the number of users and a tail bound:
:func:`default_num_slots`), so no shape, party count or noise share depends on
how many users were sampled. More sampled users than slots (about 0.1% of rounds
at the default) is never truncated: the users spill into further *slot chunks*
of the same shape, whose per-slot sums the step adds before its one aggregation
round and its one noise draw (:meth:`dpjax.train.DPStep.run`); with SecAgg, slot
``s`` of every chunk is the same party, which then holds several users' clipped
updates and rounds each on its own (the chunks' partials reach the aggregation
stacked: ``stacks_chunks``).

Each slot carries its user's examples, padded to ``rows_per_slot`` rows (public:
the config's cap per user, rounded up to whole local batches; never the largest
user's size, which is private). A user with more examples than the cap
``max_examples`` trains on a random subset of ``max_examples`` of them, fresh
each round; every user's examples are in a random order, fresh each round. Both
come from the stream ``(SAMPLING, t, 1 + u)`` of the run's secret for user
``u``: a function of the round and the user only, never of which other users
were sampled. (The guarantee does not need this order to be secret; drawing it
from the one generator keeps a run a function of its secret and its config.)
"""

from __future__ import annotations

import dataclasses

import numpy as np

import dpjax._validate as _validate
from dpjax.aggregation import simulated_dropped_parties
from dpjax.federated.users import UserPartition
from dpjax.randomness import (
    Secret,
    Stream,
    StreamKey,
    host_secret_words,
    host_uniform,
    seeded_secret,
)
from dpjax.sampling import PoissonSampler, default_physical_batch_size

PyTree = object


def default_num_slots(num_users: int, sample_rate: float) -> int:
    """Expected users per round plus 3 standard deviations (``q U + 3 sqrt(q (1 - q) U)``,
    rounded up, at most ``num_users``): a round overflows into a second slot chunk in
    about 0.1% of rounds. Public: a function of the config only."""
    return default_physical_batch_size(num_users, sample_rate, multiple=1)


@dataclasses.dataclass(frozen=True)
class SlotChunk:
    """One chunk of a round's slots: ``users [S]`` (user ids; 0 in empty slots),
    ``slot_mask [S]`` (1 = a sampled user, 0 = an empty slot), ``examples [S, P]``
    (training-example indices of each slot's user) and ``example_mask [S, P]``
    (1 = a real example, 0 = padding; all 0 in an empty slot)."""

    users: np.ndarray
    slot_mask: np.ndarray
    examples: np.ndarray
    example_mask: np.ndarray


def _check_round(round_index: int) -> int:
    if (isinstance(round_index, bool) or not isinstance(round_index, int | np.integer)
            or not 0 <= round_index < 2**32):
        raise ValueError(f"Expected round_index={round_index!r} to be an integer in [0, 2^32).")
    return int(round_index)


@dataclasses.dataclass(frozen=True)
class UserSampler:
    """Poisson sampling of users with rate ``sample_rate`` into ``num_slots`` slots, each
    holding its user's examples in ``rows_per_slot`` rows (at most ``max_examples`` real).

    Give ``secret`` (the run's :class:`~dpjax.randomness.Secret`), or ``seed`` for the
    replayable seeded mode (``seeded_secret(seed)``), as for
    :class:`~dpjax.sampling.PoissonSampler`.
    """

    partition: UserPartition
    sample_rate: float
    num_slots: int
    max_examples: int
    rows_per_slot: int | None = None
    seed: int | None = 0
    secret: Secret | None = dataclasses.field(default=None, compare=False)
    simulated_dropouts: int = 0  # slots kept empty each round: the parties that drop out
    sampling = "poisson"

    def __post_init__(self):
        _validate.sample_rate("sample_rate", self.sample_rate)
        _validate.positive_int("num_slots", self.num_slots)
        _validate.positive_int("max_examples", self.max_examples)
        if (isinstance(self.simulated_dropouts, bool)
                or not isinstance(self.simulated_dropouts, int)
                or not 0 <= self.simulated_dropouts < self.num_slots):
            raise ValueError(f"Expected simulated_dropouts={self.simulated_dropouts!r} to be "
                             f"an integer in [0, num_slots={self.num_slots}).")
        if self.rows_per_slot is None:
            object.__setattr__(self, "rows_per_slot", self.max_examples)
        _validate.positive_int("rows_per_slot", self.rows_per_slot)
        if self.rows_per_slot < self.max_examples:
            raise ValueError(f"Expected rows_per_slot={self.rows_per_slot} >= "
                             f"max_examples={self.max_examples}.")
        if self.secret is None and self.seed is None:
            raise ValueError("Expected a seed or a secret for the user sampler; got neither.")
        secret = self.secret if self.secret is not None else seeded_secret(self.seed)
        object.__setattr__(self, "_words", host_secret_words(secret))
        object.__setattr__(self, "_users", PoissonSampler(
            self.partition.num_users, self.sample_rate, self.num_slots, seed=None,
            secret=secret))

    @property
    def num_users(self) -> int:
        return self.partition.num_users

    @property
    def expected_users(self) -> float:
        """``q U``: the public denominator of the round's average."""
        return self.sample_rate * self.num_users

    def local_examples(self, round_index: int, user: int) -> np.ndarray:
        """User ``user``'s examples for round ``round_index``: all of them (at most
        ``max_examples``: a uniformly random subset of that many) in a uniformly random
        order, from the stream ``(SAMPLING, round_index, 1 + user)``."""
        members = self.partition.examples(user)
        nonce = np.array([int(Stream.SAMPLING), _check_round(round_index), 1 + int(user)],
                         np.uint32)
        keys = host_uniform(StreamKey(self._words, nonce), len(members))
        return members[np.argsort(keys, kind="stable")[: self.max_examples]]

    def free_slots(self, round_index: int) -> list[int]:
        """The slots users may fill in round ``round_index``: all but the
        ``simulated_dropouts`` ones that drop out
        (:func:`dpjax.aggregation.simulated_dropped_parties`), which stay empty. A
        dropped slot holding a user would lose that user's update depending on where the
        packing put it, i.e. on which other users were sampled (adding one user shifts
        the others): the lost set would change by more than one user."""
        dropped = set(simulated_dropped_parties(self.num_slots, self.simulated_dropouts,
                                                round_index))
        return [s for s in range(self.num_slots) if s not in dropped]

    def sample(self, round_index: int) -> list[SlotChunk]:
        """The slot chunks of round ``round_index``: one in the common case, more on
        overflow, all of shape ``[num_slots]`` / ``[num_slots, rows_per_slot]``. The
        sampled users, in id order, fill the free slots (:meth:`free_slots`; all slots
        without simulated dropouts) of chunk 0, then of chunk 1, and so on."""
        round_index = _check_round(round_index)
        selected = self._users.selected(round_index)
        free = self.free_slots(round_index)
        chunks = []
        for start in range(0, max(len(selected), 1), len(free)):
            users = np.zeros(self.num_slots, np.int32)
            slot_mask = np.zeros(self.num_slots, np.float32)
            examples = np.zeros((self.num_slots, self.rows_per_slot), np.int32)
            example_mask = np.zeros((self.num_slots, self.rows_per_slot), np.float32)
            for slot, user in zip(free, selected[start:start + len(free)], strict=False):
                chosen = self.local_examples(round_index, int(user))
                users[slot], slot_mask[slot] = user, 1.0
                examples[slot, : len(chosen)] = chosen
                example_mask[slot, : len(chosen)] = 1.0
            chunks.append(SlotChunk(users, slot_mask, examples, example_mask))
        return chunks


def place_slots(chunks: list[SlotChunk], x: np.ndarray, y: np.ndarray
                ) -> list[tuple[PyTree, np.ndarray]]:
    """The ``(slots, slot_mask)`` inputs of a round's step, one per chunk: ``slots =
    ((x [S, P, ...], y [S, P]), example_mask [S, P])`` gathered from the training arrays.

    Padding rows (and empty slots) hold zeros, not another example's values: a padding
    row shares its user's local batches, so a copy of someone else's example (say, one
    whose features make the loss non-finite) would reach that user's update.
    """
    placed = []
    for c in chunks:
        real = c.example_mask > 0
        xs = np.where(real.reshape(real.shape + (1,) * (x.ndim - 1)), x[c.examples], 0)
        ys = np.where(real, y[c.examples], 0)
        placed.append((((xs.astype(x.dtype), ys.astype(y.dtype)), c.example_mask), c.slot_mask))
    return placed
