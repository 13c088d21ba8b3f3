"""The federated config section: ranges named by key, and what it builds."""

import numpy as np
import pytest

from dpjax.config import ConfigError
from dpjax.federated.settings import (
    FederatedConfig,
    build_local_training,
    build_partition,
    sample_rate,
    validate_federated,
)
from dpjax.federated.users import PartitionKind


def test_the_defaults_are_600_label_skew_users_of_mnist1d_sized_data():
    f = FederatedConfig()
    validate_federated(f, num_train=60_000)
    labels = np.random.default_rng(0).integers(0, 10, 60_000)
    p = build_partition(f, labels)
    assert p.kind is PartitionKind.LABEL_SKEW and p.num_users == 600
    assert sample_rate(f, p.num_users) == 30 / 600
    local = build_local_training(f)
    assert (local.epochs, local.batch_size, local.max_examples) == (1, 10, 100)


@pytest.mark.parametrize("key, value, message", [
    ("partition", "dirichlet", "federated.partition='dirichlet'"),
    ("num_users", 0, "federated.num_users=0"),
    ("users_per_round", 0.0, "federated.users_per_round=0.0"),
    ("users_per_round", 700.0, "federated.users_per_round=700.0 to be at most num_users"),
    ("num_slots", 0, "federated.num_slots=0"),
    ("local_epochs", 1.5, "federated.local_epochs=1.5"),
    ("local_optimizer", "adam", "federated.local_optimizer='adam'"),
    ("local_learning_rate", float("nan"), "federated.local_learning_rate=nan"),
    ("local_momentum", 1.0, "federated.local_momentum=1.0"),
    ("partition_seed", -1, "federated.partition_seed=-1"),
])
def test_out_of_range_values_name_their_key(key, value, message):
    f = FederatedConfig(**{key: value})
    with pytest.raises(ConfigError, match=message):
        validate_federated(f)


def test_more_shards_than_examples_and_a_natural_partition_without_ids_are_refused():
    with pytest.raises(ConfigError, match="federated.num_users=600 times 2"):
        validate_federated(FederatedConfig(), num_train=1000)
    validate_federated(FederatedConfig(partition="iid"), num_train=1000)
    natural = FederatedConfig(partition="natural", num_users=None)
    validate_federated(natural, num_train=10)
    with pytest.raises(ConfigError, match="carries user ids"):
        build_partition(natural, np.zeros(10, np.int32))
    p = build_partition(natural, np.zeros(4, np.int32), user_ids=np.array([5, 5, 1, 2]))
    assert p.num_users == 3
