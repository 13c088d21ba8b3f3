"""dp.unit=user through the training loop: DP-FedAvg rounds accounted per user."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import dpjax.cli  # noqa: F401  (registers the schema)
from dpjax import accounting
from dpjax.config import ConfigError, validate
from dpjax.loop import run_training

ROOT = Path(__file__).resolve().parents[2]
BASE = ["dataset=digits", "model=mlp", "model.options.hidden=[16]", "dp.unit=user",
        "federated.num_users=100", "federated.users_per_round=10", "train.steps=3",
        "train.eval_every=3", "dp.randomness=seeded"]


def _cfg(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return OmegaConf.to_object(compose("config", overrides=[*BASE, *overrides]))


@pytest.mark.parametrize("aggregation", [[], ["dp.aggregation=secagg",
                                              "dp.secagg_mode=simulation"]])
def test_a_user_level_run_is_accounted_with_the_user_sampling_rate(aggregation, tmp_path):
    s = run_training(_cfg(*aggregation), tmp_path)
    assert s["unit"] == "user" and s["num_users"] == 100
    assert s["sample_rate"] == pytest.approx(0.1)
    assert s["epsilon"] == accounting.epsilon(s["noise_multiplier"], 0.1, 3, s["delta"])


def test_user_level_settings_that_do_not_apply_are_refused():
    with pytest.raises(ConfigError, match="dp.sampling='fixed_size'.*dp.unit='user'"):
        validate(_cfg("dp.sampling=fixed_size"))
    with pytest.raises(ConfigError, match="dp.num_parties=4 to be 1"):
        validate(_cfg("dp.aggregation=secagg", "dp.num_parties=4"))
    with pytest.raises(ConfigError, match="dp.noise='skellam'.*dp.aggregation='secagg'"):
        validate(_cfg("dp.noise=skellam"))


def test_user_level_distributed_noise_runs_with_one_party_per_slot(tmp_path):
    s = run_training(_cfg("dp.aggregation=secagg", "dp.secagg_mode=simulation",
                          "dp.noise=skellam", "dp.secagg_bits=20"), tmp_path)
    p = s["distributed_dp"]
    assert s["unit"] == "user" and p["unit"] == "user" and p["num_parties"] > 10
    # user level: the sensitivity is conditional rounding's bound on a party's vector
    assert p["rounding_l2_bound"] == p["l2_sensitivity"]
