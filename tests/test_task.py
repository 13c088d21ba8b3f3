"""The public training subset (train.subset_fraction / train.subset_seed) of dpjax.task."""

from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import dpjax.cli  # noqa: F401  (registers the schema in the ConfigStore)
from dpjax.checkpoint import fingerprint
from dpjax.config import ConfigError, validate
from dpjax.data import DATASETS, load_digits
from dpjax.models import MODELS
from dpjax.task import build_task, subset_mask

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DIGITS = ["dataset=digits", "model=mlp", "model.options.hidden=[8]"]


def _run_config(*overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return OmegaConf.to_object(compose(config_name="config", overrides=[*DIGITS, *overrides]))


def test_the_subset_is_a_function_of_the_seed_alone():
    a, again = subset_mask(1000, 0.5, 7), subset_mask(1000, 0.5, 7)
    np.testing.assert_array_equal(a, again)
    assert a.dtype == bool and a.shape == (1000,)
    assert np.count_nonzero(a != subset_mask(1000, 0.5, 8)) > 300  # another seed: another half
    # the first rows' coins do not depend on how many rows follow
    np.testing.assert_array_equal(subset_mask(1500, 0.5, 7)[:1000], a)


def test_each_example_is_kept_independently_with_the_fraction():
    # 400 seeds x 2,000 rows: the kept share per seed is Binomial(2000, p) / 2000, so every
    # seed's share lies within 5 standard errors of p, and the mean over seeds within 4
    # standard errors of the mean; rows kept by two seeds agree with independence (p^2).
    n, seeds, p = 2000, 400, 0.3
    masks = np.stack([subset_mask(n, p, s) for s in range(seeds)])
    se = np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(masks.mean(1) - p) < 5 * se)
    assert abs(masks.mean() - p) < 4 * se / np.sqrt(seeds)
    both = (masks[:-1] & masks[1:]).mean()
    assert abs(both - p * p) < 4 * np.sqrt(p * p * (1 - p * p) / (n * (seeds - 1)))


def test_a_run_trains_on_the_subset_and_never_sees_its_complement():
    pool = load_digits()
    task = build_task(_run_config("train.subset_fraction=0.5", "train.subset_seed=3"))
    keep = subset_mask(len(pool.x_train), 0.5, 3)
    np.testing.assert_array_equal(task.x_train, pool.x_train[keep])
    np.testing.assert_array_equal(task.y_train, pool.y_train[keep])
    # members and non-members partition the pool: disjoint, and together all of it
    rows = {r.tobytes() for r in pool.x_train}
    members = {r.tobytes() for r in pool.x_train[keep]}
    others = {r.tobytes() for r in pool.x_train[~keep]}
    assert not members & others and members | others == rows
    assert len(task.x_train) == np.count_nonzero(keep)
    np.testing.assert_array_equal(task.test_split[0], pool.x_test)  # the test split is untouched


def test_an_unset_subset_changes_nothing():
    pool = load_digits()
    task = build_task(_run_config())
    np.testing.assert_array_equal(task.x_train, pool.x_train)
    np.testing.assert_array_equal(task.y_train, pool.y_train)
    # the fingerprint changes with the subset (it changes the trajectory), not without it
    base = fingerprint(_run_config())
    assert base["train.subset_fraction"] is None
    for override in ("train.subset_fraction=0.5", "train.subset_seed=1"):
        assert fingerprint(_run_config(override)) != base, override


def test_the_subset_is_taken_from_the_training_part_of_a_validation_split():
    cfg = _run_config("train.eval_split=validation", "train.subset_fraction=0.5")
    whole = build_task(_run_config("train.eval_split=validation"))
    task = build_task(cfg)
    keep = subset_mask(len(whole.x_train), 0.5, 0)
    np.testing.assert_array_equal(task.x_train, whole.x_train[keep])
    np.testing.assert_array_equal(task.holdout[0], whole.holdout[0])


@pytest.mark.parametrize("override, message", [
    ("train.subset_fraction=0", "train.subset_fraction=0"),
    ("train.subset_fraction=1.0", "train.subset_fraction=1.0"),
    ("train.subset_fraction=-0.5", "train.subset_fraction=-0.5"),
    ("train.subset_seed=-1", "train.subset_seed=-1"),
])
def test_a_bad_subset_value_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(_run_config(override), datasets=DATASETS, models=MODELS)


def test_subset_mask_refuses_bad_arguments():
    for kwargs in ({"num_examples": -1}, {"fraction": 1.0}, {"fraction": 0},
                   {"seed": -2}, {"seed": 1.5}):
        args = {"num_examples": 10, "fraction": 0.5, "seed": 0, **kwargs}
        with pytest.raises(ValueError, match=f"Expected {next(iter(kwargs))}="):
            subset_mask(**args)


def test_a_subset_that_keeps_nothing_is_refused_before_training():
    cfg = _run_config("train.subset_fraction=1e-9")
    with pytest.raises(ConfigError, match="train.subset_fraction=1e-09.*keeps none"):
        build_task(cfg)
