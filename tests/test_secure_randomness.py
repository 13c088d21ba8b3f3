"""The run's secret, end to end through the training loop (privacy rule 2).

The adversarial review replayed a run from its public config and seed, and recovered
the exact un-noised clipped sum from a sigma sweep at one seed. These tests run the
real loop (``dpjax.loop.run_training``) on a problem whose clipped sum can be computed
independently: a sample rate of 1 (every example in the one batch), one SGD step with
learning rate 1, so ``-B * (params_1 - params_0) = clipped_sum + sigma * C * z`` and the
noise ``z`` of each run can be read off.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import dpjax
from dpjax import checkpoint, randomness
from dpjax.config import (
    ConfigError,
    DatasetConfig,
    DPConfig,
    ModelConfig,
    OptimizerConfig,
    RunConfig,
    TrainConfig,
    validate,
)
from dpjax.data import load_dataset
from dpjax.loop import run_training
from dpjax.models import get_model
from dpjax.sampling import PoissonSampler
from dpjax.train import cross_entropy_loss

N, SEED, CLIP = 64, 5, 0.5
DATA = {"num_train": N, "num_test": 16, "num_features": 12, "num_classes": 4, "seed": 1}
HIDDEN = [64]


def _config(*, sigma=1.0, mode="secure", steps=1, batch_size=N, **train):
    return RunConfig(
        dataset=DatasetConfig("synthetic", options=dict(DATA)),
        model=ModelConfig("mlp", {"hidden": HIDDEN}),
        optimizer=OptimizerConfig(name="sgd", learning_rate=1.0),
        dp=DPConfig(noise_multiplier=sigma, l2_clip_norm=CLIP, randomness=mode),
        train=TrainConfig(steps=steps, batch_size=batch_size, seed=SEED, eval_every=steps,
                          log_every=1, **train),
    )


def _final_state(run_dir):
    manager = ocp.CheckpointManager((run_dir / "checkpoints").absolute())
    restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))
    manager.close()
    return restored.state


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(a, np.float64))
                           for a in jax.tree_util.tree_leaves(tree)])


@pytest.fixture(scope="module")
def problem():
    """Initial parameters (public: from train.seed) and the exact clipped sum of the batch."""
    ds = load_dataset("synthetic", **DATA)
    model = get_model("mlp", ds.num_classes, hidden=HIDDEN)
    params = model.init(jax.random.PRNGKey(SEED), jnp.asarray(ds.x_train[:1]))["params"]
    summed, _ = dpjax.clipped_grad(cross_entropy_loss(model.apply), l2_clip_norm=CLIP)(
        params, (jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)), jnp.ones(N))
    return _flat(params), _flat(summed)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One step at sigma 1 and 2, secure and seeded, same seed: ``v = -B (p1 - p0)``."""
    out = {}
    for name, sigma, mode in [("secure1", 1.0, "secure"), ("secure1b", 1.0, "secure"),
                              ("secure2", 2.0, "secure"), ("seeded1", 1.0, "seeded"),
                              ("seeded1b", 1.0, "seeded"), ("seeded2", 2.0, "seeded")]:
        run_dir = tmp_path_factory.mktemp(name)
        run_training(_config(sigma=sigma, mode=mode), run_dir)
        out[name] = run_dir
    return out


def _released(run_dir, problem):
    p0, _ = problem
    return -N * (_flat(_final_state(run_dir)["params"]) - p0)


def _noise(run_dir, problem, sigma):
    return (_released(run_dir, problem) - problem[1]) / (sigma * CLIP)


def test_the_released_step_is_the_clipped_sum_plus_unit_noise(runs, problem):
    for name in ("secure1", "seeded1"):
        z = _noise(runs[name], problem, 1.0)
        assert abs(z.std() - 1) < 4 / np.sqrt(2 * z.size)  # the noise really is sigma C


def test_two_secure_runs_with_the_same_seed_draw_independent_noise(runs, problem):
    a, b = _noise(runs["secure1"], problem, 1.0), _noise(runs["secure1b"], problem, 1.0)
    seeded = _noise(runs["seeded1"], problem, 1.0)
    bound = 4 / np.sqrt(a.size)  # sd of the correlation of independent vectors: 1/sqrt(d)
    assert abs(np.corrcoef(a, b)[0, 1]) < bound
    assert abs(np.corrcoef(a, seeded)[0, 1]) < bound


def test_seeded_runs_are_bit_identical(runs):
    a, b = _final_state(runs["seeded1"]), _final_state(runs["seeded1b"])
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    sa = json.loads((runs["seeded1"] / "summary.json").read_text())
    assert sa["randomness"] == "seeded"
    assert json.loads((runs["secure1"] / "summary.json").read_text())["randomness"] == "secure"


def test_a_sigma_sweep_at_one_seed_reveals_the_clipped_sum_only_in_seeded_mode(runs, problem):
    """2 v(sigma=1) - v(sigma=2) = s + C (2 z1 - 2 z2): exactly s when z1 = z2 (seeded),
    off by about 2 C sqrt(2 d) when the noises are independent (secure)."""
    s = problem[1]
    seeded = 2 * _released(runs["seeded1"], problem) - _released(runs["seeded2"], problem)
    assert np.linalg.norm(seeded - s) < 1e-3 * np.linalg.norm(s)
    secure = 2 * _released(runs["secure1"], problem) - _released(runs["secure2"], problem)
    expected = 2 * CLIP * np.sqrt(2 * s.size)
    assert 0.9 * expected < np.linalg.norm(secure - s) < 1.1 * expected
    assert np.linalg.norm(secure - s) > np.linalg.norm(s)  # larger than the sum itself


def test_the_batches_come_from_the_runs_secret_not_from_the_seed(tmp_path):
    """q = 1/2 over 4 steps: the realized batch sizes (non-private diagnostics) are those the
    checkpoint's secret gives, and not those of the seed."""
    run_training(_config(mode="secure", steps=4, batch_size=N // 2), tmp_path)
    secret = _final_state(tmp_path)["key"]["words"]
    diag = [json.loads(line) for line in
            (tmp_path / "diagnostics.nonprivate.jsonl").read_text().splitlines()]
    sizes = [d["batch_size"] for d in diag if not d.get("final")]

    def realized(sampler):
        return [int(sampler.sample(t)[0].mask.sum()) for t in range(4)]

    physical = N  # the default physical size covers every example here
    from_secret = realized(PoissonSampler(N, 0.5, physical, seed=None,
                                          secret=randomness.Secret(secret)))
    assert sizes == from_secret
    assert sizes != realized(PoissonSampler(N, 0.5, physical, seed=SEED))


def test_resuming_against_other_training_data_is_refused(tmp_path):
    """The checkpoint fingerprints the data under the run's secret: resuming on changed data
    would reuse the noise of the checkpointed steps on other examples."""
    arrays = {"x_train": np.random.default_rng(0).standard_normal((N, 6)),
              "y_train": np.arange(N) % 2, "x_test": np.zeros((4, 6)), "y_test": np.arange(4) % 2}
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    cfg = _config(steps=2)
    cfg.dataset = DatasetConfig("npz", options={"path": str(path), "num_classes": 2})
    run_dir = tmp_path / "run"
    run_training(cfg, run_dir)
    run_training(cfg, run_dir)  # the same data resumes (nothing left to do)
    arrays["x_train"][3, 0] += 1.0
    np.savez(path, **arrays)
    with pytest.raises(checkpoint.CheckpointError, match="data fingerprint differs"):
        run_training(cfg, run_dir)


def test_secure_randomness_with_simulation_masks_is_refused():
    cfg = _config()
    cfg.dp.aggregation, cfg.dp.num_parties, cfg.dp.secagg_mode = "secagg", 4, "simulation"
    with pytest.raises(ConfigError, match="dp.secagg_mode='simulation'.*dp.randomness='secure'"):
        validate(cfg)
    cfg.dp.randomness = "seeded"
    validate(cfg)
    cfg.dp.randomness = "replayable"
    with pytest.raises(ConfigError, match="dp.randomness='replayable'"):
        validate(cfg)


def test_seeded_mode_says_what_it_does_not_protect_against(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="dpjax"):
        run_training(_config(mode="seeded", steps=1), tmp_path)
    assert any("dp.randomness=seeded" in r.message and "replay" in r.message
               for r in caplog.records)
