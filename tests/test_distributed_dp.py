"""Distributed DP through the training loop: each SecAgg party adds discrete noise.

The pipeline and the samplers are tested in tests/secagg/, the accounting in
tests/test_rdp.py; here the pieces meet in ``dpjax.loop.run_training``.
"""

import json
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import dpjax.cli  # noqa: F401  (registers the schema)
from dpjax import rdp
from dpjax.config import ConfigError, validate
from dpjax.loop import run_training

ROOT = Path(__file__).resolve().parent.parent
BASE = ["experiment=digits_quick", "dp.randomness=seeded", "model.options.hidden=[4]",
        "train.steps=3", "train.eval_every=3", "train.log_every=3", "dp.aggregation=secagg",
        "dp.num_parties=4", "dp.secagg_mode=simulation", "dp.secagg_bits=16"]


def _cfg(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return OmegaConf.to_object(compose("config", overrides=[*BASE, *overrides]))


def _params(run_dir):
    manager = ocp.CheckpointManager((run_dir / "checkpoints").absolute())
    state = manager.restore(manager.latest_step(),
                            args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
    manager.close()
    return np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(state["params"])])


@pytest.mark.parametrize("noise", ["skellam", "ddgauss"])
def test_a_distributed_noise_run_reports_its_parameters_and_the_rdp_epsilon(noise, tmp_path):
    summary = run_training(_cfg(f"dp.noise={noise}"), tmp_path)
    assert summary["noise"] == noise and summary["secagg_bits"] == 16
    p = summary["distributed_dp"]
    assert p["bits"] == 16 and p["num_parties"] == 4 and p["min_honest_survivors"] == 4
    party = p["party_noise_variance"] if noise == "skellam" else np.sqrt(p["party_noise_variance"])
    expected = rdp.epsilon(party, summary["delta"], summary["sample_rate"], 3, noise=noise,
                           num_parties=4, l1_sensitivity=p["l1_sensitivity"],
                           l2_sensitivity=p["l2_sensitivity"], dim=p["padded_dim"])
    assert summary["epsilon"] == pytest.approx(expected, rel=1e-9)
    # the honest parties' noise has std sigma times the integer sensitivity
    total_var = 4 * p["party_noise_variance"]
    assert np.sqrt(total_var) == pytest.approx(p["noise_multiplier"] * p["l2_sensitivity"],
                                               rel=1e-6)
    assert json.loads((tmp_path / "summary.json").read_text())["noise"] == noise


def test_rounds_with_too_few_survivors_are_aborted_and_still_accounted(tmp_path):
    """Three of four parties must survive. With two dropping every round no round releases
    anything (the parameters stay at their initialization) yet every round is in the
    ledger; with one dropping the rounds go through."""
    from dpjax.task import build_task

    aborted = run_training(_cfg("dp.noise=skellam", "dp.min_survivors=3",
                                "dp.simulated_dropouts=2"), tmp_path / "aborted")
    survived = run_training(_cfg("dp.noise=skellam", "dp.min_survivors=3",
                                 "dp.simulated_dropouts=1"), tmp_path / "ok")
    init = np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(
        build_task(_cfg()).params)])
    np.testing.assert_array_equal(_params(tmp_path / "aborted"), init)
    assert not np.array_equal(_params(tmp_path / "ok"), init)
    assert aborted["steps"] == survived["steps"] == 3
    assert aborted["epsilon"] == survived["epsilon"] > 0  # the same three rounds accounted


def test_distributed_noise_without_secagg_or_with_too_few_bits_is_refused(tmp_path):
    cfg = _cfg("dp.noise=skellam")
    cfg.dp.aggregation = "sum"
    with pytest.raises(ConfigError, match="dp.noise='skellam'.*dp.aggregation='secagg'"):
        validate(cfg)
    # digits_quick's MLP (d = 4,810): below 11 bits no gamma keeps the wrap probability
    cfg = _cfg("dp.noise=skellam", "dp.secagg_bits=8", "model.options.hidden=[64]")
    with pytest.raises(ValueError, match="bits=8.*the smallest bits that would is 11"):
        run_training(cfg, tmp_path)
    with pytest.raises(ConfigError, match="dp.max_colluders=4"):
        validate(_cfg("dp.noise=skellam", "dp.max_colluders=4"))


def test_a_target_epsilon_calibrates_the_central_multiplier_with_the_discrete_accountant(
    tmp_path
):
    summary = run_training(_cfg("dp.noise=ddgauss", "dp.noise_multiplier=null",
                                "dp.target_epsilon=3.0"), tmp_path)
    assert 0.99 * 3.0 <= summary["epsilon"] <= 3.0


def test_calibration_searches_below_the_noise_that_no_longer_fits_the_modulus():
    """At 10 bits digits_quick's MLP (hidden [4], 4 parties) fits a central multiplier up
    to about 4.34, not 8. The calibration's doubling probes 8 on its way to a target whose
    sigma is 4.2: it must search below the limit, not refuse a target that fits (found running
    MNIST-1D at epsilon 2, 12 bits), and refuse one past the limit saying why."""
    from dpjax.assembly import assemble_parts
    from dpjax.secagg.ddp_params import NoRoomForNoise

    common = ("dp.noise=skellam", "dp.secagg_bits=10")
    cfg = _cfg(*common, "dp.noise_multiplier=4.2")
    target = assemble_parts(cfg).mechanism.epsilon(3, cfg.dp.delta, cfg.dp.accountant)
    with pytest.raises(NoRoomForNoise, match="bits=10"):
        assemble_parts(_cfg(*common, "dp.noise_multiplier=8"))
    mech = assemble_parts(_cfg(*common, "dp.noise_multiplier=null",
                               f"dp.target_epsilon={target}")).mechanism
    assert mech.noise_multiplier == pytest.approx(4.2, rel=2e-3)
    assert mech.epsilon(3, cfg.dp.delta, cfg.dp.accountant) <= target
    with pytest.raises(NoRoomForNoise, match=r"target_epsilon=0.01 .*secagg_bits=10: the most "
                                             r"noise that fits"):
        assemble_parts(_cfg(*common, "dp.noise_multiplier=null", "dp.target_epsilon=0.01"))


def test_simulated_dropouts_without_distributed_noise_are_refused():
    """Central noise simulates no dropped parties: the key would be silently ignored."""
    cfg = _cfg("dp.noise=gaussian", "dp.simulated_dropouts=1")
    with pytest.raises(ConfigError, match="dp.simulated_dropouts=1.*dp.noise"):
        validate(cfg)
