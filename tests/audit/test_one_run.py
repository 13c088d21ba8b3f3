"""The one-run training audit: canaries, coins, consistency and broken variants.

The audit runs ``experiment=digits_quick`` (a 16-unit MLP on scikit-learn's digits) in
seeded mode: expected batch 1,024 of about 1,790 rows (q ~ 0.57), 20 steps, sigma 5.4,
claimed epsilon ~1.95 at delta = 1e-5 (PLD accountant), m = 700 Dirac canaries (about
half the 1,438 training rows). Broken variants (the noise divided by 4, or clipping that
does not clip, both by monkeypatching the library) must be flagged by the white-box
bound: lower bound > claim, with the claim at most 2.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import dpjax.cli  # noqa: F401  (registers the schema)
from dpjax import clip_math, randomness
from dpjax.assembly import assemble_parts, step_of
from dpjax.audit import canaries
from dpjax.audit.one_run import inclusion_coins, plant, recording, run_one_run_audit
from dpjax.distributed import place_chunks
from dpjax.secagg.chacha import chacha20_stream
from dpjax.task import build_task
from dpjax.train import init_state

ROOT = Path(__file__).resolve().parents[2]
BASE = ["experiment=digits_quick", "dp.randomness=seeded", "model.options.hidden=[16]",
        "train.batch_size=1024", "train.steps=20", "dp.noise_multiplier=5.4",
        "dp.accountant=pld"]
CANARIES = 700
REQUIRED = ("method", "epsilon_claimed", "epsilon_lower_bound", "delta", "consistent",
            "num_canaries", "canary", "inclusion_seed", "epsilon_lower_bound_white_box",
            "epsilon_lower_bound_black_box")


def _cfg(overrides=()):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return OmegaConf.to_object(compose("config", overrides=[*BASE, *overrides]))


@pytest.fixture(scope="module")
def digits_task():
    return build_task(_cfg())


def _audit(seed=0, canary="dirac", num_canaries=CANARIES):
    return run_one_run_audit(_cfg(), num_canaries=num_canaries, seed=seed, canary=canary,
                             delta=1e-5, confidence=0.95)


# ------------------------------------------------------------------------------ canaries


def test_each_canary_is_included_with_probability_one_half():
    # 200,000 coins: the in-fraction within 4 standard errors (4 * 0.5 / sqrt(n) = 0.0045)
    # of 1/2, and so is the fraction of equal neighbours (independence of consecutive coins).
    n = 200_000
    secret = randomness.seeded_secret(11)
    coins = inclusion_coins(secret, n)
    bound = 4 * 0.5 / np.sqrt(n)
    assert abs(coins.mean() - 0.5) < bound, coins.mean()
    assert abs((coins[1:] == coins[:-1]).mean() - 0.5) < bound
    # Independent reference: the low bit of the device ChaCha20 keystream of the same stream.
    key = randomness.stream_key(secret, randomness.Stream.AUDIT, 1)
    words = np.asarray(chacha20_stream(key.key, key.nonce, 1000))
    np.testing.assert_array_equal(coins[:1000], (words & 1).astype(bool))


def test_inclusion_is_reproducible_when_seeded_and_fresh_when_secure():
    seeded = [inclusion_coins(randomness.run_secret("seeded", 3), CANARIES) for _ in range(2)]
    np.testing.assert_array_equal(*seeded)
    assert not np.array_equal(seeded[0], inclusion_coins(randomness.run_secret("seeded", 4),
                                                         CANARIES))
    secure = [inclusion_coins(randomness.run_secret("secure", 3), CANARIES) for _ in range(2)]
    assert not np.array_equal(*secure)  # equal with probability 2^-700


@pytest.mark.parametrize("kind", ["input", "dirac"])
def test_canaries_go_into_the_training_split_only(digits_task, kind):
    task = digits_task
    planted = plant(task, kind, CANARIES, seed=5, secret=randomness.seeded_secret(5))
    chosen, included, new = planted.canaries, planted.included, planted.task
    rest = chosen.rest
    assert len(new.x_train) == len(rest) + included.sum()
    np.testing.assert_array_equal(new.x_train[:len(rest)], task.x_train[rest])
    np.testing.assert_array_equal(new.y_train[:len(rest)], task.y_train[rest])
    np.testing.assert_array_equal(new.x_train[len(rest):], chosen.x[included])
    np.testing.assert_array_equal(new.y_train[len(rest):], chosen.y[included])
    assert new.test_split is task.test_split and new.holdout is task.holdout
    if kind == "input":  # training rows set aside, each with another label
        assert len(rest) == len(task.x_train) - CANARIES
        assert not np.isin(chosen.source_indices, rest).any()
        np.testing.assert_array_equal(chosen.x, task.x_train[chosen.source_indices])
        assert (chosen.y != task.y_train[chosen.source_indices]).all()
        assert ((0 <= chosen.y) & (chosen.y < task.num_classes)).all()
    else:  # Dirac rows appended, each on its own coordinate; no real row carries a marker
        assert len(rest) == len(task.x_train)
        assert len(np.unique(chosen.coordinates)) == CANARIES
        assert (new.y_train >= task.num_classes).sum() == included.sum()
        assert (task.test_split[1] < task.num_classes).all()


def test_mislabeled_canaries_refuse_more_than_half_the_training_set():
    x, y = np.zeros((10, 2), np.float32), np.arange(10) % 3
    with pytest.raises(ValueError, match="num_canaries=6"):
        canaries.mislabeled_canaries(x, y, 3, 6, seed=0)


def test_a_dirac_row_has_the_clip_norm_on_its_own_coordinate(digits_task):
    task = digits_task
    coords = np.array([3, 700, 1100])
    loss = canaries.dirac_rows_loss(task.loss_fn, task.num_classes, coords)
    x = task.x_train[:4]
    y = np.array([task.y_train[0], 10, 11, 12], np.int32)  # one real row, three canaries
    grads = jax.jit(clip_math.per_example_grads, static_argnums=0)(
        loss, task.params, (jnp.asarray(x), jnp.asarray(y)))
    flat = np.concatenate([np.asarray(g).reshape(4, -1) for g in
                           jax.tree_util.tree_leaves(grads)], axis=1)
    for row, j in zip((1, 2, 3), coords, strict=True):
        expected = np.zeros(flat.shape[1])
        expected[j] = canaries.DIRAC_MAGNITUDE
        np.testing.assert_array_equal(flat[row], expected)
    real = clip_math.per_example_grads(task.loss_fn, task.params,
                                       (jnp.asarray(x[:1]), jnp.asarray(y[:1])))
    np.testing.assert_allclose(flat[0], np.concatenate(
        [np.asarray(g).reshape(-1) for g in jax.tree_util.tree_leaves(real)]),
        rtol=1e-6, atol=1e-7)


def test_the_recording_optimizer_keeps_the_iterates_and_sees_the_privatized_gradient(
        digits_task):
    # Two SGD steps of the real mechanism, with and without the recording wrapper: the same
    # parameters bit for bit, and the recorded gradient is (theta_t - theta_{t+1}) / lr.
    cfg = _cfg(["train.batch_size=64"])
    parts = assemble_parts(cfg, task=digits_task)
    secret = randomness.seeded_secret(0)
    lr = 0.5
    states = []
    for opt in (optax.sgd(lr), recording(optax.sgd(lr))):
        step = step_of(cfg, parts, opt)
        state = init_state(parts.task.params, opt, secret=secret,
                           privatizer=parts.mechanism.privatizer())
        sampler = parts.mechanism.sampler(secret)
        for t in range(2):
            before = np.concatenate([np.asarray(a).ravel() for a in
                                     jax.tree_util.tree_leaves(state.params)])
            chunks = place_chunks(sampler.sample(t), parts.task.x_train, parts.task.y_train,
                                  None)
            state, _ = step.run(state, chunks)
        states.append((state, before))
    (plain, _), (recorded, before) = states
    leaves = jax.tree_util.tree_leaves
    for a, b in zip(leaves(plain.params), leaves(recorded.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    after = np.concatenate([np.asarray(a).ravel() for a in leaves(recorded.params)])
    seen = np.concatenate([np.asarray(a).ravel() for a in leaves(recorded.opt_state[1])])
    np.testing.assert_allclose(seen, (before - after) / lr, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------ the audit


@pytest.mark.parametrize("broken", ["noise", "clip"])
def test_the_white_box_bound_flags_a_broken_mechanism(broken, break_mechanism):
    break_mechanism(broken)
    result = _audit()
    print(f"one-run, broken ({broken}): claim {result.epsilon_claimed:.3f}, white-box bound "
          f"{result.epsilon_lower_bound_white_box:.3f}, black-box "
          f"{result.epsilon_lower_bound_black_box:.3f}")
    assert result.epsilon_claimed <= 2.0, result
    assert result.epsilon_lower_bound_white_box > result.epsilon_claimed, result
    assert not result.consistent


@pytest.mark.slow
def test_the_one_run_audit_is_consistent_on_the_correct_mechanism_over_five_seeds():
    results = [_audit(seed) for seed in range(5)]
    for seed, r in enumerate(results):
        print(f"seed {seed}: claim {r.epsilon_claimed:.3f}, bound {r.epsilon_lower_bound:.3f} "
              f"(white {r.epsilon_lower_bound_white_box:.3f}, "
              f"black {r.epsilon_lower_bound_black_box:.3f}), {r.num_included} in")
        assert r.consistent and r.epsilon_lower_bound <= r.epsilon_claimed, r
        assert r.epsilon_claimed <= 2.0 and r.num_canaries == CANARIES
    # different seeds, different coins
    assert len({r.num_included for r in results}) > 1


def test_the_cli_writes_audit_json_and_exits_zero_when_consistent(tmp_path):
    overrides = [*BASE, "audit=one_run", "audit.num_canaries=200", "audit.canary=input",
                 "train.steps=5", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run([sys.executable, "-m", "dpjax.audit.cli", *overrides],
                          capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "audit.json").read_text())
    assert set(REQUIRED) <= set(result), sorted(result)
    assert result["method"] == "one_run" and result["kind"] == "one_run"
    assert result["num_canaries"] == 200 and result["canary"] == "mislabeled"
    assert result["inclusion_seed"] == 0 and result["consistent"] is True
    assert result["epsilon_lower_bound"] <= result["epsilon_claimed"]
    assert result["epsilon_lower_bound"] == max(result["epsilon_lower_bound_white_box"],
                                                result["epsilon_lower_bound_black_box"])


@pytest.mark.parametrize("kwargs, match", [
    ({"canary": "gradient"}, "audit.canary='gradient'"),
    ({"num_canaries": 0}, "num_canaries=0"),
    ({"delta": 0.0}, "delta=0.0"),
])
def test_bad_arguments_are_refused_before_any_compute(kwargs, match, monkeypatch):
    def no_task(cfg):
        raise AssertionError("built the task before checking the arguments")

    monkeypatch.setattr("dpjax.audit.one_run.build_task", no_task)
    args = {"num_canaries": 10, "seed": 0, "canary": "dirac", "delta": 1e-5,
            "confidence": 0.95, **kwargs}
    with pytest.raises(ValueError, match=match):
        run_one_run_audit(_cfg(), **args)
    with pytest.raises(ValueError, match="dp.sampling='fixed_size'"):
        run_one_run_audit(_cfg(["dp.sampling=fixed_size"]), **{**args, **{
            "canary": "dirac", "num_canaries": 10, "delta": 1e-5}})
