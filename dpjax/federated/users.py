"""Users: which training example belongs to which user, the unit of user-level DP.

A :class:`UserPartition` gives every training example exactly one user id in
``[0, num_users)``; every user holds at least one example. Three kinds
(:class:`PartitionKind`):

- ``label_skew`` (:func:`label_skew_partition`): non-IID by label skew, after
  McMahan et al. 2017 (Communication-Efficient Learning of Deep Networks from
  Decentralized Data, Section 3, the "pathological non-IID" MNIST partition:
  examples sorted by label, cut into ``2 U`` shards, two shards per user). Here
  the shards are cut *within* each class (class ``c`` gets a share of the ``k U``
  shards proportional to its size), so a user holds examples of at most
  ``classes_per_user`` classes -- exactly, also when class sizes are not
  multiples of the shard size. MNIST-1D's 60,000 training examples into 600
  users: 100 examples each (up to the rounding of unequal class sizes), from two
  classes (one if both its shards come from the same class).
- ``iid``: a uniformly random assignment into users of equal size (up to one).
- ``natural``: user ids that come with the data, e.g. the ``user_train`` array
  of an ``npz`` file (:func:`load_npz_user_ids`), renumbered densely.

What a partition reveals, and why that is acceptable. A synthetic partition is
a function of the training labels and a public seed only (never of the
features). It is a preprocessing step of the data owner, who decides what "one
user" is; it is not released: no output, summary or checkpoint holds it, and
the model is trained through the mechanism only. The guarantee is stated for
the partitioned data: neighbouring datasets add or remove all examples of one
user, the other users unchanged. For a synthetic partition this simulates
federated users; it says nothing directly about re-partitioning after a change
of one example (which can move shard boundaries). Inside a fixed partition,
changing examples of one user is a replace-one-user neighbour: two add/remove
steps, covered by group privacy only (a weaker guarantee than the reported
epsilon).
"""

from __future__ import annotations

import dataclasses
import enum
import os
import zipfile
from pathlib import Path

import numpy as np

NPZ_USER_IDS = "user_train"  # the optional npz array of a natural partition
_PARTITION_SPAWN_KEY = 0x05E5  # separates the partition's numpy stream from other seed uses
MAX_USERS = 2**32 - 2  # user u reads the stream (SAMPLING, round, 1 + u): 32-bit sub-index


class PartitionKind(enum.StrEnum):
    """How the training examples are split into users."""

    LABEL_SKEW = "label_skew"
    IID = "iid"
    NATURAL = "natural"


def _is_int(value) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _check_int(name: str, value, low: int) -> None:
    if not _is_int(value) or value < low:
        raise ValueError(f"Expected {name}={value!r} to be an integer >= {low}.")


@dataclasses.dataclass(frozen=True, eq=False)
class UserPartition:
    """``user_ids[i]`` is the user of training example ``i``; users ``0 .. num_users - 1``,
    each with at least one example.

    ``order`` lists the example indices grouped by user (ascending within a user) and
    ``starts[u] : starts[u + 1]`` is user ``u``'s range of it.
    """

    user_ids: np.ndarray
    num_users: int
    kind: PartitionKind

    def __post_init__(self):
        ids = np.asarray(self.user_ids)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"Expected user_ids to be a 1-D integer array; got {ids.dtype} "
                             f"{ids.shape}.")
        _check_int("num_users", self.num_users, 1)
        if self.num_users > MAX_USERS:
            raise ValueError(f"Expected num_users={self.num_users} <= {MAX_USERS}.")
        if ids.size == 0 or ids.min() < 0 or ids.max() >= self.num_users:
            raise ValueError(f"Expected user ids in [0, {self.num_users}) for every example.")
        sizes = np.bincount(ids, minlength=self.num_users)
        if np.any(sizes == 0):
            raise ValueError(f"Expected every one of the {self.num_users} users to hold an "
                             f"example; {int(np.sum(sizes == 0))} hold none.")
        object.__setattr__(self, "user_ids", ids.astype(np.int32))
        object.__setattr__(self, "kind", PartitionKind(self.kind))
        object.__setattr__(self, "order", np.argsort(ids, kind="stable").astype(np.int64))
        object.__setattr__(self, "starts", np.concatenate([[0], np.cumsum(sizes)]))

    @property
    def num_examples(self) -> int:
        return int(self.user_ids.shape[0])

    @property
    def sizes(self) -> np.ndarray:
        """``[num_users]`` number of examples of each user (private: data, not config)."""
        return np.diff(self.starts)

    def examples(self, user: int) -> np.ndarray:
        """The training-example indices of ``user``, ascending."""
        return self.order[self.starts[user]:self.starts[user + 1]]


def _rng(seed: int, kind: PartitionKind) -> np.random.Generator:
    _check_int("seed", seed, 0)
    spawn = (_PARTITION_SPAWN_KEY, list(PartitionKind).index(kind))
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=spawn))


def _labels(labels) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or y.size == 0 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"Expected labels to be a non-empty 1-D integer array; got {y.dtype} "
                         f"{y.shape}.")
    return y


def shards_per_class(class_sizes: np.ndarray, num_shards: int) -> np.ndarray:
    """How many of ``num_shards`` shards each class is cut into: proportional to its size
    (largest remainders), at least one and at most its size per class, summing to
    ``num_shards``."""
    sizes = np.asarray(class_sizes, np.int64)
    if num_shards < len(sizes) or num_shards > sizes.sum():
        raise ValueError(f"Expected the number of shards {num_shards} to be between the number "
                         f"of classes {len(sizes)} and of examples {int(sizes.sum())}.")
    exact = sizes * num_shards / sizes.sum()
    k = np.clip(np.floor(exact).astype(np.int64), 1, sizes)
    while k.sum() < num_shards:  # one more shard to the class furthest below its share
        room = np.where(k < sizes, exact - k, -np.inf)
        k[int(np.argmax(room))] += 1
    while k.sum() > num_shards:  # only after the at-least-one rule: take from the largest excess
        excess = np.where(k > 1, k - exact, -np.inf)
        k[int(np.argmax(excess))] -= 1
    return k


def label_skew_partition(labels, num_users: int, *, seed: int,
                         classes_per_user: int = 2) -> UserPartition:
    """Non-IID users by label skew: each holds ``classes_per_user`` class-pure shards.

    The ``classes_per_user * num_users`` shards are cut within each class (each class's
    examples in a seeded random order, cut into :func:`shards_per_class` nearly equal
    pieces) and dealt to users in a seeded random order, ``classes_per_user`` each. So
    every example has one user, every user holds examples of at most
    ``classes_per_user`` classes, and user sizes are about ``N / num_users``. A function
    of ``labels`` and the public ``seed`` only.
    """
    y = _labels(labels)
    _check_int("num_users", num_users, 1)
    _check_int("classes_per_user", classes_per_user, 1)
    classes, class_sizes = np.unique(y, return_counts=True)
    num_shards = num_users * classes_per_user
    if num_shards > len(y) or num_shards < len(classes):
        raise ValueError(
            f"Expected num_users={num_users} times classes_per_user={classes_per_user} (the "
            f"number of shards) to be between the number of classes present {len(classes)} "
            f"and the number of training examples {len(y)}.")
    rng = _rng(seed, PartitionKind.LABEL_SKEW)
    shards: list[np.ndarray] = []
    for c, k in zip(classes, shards_per_class(class_sizes, num_shards), strict=True):
        shards.extend(np.array_split(rng.permutation(np.flatnonzero(y == c)), k))
    user_ids = np.empty(len(y), np.int32)
    for position, shard in enumerate(rng.permutation(num_shards)):
        user_ids[shards[shard]] = position // classes_per_user
    return UserPartition(user_ids, num_users, PartitionKind.LABEL_SKEW)


def iid_partition(num_examples: int, num_users: int, *, seed: int) -> UserPartition:
    """Users of equal size (up to one example), the examples assigned uniformly at random
    (a seeded permutation)."""
    _check_int("num_examples", num_examples, 1)
    _check_int("num_users", num_users, 1)
    if num_users > num_examples:
        raise ValueError(f"Expected num_users={num_users} <= num_examples={num_examples}.")
    perm = _rng(seed, PartitionKind.IID).permutation(num_examples)
    user_ids = np.empty(num_examples, np.int32)
    user_ids[perm] = np.arange(num_examples, dtype=np.int64) * num_users // num_examples
    return UserPartition(user_ids, num_users, PartitionKind.IID)


def natural_partition(user_ids) -> UserPartition:
    """The partition of ids that come with the data: any integers, one per training
    example, renumbered ``0 .. U - 1`` in ascending order of the given ids."""
    ids = np.asarray(user_ids)
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"Expected user ids to be a non-empty 1-D integer array; got "
                         f"{ids.dtype} {ids.shape}.")
    distinct, dense = np.unique(ids, return_inverse=True)
    return UserPartition(dense.reshape(-1).astype(np.int32), len(distinct),
                         PartitionKind.NATURAL)


def load_npz_user_ids(path: str | os.PathLike[str], num_train: int) -> np.ndarray:
    """The ``user_train`` array of an ``.npz`` dataset file (one integer id per row of
    ``x_train``), read with ``allow_pickle=False``."""
    file = Path(path).expanduser()
    try:
        with np.load(file, allow_pickle=False) as archive:
            if NPZ_USER_IDS not in archive.files:
                raise ValueError(f"it has no array {NPZ_USER_IDS!r} (found "
                                 f"{', '.join(archive.files) or 'none'})")
            ids = archive[NPZ_USER_IDS]
    except (OSError, EOFError, ValueError, TypeError, zipfile.BadZipFile) as error:
        raise ValueError(f"Expected {file} to be an .npz file with an integer array "
                         f"{NPZ_USER_IDS!r} for a natural partition: {error}") from error
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer) or len(ids) != num_train:
        raise ValueError(f"Expected {NPZ_USER_IDS} in {file} to hold one integer per training "
                         f"example ({num_train}); got {ids.dtype} {ids.shape}.")
    return ids

