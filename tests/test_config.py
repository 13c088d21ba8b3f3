"""Hydra composition of every config group and preset, and range validation."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import dpjax.cli  # noqa: F401  (registers the schema in the ConfigStore)
from dpjax.config import ConfigError, RunConfig, check_known_keys, validate
from dpjax.data import DATASETS
from dpjax.models import MODELS

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def _compose(overrides=()):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def _options(group):
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["dataset", "model", "optimizer", "dp", "train", "perf",
                                   "experiment"])
def test_every_option_of_every_group_composes_into_a_valid_run_config(group):
    options = _options(group)
    assert options, f"configs/{group}/ is empty"
    for option in options:
        overrides = [f"{group}={option}"]
        cfg = _compose(overrides)
        if OmegaConf.is_missing(cfg.dataset, "data_dir"):
            cfg.dataset.data_dir = "/data"
        if cfg.dataset.name == "npz":
            cfg.dataset.options.path = "/data/x.npz"
            cfg.dataset.options.num_classes = 10
        if cfg.dataset.name == "text":
            cfg.dataset.options.path = "/data/records.txt"
        run = OmegaConf.to_object(cfg)
        assert isinstance(run, RunConfig)
        validate(run, datasets=DATASETS, models=MODELS)


def test_group_options_match_the_library_registries():
    assert set(_options("dataset")) == set(DATASETS)
    assert set(_options("model")) == set(MODELS)


def test_unknown_key_and_wrong_type_fail_at_composition():
    with pytest.raises(ConfigCompositionException, match="noise_multiplyer"):
        _compose(["dp.noise_multiplyer=1.0"])
    # `+key=` bypasses Hydra's check; the CLI refuses it before training
    added = OmegaConf.to_container(_compose(["+dp.noise_multiplyer=1.0"]))
    with pytest.raises(ConfigError, match="'dp.noise_multiplyer'.*'noise_multiplier'"):
        check_known_keys(added)
    check_known_keys(OmegaConf.to_container(_compose(["+dataset.options.test_fraction=0.5"])))
    with pytest.raises(ConfigCompositionException):
        _compose(["dp.noise_multiplier=lots"])
    with pytest.raises(ConfigCompositionException):
        _compose(["train.steps=1.5"])


def test_an_unknown_group_option_lists_the_available_ones():
    with pytest.raises(ConfigCompositionException, match="mnist1d"):
        _compose(["dataset=imagenet"])


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["dp.noise_multiplier=-1"], "dp.noise_multiplier=-1.0"),
        (["dp.l2_clip_norm=0"], "dp.l2_clip_norm=0.0"),
        (["dp.delta=1.5"], r"dp.delta=1.5 in \(0, 1\)"),
        (["dp.accountant=moments"], "dp.accountant='moments'"),
        (["dp.sampling=shuffle"], "dp.sampling='shuffle'"),
        (["dp.target_epsilon=3"], "exactly one of them"),
        (["dp.max_epsilon=0"], "dp.max_epsilon=0.0"),
        (["train.batch_size=0"], "train.batch_size=0"),
        (["train.steps=0"], "train.steps=0"),
        (["train.epochs=2"], "exactly one of them"),
        (["optimizer.learning_rate=-0.1"], "optimizer.learning_rate=-0.1"),
        (["dp.sampling=fixed_size", "dp.accountant=pld"], "dp.accountant='pld'"),
        (["dp.aggregation=secagg"], "dp.num_parties=1"),
        (["dataset.name=imagenet"], r"dataset.name='imagenet'.*'mnist1d'"),
        (["model.name=vit"], r"model.name='vit'.*'cnn1d'"),
    ],
)
def test_out_of_range_values_name_the_key_and_the_range(overrides, match):
    run = OmegaConf.to_object(_compose(overrides))
    with pytest.raises(ConfigError, match=match):
        validate(run, datasets=DATASETS, models=MODELS)


def test_the_make_run_preset_calibrates_to_epsilon_three_at_delta_1e_5():
    cfg = _compose(["experiment=mnist1d_eps3"])
    assert cfg.dp.target_epsilon == 3 and cfg.dp.noise_multiplier is None
    assert cfg.dp.delta == 1e-5 and cfg.dataset.name == "mnist1d"
    assert cfg.train.eval_split == "test"


def test_the_older_dp_performance_keys_are_aliases_of_perf():
    from dpjax.config import perf

    run = OmegaConf.to_object(_compose(["dp.clipping=fast", "dp.microbatch_size=4"]))
    validate(run, datasets=DATASETS, models=MODELS)
    assert perf(run).clipping == "fast" and perf(run).microbatch_size == 4
    run = OmegaConf.to_object(_compose(["perf.clipping=auto"]))
    assert perf(run).clipping == "auto"
    clash = OmegaConf.to_object(_compose(["perf.clipping=fast", "dp.clipping=vmap"]))
    with pytest.raises(ConfigError, match=r"dp.clipping='vmap' to equal perf.clipping='fast'"):
        validate(clash)
    bad = OmegaConf.to_object(_compose(["dp.physical_batch_size=-3"]))
    with pytest.raises(ConfigError, match=r"dp.physical_batch_size=-3"):
        validate(bad)


def test_the_fingerprint_covers_privacy_settings_and_not_performance_or_logging():
    from dpjax.checkpoint import fingerprint

    base = fingerprint(OmegaConf.to_object(_compose([])))
    assert "dp.noise_multiplier" in base and "dp.randomness" in base and "train.seed" in base
    assert not any(k.startswith("perf.") for k in base)
    for override in ("perf.clipping=fast", "dp.clipping=fast", "train.log_every=7",
                     "train.devices=2", "perf.microbatch_size=8", "name=other"):
        assert fingerprint(OmegaConf.to_object(_compose([override]))) == base, override
    for override in ("dp.l2_clip_norm=0.5", "train.batch_size=128", "optimizer=sgd"):
        assert fingerprint(OmegaConf.to_object(_compose([override]))) != base, override
