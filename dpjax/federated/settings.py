"""The ``federated`` config section (``dp.unit=user``) and what it builds.

:class:`FederatedConfig` is a plain dataclass in the style of :mod:`dpjax.config`
(usable as a Hydra schema); :func:`validate_federated` checks its ranges, naming
the key, before any data is loaded; :func:`build_partition` and
:func:`build_local_training` turn it into the partition and the local training.
The server optimizer is the run's ``optimizer`` section; a round is a step
(``train.steps`` rounds).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from dpjax.config import ConfigError, FederatedConfig
from dpjax.federated.local import LOCAL_OPTIMIZERS, LocalTraining, local_optimizer
from dpjax.federated.users import (
    PartitionKind,
    UserPartition,
    iid_partition,
    label_skew_partition,
    natural_partition,
)

PARTITIONS = tuple(str(k) for k in PartitionKind)




def _fail(key: str, value: Any, accepted: str) -> None:
    raise ConfigError(f"Expected federated.{key}={value!r} {accepted}.")


def _positive_int(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        _fail(key, value, "to be an integer >= 1")


def validate_federated(f: FederatedConfig, num_train: int | None = None) -> None:
    """Every range of the section; with ``num_train``, also that the users fit the data."""
    if f.partition not in PARTITIONS:
        _fail("partition", f.partition, f"to be one of {list(PARTITIONS)}")
    if f.partition != PartitionKind.NATURAL:
        _positive_int("num_users", f.num_users)
    _positive_int("classes_per_user", f.classes_per_user)
    if isinstance(f.partition_seed, bool) or not isinstance(f.partition_seed, int) \
            or f.partition_seed < 0:
        _fail("partition_seed", f.partition_seed, "to be an integer >= 0")
    if isinstance(f.users_per_round, bool) or not isinstance(f.users_per_round, int | float) \
            or not (math.isfinite(f.users_per_round) and f.users_per_round > 0):
        _fail("users_per_round", f.users_per_round, "to be finite and > 0")
    if f.num_slots is not None:
        _positive_int("num_slots", f.num_slots)
    for key in ("max_examples_per_user", "local_epochs", "local_batch_size"):
        _positive_int(key, getattr(f, key))
    if f.local_optimizer not in LOCAL_OPTIMIZERS:
        _fail("local_optimizer", f.local_optimizer, f"to be one of {list(LOCAL_OPTIMIZERS)}")
    if not (isinstance(f.local_learning_rate, int | float)
            and math.isfinite(f.local_learning_rate) and f.local_learning_rate > 0):
        _fail("local_learning_rate", f.local_learning_rate, "to be finite and > 0")
    if not (isinstance(f.local_momentum, int | float) and 0 <= f.local_momentum < 1):
        _fail("local_momentum", f.local_momentum, "in [0, 1)")
    if num_train is not None and f.partition != PartitionKind.NATURAL:
        per_user = f.classes_per_user if f.partition == PartitionKind.LABEL_SKEW else 1
        if f.num_users * per_user > num_train:
            _fail("num_users", f.num_users, f"times {per_user} shard(s) per user to be at most "
                  f"the {num_train} training examples")
    if f.num_users is not None and f.partition != PartitionKind.NATURAL \
            and f.users_per_round > f.num_users:
        _fail("users_per_round", f.users_per_round, f"to be at most num_users={f.num_users}")


def sample_rate(f: FederatedConfig, num_users: int) -> float:
    """The user sampling rate ``q = users_per_round / num_users``."""
    q = f.users_per_round / num_users
    if not 0 < q <= 1:
        _fail("users_per_round", f.users_per_round, f"to be at most the {num_users} users")
    return q


def build_partition(f: FederatedConfig, labels: np.ndarray,
                    user_ids: np.ndarray | None = None) -> UserPartition:
    """The partition of the training examples: ``label_skew`` and ``iid`` from the labels
    and ``partition_seed``; ``natural`` from ``user_ids`` (the dataset's, e.g.
    :func:`dpjax.federated.users.load_npz_user_ids`)."""
    kind = PartitionKind(f.partition)
    if kind is PartitionKind.NATURAL:
        if user_ids is None:
            _fail("partition", f.partition, "only with a dataset that carries user ids (an "
                  "npz file with a 'user_train' array)")
        return natural_partition(user_ids)
    if kind is PartitionKind.IID:
        return iid_partition(len(labels), f.num_users, seed=f.partition_seed)
    return label_skew_partition(labels, f.num_users, seed=f.partition_seed,
                                classes_per_user=f.classes_per_user)


def build_local_training(f: FederatedConfig) -> LocalTraining:
    """Each sampled user's local training of the section."""
    return LocalTraining(local_optimizer(f.local_optimizer, f.local_learning_rate,
                                         f.local_momentum),
                         epochs=f.local_epochs, batch_size=f.local_batch_size,
                         max_examples=f.max_examples_per_user)
