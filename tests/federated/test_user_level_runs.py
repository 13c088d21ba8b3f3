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
# distributed noise at 14 bits: party noise from the alias table (20 bits: the rejection
# sampler, several times the compile time for the same properties)
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
                          "dp.noise=skellam", "dp.secagg_bits=14"), tmp_path)
    p = s["distributed_dp"]
    assert s["unit"] == "user" and p["unit"] == "user" and p["num_parties"] > 10
    # user level: the sensitivity is conditional rounding's bound on a party's vector
    assert p["rounding_l2_bound"] == p["l2_sensitivity"]


@pytest.mark.parametrize("noise", ["skellam", "ddgauss"])
def test_user_level_distributed_noise_has_the_claimed_std(noise):
    """Ten rounds of empty slots through the CLI's own assembly (digits, 16 bits): every
    slot is a noise-only party, so the update is the decoded noise alone. Its std, times
    q U, over the mechanism's noise_std is 1 within 4 standard errors (10 x 1210 draws:
    1 / sqrt(2 * 12100) = 0.0064). Observed 0.9947 (Skellam, 20 users per round,
    2026-11-30), where a run's accuracy had come out above the central Gaussian's."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from dpjax.assembly import assemble_parts
    from dpjax.federated.rounds import make_round_step
    from dpjax.randomness import seeded_secret
    from dpjax.train import init_state

    cfg = _cfg("dp.noise_multiplier=1.0",
               "dp.aggregation=secagg", "dp.secagg_mode=simulation", f"dp.noise={noise}",
               "dp.secagg_bits=16")
    parts = assemble_parts(cfg)
    mech, local = parts.mechanism, parts.federated[1]
    assert mech.distributed and mech.clipped.aggregation.params.noise == noise
    slots, rows = mech.physical_batch_size, local.rows_per_slot
    sgd = optax.sgd(1.0)
    step = make_round_step(parts.task.loss_fn, sgd, local, mech.clipped, mech.privatizer())
    state = init_state(parts.task.params, sgd, secret=seeded_secret(3),
                       privatizer=mech.privatizer())
    x = parts.task.x_train
    empty = (((jnp.zeros((slots, rows, *x.shape[1:]), x.dtype),
               jnp.zeros((slots, rows), jnp.int32)), jnp.zeros((slots, rows))),
             jnp.zeros(slots))

    def flat(tree):
        return np.concatenate([np.ravel(np.asarray(a)) for a in jax.tree_util.tree_leaves(tree)])

    draws = []
    for _ in range(10):
        before = flat(state.params)
        state, _ = step.run(state, [empty])
        draws.append(before - flat(state.params))
    z = np.concatenate(draws) * mech.expected_batch_size / mech.noise_std
    assert abs(z.std() - 1.0) < 4 / np.sqrt(2 * z.size)
    assert abs(z.mean()) < 4 / np.sqrt(z.size)


def test_user_level_simulated_dropouts_abort_below_min_survivors_and_run_above(tmp_path):
    """Two of the round's slots drop out every round (extra slots, kept empty by the user
    sampler, so users keep the default number of free slots). With
    every slot required (the default) no round releases anything, yet all are accounted;
    requiring two fewer, the rounds go through."""
    import jax
    import numpy as np

    from dpjax.federated.slots import default_num_slots

    slots = default_num_slots(100, 0.1) + 2  # the dropped slots come on top
    common = ("dp.aggregation=secagg", "dp.secagg_mode=simulation", "dp.noise=skellam",
              "dp.secagg_bits=14", "dp.simulated_dropouts=2")
    aborted = run_training(_cfg(*common), tmp_path / "aborted")
    ok = run_training(_cfg(*common, f"dp.min_survivors={slots - 2}"), tmp_path / "ok")
    assert aborted["distributed_dp"]["num_parties"] == ok["distributed_dp"]["num_parties"] == slots
    assert aborted["epsilon"] > 0 and aborted["steps"] == ok["steps"] == 3

    def params(run_dir):
        import orbax.checkpoint as ocp

        manager = ocp.CheckpointManager((run_dir / "checkpoints").absolute())
        state = manager.restore(manager.latest_step(), args=ocp.args.Composite(
            state=ocp.args.StandardRestore())).state
        manager.close()
        return np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(state["params"])])

    from dpjax.task import build_task

    init = np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(
        build_task(_cfg()).params)])
    np.testing.assert_array_equal(params(tmp_path / "aborted"), init)
    assert not np.array_equal(params(tmp_path / "ok"), init)


def test_user_level_survivor_settings_are_checked_against_the_slots_before_training():
    """At user level the parties are the round's slots, known once the data is: the
    assembly refuses a min_survivors above them (or colluders at or above the survivors)
    naming the key, before any compute."""
    from dpjax.assembly import assemble_parts
    from dpjax.federated.slots import default_num_slots

    slots = default_num_slots(100, 0.1)
    common = ("dp.aggregation=secagg", "dp.secagg_mode=simulation", "dp.noise=skellam",
              "dp.secagg_bits=14")
    with pytest.raises(ConfigError, match=rf"dp.min_survivors={slots + 1}.*{slots} slots"):
        assemble_parts(_cfg(*common, f"dp.min_survivors={slots + 1}"))
    with pytest.raises(ConfigError, match="dp.max_colluders=3.*surviving parties \\(3\\)"):
        assemble_parts(_cfg(*common, "dp.min_survivors=3", "dp.max_colluders=3"))
