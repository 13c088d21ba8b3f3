"""User-level DP and DP-FedAvg (McMahan et al. 2018): the federated pieces.

- :mod:`dpjax.federated.users`: a user id per training example (label-skew, IID or
  natural partitions).
- :mod:`dpjax.federated.slots`: Poisson sampling of users into a fixed number of party
  slots per round, each slot holding its user's padded examples.
- :mod:`dpjax.federated.local`: each sampled user's local training and its clipped
  model delta.
- :mod:`dpjax.federated.rounds`: the user-level mechanism and one DP-FedAvg round as a
  :class:`dpjax.train.DPStep`.
- :mod:`dpjax.federated.settings`: the ``federated`` config section.

See ``docs/federated.md``.
"""

from dpjax.federated.local import LocalTraining, clipped_user_sum, local_optimizer, local_update
from dpjax.federated.rounds import (
    FedAvgStep,
    make_fedavg_step,
    make_round_step,
    user_level_mechanism,
    user_sampler,
    user_secagg,
)
from dpjax.federated.settings import (
    FederatedConfig,
    build_local_training,
    build_partition,
    validate_federated,
)
from dpjax.federated.slots import SlotChunk, UserSampler, default_num_slots, place_slots
from dpjax.federated.users import (
    PartitionKind,
    UserPartition,
    iid_partition,
    label_skew_partition,
    load_npz_user_ids,
    natural_partition,
)

__all__ = [
    "FedAvgStep",
    "FederatedConfig",
    "LocalTraining",
    "PartitionKind",
    "SlotChunk",
    "UserPartition",
    "UserSampler",
    "build_local_training",
    "build_partition",
    "clipped_user_sum",
    "default_num_slots",
    "iid_partition",
    "label_skew_partition",
    "load_npz_user_ids",
    "local_optimizer",
    "local_update",
    "make_fedavg_step",
    "make_round_step",
    "natural_partition",
    "place_slots",
    "user_level_mechanism",
    "user_sampler",
    "user_secagg",
    "validate_federated",
]
