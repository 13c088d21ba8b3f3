"""dpjax.checkpoint in process: round trip, refusals, and noise keys across a restart."""

import dataclasses

import jax
import numpy as np
import optax
import pytest

from dpjax.checkpoint import Checkpointer, CheckpointError, fingerprint
from dpjax.config import RunConfig
from dpjax.sampling import PoissonSampler
from dpjax.train import init_state, make_dp_step, noise_key

SIGMA, CLIP = 1.0, 0.5


def _setup(mlp_problem):
    loss_fn, params, _ = mlp_problem
    opt = optax.adam(0.05)
    step = make_dp_step(loss_fn, opt, noise_multiplier=SIGMA, l2_clip_norm=CLIP,
                        expected_batch_size=15.0)
    rng = np.random.RandomState(0)
    x = rng.randn(300, 6, 6, 1).astype(np.float32)
    y = rng.randint(0, 10, 300).astype(np.int32)
    sampler = PoissonSampler(300, 0.05, 16, seed=4)

    def run(state, steps):
        keys = []
        for t in range(int(state.step), steps):
            keys.append(np.asarray(noise_key(state)))
            chunks = [((x[c.indices], y[c.indices]), c.mask) for c in sampler.sample(t)]
            state, _ = step.run(state, chunks)
        return state, keys

    return params, opt, run


def test_resume_from_a_checkpoint_is_bitwise_and_never_reuses_a_noise_key(mlp_problem, tmp_path):
    params, opt, run = _setup(mlp_problem)
    straight, _ = run(init_state(params, opt, seed=9), 6)

    first, keys_before = run(init_state(params, opt, seed=9), 3)
    ckpt = Checkpointer(tmp_path / "ckpt", {"a": 1})
    ckpt.save(first, {"note": "x"})
    restored = Checkpointer(tmp_path / "ckpt", {"a": 1}).restore_latest(
        init_state(params, opt, seed=9))
    assert restored.step == 3 and restored.meta["note"] == "x"
    np.testing.assert_array_equal(restored.state.key, jax.random.PRNGKey(9))
    resumed, keys_after = run(restored.state, 6)

    for a, b in zip(jax.tree_util.tree_leaves(straight), jax.tree_util.tree_leaves(resumed),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    keys = {tuple(k) for k in keys_before + keys_after}
    assert len(keys_before + keys_after) == 6 and len(keys) == 6  # one fresh key per step


def test_an_empty_directory_restores_nothing(mlp_problem, tmp_path):
    params, opt, _ = _setup(mlp_problem)
    assert Checkpointer(tmp_path / "none", {}).restore_latest(init_state(params, opt, 0)) is None


def test_a_checkpoint_of_another_config_is_refused_naming_every_differing_key(
    mlp_problem, tmp_path
):
    params, opt, _ = _setup(mlp_problem)
    cfg = RunConfig()
    Checkpointer(tmp_path, fingerprint(cfg, noise_multiplier=1.0)).save(
        init_state(params, opt, 0), {})
    other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=5, log_every=1))
    with pytest.raises(CheckpointError, match=r"train.seed \(checkpoint 0, this run 5\)") as err:
        Checkpointer(tmp_path, fingerprint(other, noise_multiplier=1.0)).restore_latest(
            init_state(params, opt, 0))
    assert "log_every" not in str(err.value)  # logging does not change the trajectory
    with pytest.raises(CheckpointError, match=r"resolved.noise_multiplier"):
        Checkpointer(tmp_path, fingerprint(cfg, noise_multiplier=2.0)).restore_latest(
            init_state(params, opt, 0))


def test_a_state_of_another_shape_is_refused(mlp_problem, tmp_path):
    params, opt, _ = _setup(mlp_problem)
    Checkpointer(tmp_path, {}).save(init_state(params, opt, 0), {})
    wider = jax.tree_util.tree_map(lambda p: np.zeros((*p.shape[:-1], p.shape[-1] + 1),
                                                      p.dtype), params)
    with pytest.raises(CheckpointError, match="parameter and optimizer tree"):
        Checkpointer(tmp_path, {}).restore_latest(init_state(wider, opt, 0))
    with pytest.raises(CheckpointError, match="parameter and optimizer tree"):
        Checkpointer(tmp_path, {}).restore_latest(init_state(params, optax.sgd(0.1), 0))


def test_unreadable_metadata_is_refused(mlp_problem, tmp_path):
    params, opt, _ = _setup(mlp_problem)
    Checkpointer(tmp_path, {}).save(init_state(params, opt, 0), {})
    for f in (tmp_path / "0" / "meta").rglob("*"):
        if f.is_file():
            f.write_text("{not json")
    with pytest.raises(CheckpointError, match="Expected a readable checkpoint step 0"):
        Checkpointer(tmp_path, {}).restore_latest(init_state(params, opt, 0))
