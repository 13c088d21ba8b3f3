"""The run configuration as frozen-schema dataclasses, and its validation.

These dataclasses are the Hydra schema (registered in ``dpjax.cli``), so a
wrong type or an unknown key fails when Hydra composes the config. Ranges are
checked by :func:`validate` before any data is loaded or any step runs; every
error names the key, the value and what is accepted.

Privacy settings (``dp``) and performance knobs (``perf``: how the clipped sum
is computed, never what it is) are separate sections. The older keys
``dp.clipping``, ``dp.microbatch_size`` and ``dp.physical_batch_size`` stay
accepted as aliases of the ``perf`` ones (:func:`resolve_aliases`). Fields that
change logging, evaluation or placement but not a parameter bit say so in their
metadata (``trajectory=False``), next to their definition: a checkpoint's
fingerprint covers every other field (:func:`trajectory_fields`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from dpjax.choices import (
    Accountant,
    Aggregation,
    ClippingMethod,
    Noise,
    Randomness,
    Sampling,
    Unit,
    values,
)

ACCOUNTANTS = values(Accountant)
SAMPLINGS = values(Sampling)
CLIPPING_METHODS = values(ClippingMethod)
AGGREGATIONS = values(Aggregation)
RANDOMNESS = values(Randomness)
NOISES = values(Noise)
UNITS = values(Unit)
DISCRETE_NOISES = (Noise.SKELLAM.value, Noise.DDGAUSS.value)
SECAGG_MODES = ("secure", "simulation")
OPTIMIZERS = ("sgd", "momentum", "adam")
EVAL_SPLITS = ("test", "validation")


class ConfigError(ValueError):
    """A config value is out of range; the message names the key."""


def _off_trajectory(default: Any) -> Any:
    """A field that changes logging, evaluation or placement, never a parameter bit."""
    return dataclasses.field(default=default, metadata={"trajectory": False})


@dataclasses.dataclass
class DatasetConfig:
    name: str = "mnist1d"
    data_dir: str | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ModelConfig:
    name: str = "cnn1d"
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    # the output directory (or its checkpoints/) of an earlier run whose parameters start
    # this one (language models): parameters only, never its secret
    init_from: str | None = None


@dataclasses.dataclass
class OptimizerConfig:
    name: str = "adam"
    learning_rate: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = False
    b1: float = 0.9
    b2: float = 0.999
    weight_decay: float = 0.0


@dataclasses.dataclass
class DPConfig:
    enabled: bool = True
    noise_multiplier: float | None = 1.0
    target_epsilon: float | None = None
    l2_clip_norm: float = 1.0
    per_layer_clipping: bool = False
    delta: float = 1e-5
    accountant: str = "rdp"
    sampling: str = "poisson"
    max_epsilon: float | None = None
    # aliases of perf.clipping / perf.microbatch_size / perf.physical_batch_size
    clipping: str | None = _off_trajectory(None)
    microbatch_size: int | None = _off_trajectory(None)
    physical_batch_size: int | None = _off_trajectory(None)
    aggregation: str = "sum"
    num_parties: int = 1
    secagg_neighbours: int | None = None
    secagg_threshold: int | None = None
    secagg_mode: str | None = None  # null: follows randomness (secure -> secure masks)
    randomness: str = "secure"
    noise: str = "gaussian"  # gaussian (central) | skellam | ddgauss (added by each party)
    unit: str = "example"  # example | user (DP-FedAvg: see the federated section)
    secagg_bits: int = 32  # the SecAgg modulus 2^bits, for every noise
    min_survivors: int | None = None  # distributed noise: null = all parties
    max_colluders: int = 0  # parties whose noise an attacker could subtract
    wrap_probability: float = 1e-4  # distributed noise: P(any coordinate wraps) per round
    simulated_dropouts: int = _off_trajectory(0)  # tests: parties that drop each round


@dataclasses.dataclass
class TrainConfig:
    steps: int | None = 1000
    epochs: float | None = None
    batch_size: int = 256
    seed: int = 0
    eval_every: int = _off_trajectory(200)
    log_every: int = _off_trajectory(20)
    eval_split: str = "test"
    validation_fraction: float = 0.1
    # A public random subset of the training split (membership inference): each example
    # kept independently with probability subset_fraction, chosen by subset_seed alone.
    subset_fraction: float | None = None
    subset_seed: int = 0
    eval_batch_size: int = _off_trajectory(2048)
    distributed: bool = _off_trajectory(False)
    checkpoint_every: int | None = _off_trajectory(None)
    # the device count changes the summation order of floats only (docs/cluster.md)
    devices: str = _off_trajectory("all")
    nonprivate_diagnostics: bool = _off_trajectory(True)


@dataclasses.dataclass
class FederatedConfig:
    """Users, user sampling and local training of DP-FedAvg.

    ``users_per_round`` is the expected number of sampled users ``q U`` (the user
    sampling rate is ``users_per_round / num_users``); ``num_slots`` (null: expected plus
    3 standard deviations) is the public number of party slots per round.
    ``max_examples_per_user`` is the public cap of a user's examples per round (a user
    with more trains on a fresh random subset of that many).
    """

    partition: str = "label_skew"
    num_users: int | None = 600  # label_skew / iid; natural: taken from the data
    classes_per_user: int = 2
    partition_seed: int = 0
    users_per_round: float = 30.0
    num_slots: int | None = None
    max_examples_per_user: int = 100
    local_epochs: int = 1
    local_batch_size: int = 10
    local_optimizer: str = "sgd"
    local_learning_rate: float = 0.1
    local_momentum: float = 0.9


@dataclasses.dataclass
class PerfConfig:
    """How the clipped sum is computed; none of it changes the guarantee (the physical
    batch size sets SecAgg's fixed-point scale, which the mechanism's fingerprint
    covers)."""

    clipping: str = "vmap"
    microbatch_size: int | None = None
    physical_batch_size: int | None = None


@dataclasses.dataclass
class RunConfig:
    dataset: DatasetConfig = dataclasses.field(default_factory=DatasetConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    dp: DPConfig = dataclasses.field(default_factory=DPConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    perf: PerfConfig = dataclasses.field(
        default_factory=PerfConfig, metadata={"trajectory": False})
    federated: FederatedConfig = dataclasses.field(default_factory=FederatedConfig)
    name: str = _off_trajectory("run")


PERF_ALIASES = ("clipping", "microbatch_size", "physical_batch_size")


def perf_key(cfg: RunConfig, name: str) -> str:
    """The key a performance setting was given under: ``dp.<name>`` (its older alias) if
    that is set, else ``perf.<name>``; error messages name it."""
    return f"dp.{name}" if getattr(cfg.dp, name) is not None else f"perf.{name}"


def perf(cfg: RunConfig) -> PerfConfig:
    """The performance settings with the ``dp.*`` aliases applied; refuses an alias and
    its ``perf`` key set to different values."""
    defaults, resolved = PerfConfig(), dataclasses.replace(cfg.perf)
    for name in PERF_ALIASES:
        old, new = getattr(cfg.dp, name), getattr(cfg.perf, name)
        if old is None:
            continue
        if new != getattr(defaults, name) and new != old:
            fail(f"dp.{name}", old, f"to equal perf.{name}={new!r} (dp.{name} is its older "
                                     "name; set one of them)")
        setattr(resolved, name, old)
    return resolved


def trajectory_fields(config: Any, prefix: str = "") -> dict[str, Any]:
    """Every field of a config dataclass that can change a parameter bit, flattened to
    ``"dp.noise_multiplier"`` keys (``options`` dicts stay whole)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        if not f.metadata.get("trajectory", True):
            continue
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out.update(trajectory_fields(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = value
    return out


def fail(key: str, value: Any, accepted: str) -> None:
    raise ConfigError(f"Expected {key}={value!r} {accepted}.")


def finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def check_positive(key, value, *, allow_none=False, integer=False):
    if value is None and allow_none:
        return
    ok = finite(value) and value > 0 and (not integer or float(value).is_integer())
    if not ok:
        fail(key, value, "to be a positive integer" if integer else "to be finite and > 0")


def check_choice(key, value, choices):
    if value not in choices:
        fail(key, value, f"to be one of {list(choices)}")


def validate(
    cfg: RunConfig, *, datasets: tuple[str, ...] = (), models: tuple[str, ...] = ()
) -> None:
    """Checks every range and cross-key rule; raises :class:`ConfigError` on the first."""
    if datasets:
        check_choice("dataset.name", cfg.dataset.name, datasets)
    if models:
        check_choice("model.name", cfg.model.name, models)

    o = cfg.optimizer
    check_choice("optimizer.name", o.name, OPTIMIZERS)
    check_positive("optimizer.learning_rate", o.learning_rate)
    for key in ("momentum", "b1", "b2"):
        v = getattr(o, key)
        if not (finite(v) and 0 <= v < 1):
            fail(f"optimizer.{key}", v, "in [0, 1)")
    if not (finite(o.weight_decay) and o.weight_decay >= 0):
        fail("optimizer.weight_decay", o.weight_decay, "to be finite and >= 0")

    t = cfg.train
    if (t.steps is None) == (t.epochs is None):
        fail("train.steps", t.steps,
              f"or train.epochs={t.epochs!r} to be set, exactly one of them")
    check_positive("train.steps", t.steps, allow_none=True, integer=True)
    check_positive("train.epochs", t.epochs, allow_none=True)
    check_positive("train.batch_size", t.batch_size, integer=True)
    check_positive("train.eval_every", t.eval_every, integer=True)
    check_positive("train.log_every", t.log_every, integer=True)
    check_positive("train.eval_batch_size", t.eval_batch_size, integer=True)
    check_positive("train.checkpoint_every", t.checkpoint_every, allow_none=True, integer=True)
    check_choice("train.eval_split", t.eval_split, EVAL_SPLITS)
    if str(t.devices) != "all" and not (str(t.devices).isdigit() and int(t.devices) >= 1):
        fail("train.devices", t.devices, "to be 'all' or a positive integer")
    if not (finite(t.validation_fraction) and 0 < t.validation_fraction < 1):
        fail("train.validation_fraction", t.validation_fraction, "in (0, 1)")
    for key in ("seed", "subset_seed"):
        value = getattr(t, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            fail(f"train.{key}", value, "to be an integer >= 0")
    if t.subset_fraction is not None and not (finite(t.subset_fraction)
                                              and 0 < t.subset_fraction < 1):
        fail("train.subset_fraction", t.subset_fraction, "to be null (all) or in (0, 1)")

    d = cfg.dp
    check_choice("dp.accountant", d.accountant, ACCOUNTANTS)
    check_choice("dp.sampling", d.sampling, SAMPLINGS)
    p = perf(cfg)
    check_choice(perf_key(cfg, "clipping"), p.clipping, CLIPPING_METHODS)
    check_choice("dp.aggregation", d.aggregation, AGGREGATIONS)
    check_choice("dp.randomness", d.randomness, RANDOMNESS)
    check_choice("dp.noise", d.noise, NOISES)
    check_choice("dp.unit", d.unit, UNITS)
    if d.unit == "user":
        if not d.enabled:
            fail("dp.unit", d.unit, "to be 'example' with dp.enabled=false")
        if d.sampling != "poisson":
            fail("dp.sampling", d.sampling, "to be 'poisson' with dp.unit='user' (users are "
                  "Poisson-sampled each round)")
        if cfg.train.distributed:
            fail("train.distributed", cfg.train.distributed, "to be false with dp.unit='user' "
                  "(a round runs on one device)")
    if not (isinstance(d.secagg_bits, int) and 8 <= d.secagg_bits <= 32):
        fail("dp.secagg_bits", d.secagg_bits, "to be an integer in [8, 32]")
    if not (finite(d.wrap_probability) and 0 < d.wrap_probability < 1):
        fail("dp.wrap_probability", d.wrap_probability, "in (0, 1)")
    if isinstance(d.max_colluders, bool) or not isinstance(d.max_colluders, int) \
            or d.max_colluders < 0:
        fail("dp.max_colluders", d.max_colluders, "to be an integer >= 0")
    if isinstance(d.simulated_dropouts, bool) or not isinstance(d.simulated_dropouts, int) \
            or d.simulated_dropouts < 0:
        fail("dp.simulated_dropouts", d.simulated_dropouts, "to be an integer >= 0")
    check_positive("dp.min_survivors", d.min_survivors, allow_none=True, integer=True)
    if d.simulated_dropouts and d.noise not in DISCRETE_NOISES:
        fail("dp.simulated_dropouts", d.simulated_dropouts, "to be 0 unless dp.noise is one of "
             f"{sorted(DISCRETE_NOISES)} (only distributed noise simulates dropped parties)")
    if d.enabled and d.noise in DISCRETE_NOISES:
        if d.aggregation != "secagg":
            fail("dp.noise", d.noise, "to be 'gaussian' unless dp.aggregation='secagg' "
                  "(skellam and ddgauss are added by each SecAgg party before masking)")
        if d.accountant != "rdp":
            fail("dp.accountant", d.accountant, f"to be 'rdp' with dp.noise={d.noise!r} (its "
                  "RDP curve is Poisson-subsampled in dpjax.rdp; no PLD is implemented)")
        if d.sampling != "poisson":
            fail("dp.sampling", d.sampling, f"to be 'poisson' with dp.noise={d.noise!r}")
    if d.aggregation != "secagg" and d.secagg_bits != 32:
        fail("dp.secagg_bits", d.secagg_bits, "to be 32 (the default) unless "
              "dp.aggregation='secagg'")
    if d.aggregation == "secagg" and d.enabled and d.unit != "user":
        check_survivors(d, d.num_parties, f"dp.num_parties={d.num_parties}")
    check_positive("dp.l2_clip_norm", d.l2_clip_norm)
    if not (finite(d.delta) and 0 < d.delta < 1):
        fail("dp.delta", d.delta, "in (0, 1)")
    check_positive("dp.max_epsilon", d.max_epsilon, allow_none=True)
    check_positive("dp.target_epsilon", d.target_epsilon, allow_none=True)
    check_positive(perf_key(cfg, "microbatch_size"), p.microbatch_size, allow_none=True,
                    integer=True)
    check_positive(perf_key(cfg, "physical_batch_size"), p.physical_batch_size,
                    allow_none=True, integer=True)
    check_positive("dp.num_parties", d.num_parties, integer=True)
    if d.noise_multiplier is not None and not (finite(d.noise_multiplier)
                                               and d.noise_multiplier >= 0):
        fail("dp.noise_multiplier", d.noise_multiplier, "to be finite and >= 0")
    if d.enabled:
        if (d.noise_multiplier is None) == (d.target_epsilon is None):
            fail(
                "dp.noise_multiplier", d.noise_multiplier,
                f"or dp.target_epsilon={d.target_epsilon!r} to be set, exactly one of them "
                "(use dp.noise_multiplier=null with a target)",
            )
        if d.sampling == "fixed_size" and d.accountant == "pld":
            fail("dp.accountant", d.accountant,
                  "to be 'rdp' with dp.sampling='fixed_size' (dp-accounting's PLD accountant "
                  "does not implement sampling without replacement)")
        if d.sampling == "fixed_size" and p.physical_batch_size not in (None, t.batch_size):
            fail(perf_key(cfg, "physical_batch_size"), p.physical_batch_size,
                  f"to be null or train.batch_size={t.batch_size} with dp.sampling='fixed_size'")
    if d.aggregation == "secagg":
        if d.unit == "user" and d.num_parties != 1:
            fail("dp.num_parties", d.num_parties, "to be 1 (unset) with dp.unit='user': the "
                  "parties are a round's user slots (federated.num_slots)")
        if d.unit != "user" and d.num_parties < 2:
            fail("dp.num_parties", d.num_parties, "to be >= 2 with dp.aggregation='secagg'")
        if d.secagg_mode is not None:
            check_choice("dp.secagg_mode", d.secagg_mode, SECAGG_MODES)
        if d.randomness == "secure" and d.secagg_mode == "simulation":
            fail("dp.secagg_mode", d.secagg_mode,
                  "to be 'secure' or null with dp.randomness='secure' (simulation masks are "
                  "derived from the public train.seed, so the aggregator could unmask every "
                  "party; use dp.randomness=seeded for simulations)")
        check_positive("dp.secagg_neighbours", d.secagg_neighbours, allow_none=True,
                        integer=True)
        check_positive("dp.secagg_threshold", d.secagg_threshold, allow_none=True, integer=True)
        if not d.enabled:
            fail("dp.aggregation", d.aggregation, "to be 'sum' with dp.enabled=false")
        if p.physical_batch_size is not None and p.physical_batch_size % d.num_parties:
            fail(perf_key(cfg, "physical_batch_size"), p.physical_batch_size,
                  f"to be a multiple of dp.num_parties={d.num_parties}")


def check_survivors(d: DPConfig, num_parties: int, parties: str) -> None:
    """``dp.min_survivors``, ``dp.max_colluders`` and ``dp.simulated_dropouts`` against the
    round's ``num_parties`` (``parties`` names where that count comes from: the config at
    example level, the slots at user level, which only the assembly knows)."""
    survivors = num_parties if d.min_survivors is None else d.min_survivors
    if survivors > num_parties:
        fail("dp.min_survivors", d.min_survivors, f"to be at most {parties}")
    if d.max_colluders >= survivors:
        fail("dp.max_colluders", d.max_colluders,
             f"to be below the surviving parties ({survivors}): their noise is all an "
             "honest aggregate would have")
    if d.simulated_dropouts >= num_parties:
        fail("dp.simulated_dropouts", d.simulated_dropouts, f"to be below {parties}")


def secagg_mode(d: DPConfig) -> str:
    """The SecAgg mask randomness: ``dp.secagg_mode``, else what ``dp.randomness`` implies."""
    if d.secagg_mode is not None:
        return d.secagg_mode
    return "secure" if d.randomness == "secure" else "simulation"


def check_against_dataset(cfg: RunConfig, num_train: int) -> None:
    """The rules that need the dataset size N."""
    if cfg.train.batch_size > num_train:
        fail("train.batch_size", cfg.train.batch_size,
              f"to be at most the number of training examples {num_train}")


_FREE_FORM = {"options"}  # per-dataset/model options: checked by their loaders


def check_known_keys(tree: dict, schema: type = RunConfig, prefix: str = "") -> None:
    """Refuses keys the schema does not define (Hydra's ``+key=value`` can add them)."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(
                f"Unknown config key {name!r}; accepted under {prefix.rstrip('.') or 'the root'}: "
                f"{sorted(fields)}."
            )
        sub = fields[key].default_factory if dataclasses.is_dataclass(
            fields[key].default_factory) else None
        if sub is not None and key not in _FREE_FORM and isinstance(value, dict):
            check_known_keys(value, sub, f"{name}.")
