"""User level with ``dp.simulated_dropouts``: the sampler keeps the dropped slots empty. The
review of the fix of Known privacy issue 2 (2026-11-30) found that with the dropped slots
taken from the configured ones, users overflowed into further chunks far more often than the
0.1% of rounds the slot count was sized for, and a run died when a round needed a third
chunk; the dropped slots now come on top of the configured ones."""

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import dpjax.cli  # noqa: F401  (registers the schema)
from dpjax.config import ConfigError, validate
from dpjax.loop import run_training

ROOT = Path(__file__).resolve().parents[2]
# 12 slots, 5 dropped every round: with the dropped slots taken from the 12, 7 free slots
# held Binomial(100, 0.1) users, two chunks 14; P(more than 14 users) is 7.3% per round,
# and with dp.randomness=seeded, train.seed=0 round 0 samples more (3 chunks).
OVERRIDES = ["dataset=digits", "model=mlp", "model.options.hidden=[16]", "dp.unit=user",
             "federated.num_users=100", "federated.users_per_round=10",
             "federated.num_slots=12", "train.steps=2", "train.eval_every=2",
             "dp.randomness=seeded", "dp.aggregation=secagg", "dp.secagg_mode=simulation",
             "dp.noise=skellam", "dp.secagg_bits=14", "dp.noise_multiplier=1.0",
             "dp.simulated_dropouts=5", "dp.min_survivors=7"]


def test_simulated_dropouts_that_leave_too_few_free_slots_are_refused_or_run(tmp_path):
    """Either the configuration is refused before training (naming dp.simulated_dropouts)
    or the run goes through; it died in round 0 with 'Expected at most 2 chunks per
    step ... Raise dp.physical_batch_size' (a key that does not apply at user level), at a
    round that depends on how many users were sampled."""
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("config", overrides=OVERRIDES))
    try:
        validate(cfg)
    except ConfigError as err:
        assert "dp.simulated_dropouts" in str(err)
        return
    failure, steps = "", None
    try:
        steps = run_training(cfg, tmp_path)["steps"]
    except ValueError as err:
        failure = str(err)
    assert steps == 2, failure
