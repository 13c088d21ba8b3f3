"""The run configuration as frozen-schema dataclasses, and its validation.

These dataclasses are the Hydra schema (registered in ``dpjax.cli``), so a
wrong type or an unknown key fails when Hydra composes the config. Ranges are
checked by :func:`validate` before any data is loaded or any step runs; every
error names the key, the value and what is accepted.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

ACCOUNTANTS = ("rdp", "pld")
SAMPLINGS = ("poisson", "fixed_size")
CLIPPING_METHODS = ("vmap", "fast", "auto")
AGGREGATIONS = ("sum", "secagg")
RANDOMNESS = ("secure", "seeded")
SECAGG_MODES = ("secure", "simulation")
OPTIMIZERS = ("sgd", "momentum", "adam")
EVAL_SPLITS = ("test", "validation")


class ConfigError(ValueError):
    """A config value is out of range; the message names the key."""


@dataclasses.dataclass
class DatasetConfig:
    name: str = "mnist1d"
    data_dir: str | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ModelConfig:
    name: str = "cnn1d"
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


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
    clipping: str = "vmap"
    microbatch_size: int | None = None
    physical_batch_size: int | None = None
    aggregation: str = "sum"
    num_parties: int = 1
    secagg_neighbours: int | None = None
    secagg_threshold: int | None = None
    secagg_mode: str | None = None  # null: follows randomness (secure -> secure masks)
    randomness: str = "secure"


@dataclasses.dataclass
class TrainConfig:
    steps: int | None = 1000
    epochs: float | None = None
    batch_size: int = 256
    seed: int = 0
    eval_every: int = 200
    log_every: int = 20
    eval_split: str = "test"
    validation_fraction: float = 0.1
    eval_batch_size: int = 2048
    distributed: bool = False
    checkpoint_every: int | None = None
    devices: str = "all"
    nonprivate_diagnostics: bool = True


@dataclasses.dataclass
class RunConfig:
    dataset: DatasetConfig = dataclasses.field(default_factory=DatasetConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    dp: DPConfig = dataclasses.field(default_factory=DPConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    name: str = "run"


def _fail(key: str, value: Any, accepted: str) -> None:
    raise ConfigError(f"Expected {key}={value!r} {accepted}.")


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _check_positive(key, value, *, allow_none=False, integer=False):
    if value is None and allow_none:
        return
    ok = _finite(value) and value > 0 and (not integer or float(value).is_integer())
    if not ok:
        _fail(key, value, "to be a positive integer" if integer else "to be finite and > 0")


def _check_choice(key, value, choices):
    if value not in choices:
        _fail(key, value, f"to be one of {list(choices)}")


def validate(
    cfg: RunConfig, *, datasets: tuple[str, ...] = (), models: tuple[str, ...] = ()
) -> None:
    """Checks every range and cross-key rule; raises :class:`ConfigError` on the first."""
    if datasets:
        _check_choice("dataset.name", cfg.dataset.name, datasets)
    if models:
        _check_choice("model.name", cfg.model.name, models)

    o = cfg.optimizer
    _check_choice("optimizer.name", o.name, OPTIMIZERS)
    _check_positive("optimizer.learning_rate", o.learning_rate)
    for key in ("momentum", "b1", "b2"):
        v = getattr(o, key)
        if not (_finite(v) and 0 <= v < 1):
            _fail(f"optimizer.{key}", v, "in [0, 1)")
    if not (_finite(o.weight_decay) and o.weight_decay >= 0):
        _fail("optimizer.weight_decay", o.weight_decay, "to be finite and >= 0")

    t = cfg.train
    if (t.steps is None) == (t.epochs is None):
        _fail("train.steps", t.steps,
              f"or train.epochs={t.epochs!r} to be set, exactly one of them")
    _check_positive("train.steps", t.steps, allow_none=True, integer=True)
    _check_positive("train.epochs", t.epochs, allow_none=True)
    _check_positive("train.batch_size", t.batch_size, integer=True)
    _check_positive("train.eval_every", t.eval_every, integer=True)
    _check_positive("train.log_every", t.log_every, integer=True)
    _check_positive("train.eval_batch_size", t.eval_batch_size, integer=True)
    _check_positive("train.checkpoint_every", t.checkpoint_every, allow_none=True, integer=True)
    _check_choice("train.eval_split", t.eval_split, EVAL_SPLITS)
    if str(t.devices) != "all" and not (str(t.devices).isdigit() and int(t.devices) >= 1):
        _fail("train.devices", t.devices, "to be 'all' or a positive integer")
    if not (_finite(t.validation_fraction) and 0 < t.validation_fraction < 1):
        _fail("train.validation_fraction", t.validation_fraction, "in (0, 1)")
    if isinstance(t.seed, bool) or not isinstance(t.seed, int) or t.seed < 0:
        _fail("train.seed", t.seed, "to be an integer >= 0")

    d = cfg.dp
    _check_choice("dp.accountant", d.accountant, ACCOUNTANTS)
    _check_choice("dp.sampling", d.sampling, SAMPLINGS)
    _check_choice("dp.clipping", d.clipping, CLIPPING_METHODS)
    _check_choice("dp.aggregation", d.aggregation, AGGREGATIONS)
    _check_choice("dp.randomness", d.randomness, RANDOMNESS)
    _check_positive("dp.l2_clip_norm", d.l2_clip_norm)
    if not (_finite(d.delta) and 0 < d.delta < 1):
        _fail("dp.delta", d.delta, "in (0, 1)")
    _check_positive("dp.max_epsilon", d.max_epsilon, allow_none=True)
    _check_positive("dp.target_epsilon", d.target_epsilon, allow_none=True)
    _check_positive("dp.microbatch_size", d.microbatch_size, allow_none=True, integer=True)
    _check_positive("dp.physical_batch_size", d.physical_batch_size, allow_none=True, integer=True)
    _check_positive("dp.num_parties", d.num_parties, integer=True)
    if d.noise_multiplier is not None and not (_finite(d.noise_multiplier)
                                               and d.noise_multiplier >= 0):
        _fail("dp.noise_multiplier", d.noise_multiplier, "to be finite and >= 0")
    if d.enabled:
        if (d.noise_multiplier is None) == (d.target_epsilon is None):
            _fail(
                "dp.noise_multiplier", d.noise_multiplier,
                f"or dp.target_epsilon={d.target_epsilon!r} to be set, exactly one of them "
                "(use dp.noise_multiplier=null with a target)",
            )
        if d.sampling == "fixed_size" and d.accountant == "pld":
            _fail("dp.accountant", d.accountant,
                  "to be 'rdp' with dp.sampling='fixed_size' (dp-accounting's PLD accountant "
                  "does not implement sampling without replacement)")
        if d.sampling == "fixed_size" and d.physical_batch_size not in (None, t.batch_size):
            _fail("dp.physical_batch_size", d.physical_batch_size,
                  f"to be null or train.batch_size={t.batch_size} with dp.sampling='fixed_size'")
    if d.aggregation == "secagg":
        if d.num_parties < 2:
            _fail("dp.num_parties", d.num_parties, "to be >= 2 with dp.aggregation='secagg'")
        if d.secagg_mode is not None:
            _check_choice("dp.secagg_mode", d.secagg_mode, SECAGG_MODES)
        if d.randomness == "secure" and d.secagg_mode == "simulation":
            _fail("dp.secagg_mode", d.secagg_mode,
                  "to be 'secure' or null with dp.randomness='secure' (simulation masks are "
                  "derived from the public train.seed, so the aggregator could unmask every "
                  "party; use dp.randomness=seeded for simulations)")
        _check_positive("dp.secagg_neighbours", d.secagg_neighbours, allow_none=True,
                        integer=True)
        _check_positive("dp.secagg_threshold", d.secagg_threshold, allow_none=True, integer=True)
        if not d.enabled:
            _fail("dp.aggregation", d.aggregation, "to be 'sum' with dp.enabled=false")
        if d.physical_batch_size is not None and d.physical_batch_size % d.num_parties:
            _fail("dp.physical_batch_size", d.physical_batch_size,
                  f"to be a multiple of dp.num_parties={d.num_parties}")


def secagg_mode(d: DPConfig) -> str:
    """The SecAgg mask randomness: ``dp.secagg_mode``, else what ``dp.randomness`` implies."""
    if d.secagg_mode is not None:
        return d.secagg_mode
    return "secure" if d.randomness == "secure" else "simulation"


def check_against_dataset(cfg: RunConfig, num_train: int) -> None:
    """The rules that need the dataset size N."""
    if cfg.train.batch_size > num_train:
        _fail("train.batch_size", cfg.train.batch_size,
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
