"""DP-FedAvg rounds: equal to plain FedAvg without noise and clipping, one user moves the
aggregate by at most C (also adversarial users, per-layer bounds and SecAgg), the noise has
the user-level std over q U, and the accountant records the user sampling rate."""

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import NUM_CLASSES, NUM_FEATURES, data, initial_params, numpy_grad

from dpjax import accounting
from dpjax.aggregation import SecAggSettings
from dpjax.choices import Unit
from dpjax.federated.local import LocalTraining, clipped_user_sum
from dpjax.federated.rounds import (
    make_fedavg_step,
    make_round_step,
    user_level_mechanism,
    user_sampler,
    user_secagg,
)
from dpjax.federated.users import iid_partition
from dpjax.randomness import seeded_secret
from dpjax.train import init_state

LOCAL_LR, LOCAL_MOMENTUM, EPOCHS, BATCH, CAP = 0.3, 0.5, 2, 3, 8


def _reference_local(w, b, x, y, examples):
    """A user's local SGD with momentum (optax's trace: v = g + m v), by hand in float64."""
    w, b = w.copy(), b.copy()
    vw, vb = np.zeros_like(w), np.zeros_like(b)
    for _ in range(EPOCHS):
        for start in range(0, len(examples), BATCH):
            idx = examples[start:start + BATCH]
            gw, gb = numpy_grad(w, b, x[idx], y[idx])
            vw, vb = gw + LOCAL_MOMENTUM * vw, gb + LOCAL_MOMENTUM * vb
            w, b = w - LOCAL_LR * vw, b - LOCAL_LR * vb
    return w, b


def _local():
    return LocalTraining(optax.sgd(LOCAL_LR, momentum=LOCAL_MOMENTUM), epochs=EPOCHS,
                         batch_size=BATCH, max_examples=CAP)


def _loss(params, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(x @ params["w"] + params["b"], y)


def test_without_noise_and_clipping_dp_fedavg_equals_plain_fedavg():
    """Three rounds, 12 users of 10 examples (cap 8: a subset each round), 4 slots for ~6
    sampled users (overflow chunks), server SGD with momentum; against FedAvg by hand."""
    x, y = data(120)
    params, q, server_lr, server_momentum = initial_params(), 0.5, 0.7, 0.9
    partition = iid_partition(120, 12, seed=0)
    local = _local()
    mech = user_level_mechanism(num_users=12, sample_rate=q, l2_clip_norm=1e6, params=params,
                                noise_multiplier=0.0, num_slots=4)
    secret = seeded_secret(1)
    sampler = user_sampler(mech, partition, local, secret=secret)
    server = optax.sgd(server_lr, momentum=server_momentum)
    step = make_fedavg_step(_loss, server, local, mech, x, y)
    state = init_state(params, server, secret=secret, privatizer=mech.privatizer())

    w, b = (np.asarray(params[k], np.float64) for k in ("w", "b"))
    mw, mb = np.zeros_like(w), np.zeros_like(b)
    chunk_counts = []
    for t in range(3):
        round_users = sampler.sample(t)
        chunk_counts.append(len(round_users))
        users = np.concatenate([c.users[c.slot_mask > 0] for c in round_users])
        sum_w, sum_b = np.zeros_like(w), np.zeros_like(b)
        for u in users:
            lw, lb = _reference_local(w, b, x, y, sampler.local_examples(t, int(u)))
            sum_w, sum_b = sum_w + (lw - w), sum_b + (lb - b)
        gw, gb = -sum_w / (q * 12), -sum_b / (q * 12)  # FedAvg's pseudo-gradient
        mw, mb = gw + server_momentum * mw, gb + server_momentum * mb
        w, b = w - server_lr * mw, b - server_lr * mb
        state, stats = step.run(state, round_users)
        assert int(stats.batch_size) == len(users)
    assert max(chunk_counts) >= 2  # some round spilled into a second slot chunk
    assert np.abs(w - np.asarray(initial_params()["w"])).max() > 0.05  # it did train
    np.testing.assert_allclose(np.asarray(state.params["w"]), w, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(np.asarray(state.params["b"]), b, rtol=1e-4, atol=2e-5)


def _adversarial_slots(num_slots=6, seed=0):
    """Users with scaled-up features (huge local steps), one with non-finite features."""
    x, y = data(num_slots * 4, seed=seed)
    xs = x.reshape(num_slots, 4, NUM_FEATURES) * np.array([1, 100, 1e4, 1, 1e3, 1])[
        :num_slots, None, None].astype(np.float32)
    xs[3, 1] = np.inf
    return ((jnp.asarray(xs), jnp.asarray(y.reshape(num_slots, 4))), jnp.ones((num_slots, 4)))


def _removals(n):
    """Row 0: every slot's user; row j + 1: all but user j."""
    return jnp.concatenate([jnp.ones((1, n)), 1.0 - jnp.eye(n)])


def _flat(tree):
    return np.concatenate([np.ravel(tree[k]) for k in sorted(tree)])


@pytest.mark.parametrize("l2_clip_norm", [0.5, {"w": 0.3, "b": 0.4}])
def test_removing_one_user_moves_the_clipped_sum_by_at_most_c(l2_clip_norm):
    """Adversarial users (local learning rate 1e3, features up to 1e4): one user's removal
    changes the sum by at most its clip bound (0.5 in both cases: sqrt(0.3^2 + 0.4^2))."""
    local = LocalTraining(optax.sgd(1e3), epochs=3, batch_size=2, max_examples=4)
    fn = clipped_user_sum(_loss, local, l2_clip_norm)
    slots = _adversarial_slots()
    totals, norms = jax.vmap(fn, in_axes=(None, None, 0))(initial_params(), slots,
                                                          _removals(6))
    full = {k: np.asarray(v[0], np.float64) for k, v in totals.items()}
    for j in range(6):
        diff = {k: full[k] - np.asarray(v[j + 1], np.float64) for k, v in totals.items()}
        assert np.linalg.norm(_flat(diff)) <= 0.5 * (1 + 1e-5)
        if isinstance(l2_clip_norm, dict):
            for k, bound in l2_clip_norm.items():
                assert np.linalg.norm(diff[k]) <= bound * (1 + 1e-5)
    user_norms = np.asarray(norms[0])
    assert (user_norms[np.isfinite(user_norms)] > 5).sum() >= 3  # clipping really acted
    removal_sizes = [np.linalg.norm(_flat({k: full[k] - np.asarray(v[j + 1]) for k, v in
                                           totals.items()})) for j in range(6)]
    assert max(removal_sizes) > 0.49  # the bound is attained: the test could fail
    assert not np.isfinite(user_norms[3]) and removal_sizes[3] == 0.0  # non-finite: dropped


@pytest.mark.slow  # compiles a SecAgg round (~10 s on a loaded 2-core machine)
def test_removing_one_user_moves_a_secagg_total_by_at_most_c_plus_the_rounding_slack():
    local = LocalTraining(optax.sgd(1e3), epochs=1, batch_size=2, max_examples=4)
    aggregation = user_secagg(SecAggSettings(6, mode="simulation", seed=3), 0.5)
    party_sums = jax.jit(aggregation.local(clipped_user_sum(_loss, local, 0.5)))
    slots = _adversarial_slots()
    finish = jax.jit(aggregation.finish, static_argnums=2)
    round_masks = aggregation.prepare(0)
    key = jax.random.PRNGKey(9)  # the same rounding draws in both worlds
    params = initial_params()
    partial, _ = party_sums(params, slots, jnp.ones(6))
    full = _flat(finish(partial, round_masks, 1, key, 0))
    d = NUM_FEATURES * NUM_CLASSES + NUM_CLASSES
    bound = 0.5 + np.sqrt(d) / aggregation.scale
    sizes = []
    for j in (0, 2, 4):
        partial, _ = party_sums(params, slots, jnp.ones(6).at[j].set(0.0))
        sizes.append(np.linalg.norm(full - _flat(finish(partial, round_masks, 1, key, 0))))
    assert max(sizes) <= bound and max(sizes) > 0.49


def test_the_noise_is_sigma_times_the_user_clip_bound_over_the_expected_users():
    """40 rounds of empty slots only: the update is the noise alone. 40 x 18 = 720
    draws; the sample std is within 4 standard errors (1 / sqrt(2 * 720)) of the stated."""
    params = initial_params()
    clip = {"w": 0.3, "b": 0.4}  # user-level sensitivity 0.5
    mech = user_level_mechanism(num_users=200, sample_rate=0.1, l2_clip_norm=clip,
                                params=params, noise_multiplier=1.7, num_slots=4)
    assert mech.noise_std == pytest.approx(1.7 * 0.5) and mech.unit is Unit.USER
    server = optax.sgd(1.0)
    step = make_round_step(_loss, server, _local(), mech.clipped, mech.privatizer())
    state = init_state(params, server, secret=seeded_secret(4), privatizer=mech.privatizer())
    empty = (((jnp.zeros((4, 9, NUM_FEATURES)), jnp.zeros((4, 9), jnp.int32)),
              jnp.zeros((4, 9))), jnp.zeros(4))
    draws = []
    for _ in range(40):
        before = _flat(jax.tree_util.tree_map(np.asarray, state.params))
        state, _ = step.run(state, [empty])
        draws.append(before - _flat(state.params))
    z = np.concatenate(draws) * (0.1 * 200) / (1.7 * 0.5)  # noise / (sigma S / (q U))
    assert abs(z.std() - 1.0) < 4 / np.sqrt(2 * z.size)
    assert abs(z.mean()) < 4 / np.sqrt(z.size)


def test_the_accountant_records_each_round_as_poisson_sampled_users_with_rate_q():
    params = initial_params()
    mech = user_level_mechanism(num_users=600, sample_rate=0.05, l2_clip_norm=1.0,
                                params=params, noise_multiplier=1.1)
    event = mech.dp_event(1).events[0].event
    assert isinstance(event, dp_accounting.PoissonSampledDpEvent)
    assert event.sampling_probability == 0.05 and event.event.noise_multiplier == 1.1
    assert mech.physical_batch_size == 47 and mech.expected_batch_size == pytest.approx(30)
    # 200 rounds: dp-accounting's own RDP accountant on the same event, composed directly
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.1)),
                200)
    ledger = accounting.Ledger()
    for _ in range(200):
        ledger = mech.record(ledger)
    assert ledger.epsilon(1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    sampler = user_sampler(mech, iid_partition(1200, 600, seed=0), _local(),
                           secret=seeded_secret(0))
    assert sampler.sample_rate == event.sampling_probability
    assert sampler.num_slots == mech.physical_batch_size


def test_a_target_epsilon_calibrates_sigma_for_the_rounds():
    mech = user_level_mechanism(num_users=600, sample_rate=0.05, l2_clip_norm=1.0,
                                params=initial_params(), target_epsilon=3.0, delta=1e-5,
                                rounds=100)
    assert 0.99 * 3.0 <= mech.epsilon(100, 1e-5, "rdp") <= 3.0


def test_misassembled_parts_are_refused():
    params = initial_params()
    with pytest.raises(ValueError, match="one party per slot"):
        user_level_mechanism(num_users=100, sample_rate=0.1, l2_clip_norm=1.0, params=params,
                             noise_multiplier=1.0, num_slots=8,
                             aggregation=user_secagg(SecAggSettings(4), 1.0))
    with pytest.raises(ValueError, match="exactly one of noise_multiplier"):
        user_level_mechanism(num_users=100, sample_rate=0.1, l2_clip_norm=1.0, params=params)
    mech = user_level_mechanism(num_users=100, sample_rate=0.1, l2_clip_norm=1.0,
                                params=params, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="partition's 50 users"):
        user_sampler(mech, iid_partition(100, 50, seed=0), _local(), seed=0)
    example_level = user_level_mechanism(num_users=100, sample_rate=0.1, l2_clip_norm=1.0,
                                         params=params, noise_multiplier=1.0)
    object.__setattr__(example_level, "unit", Unit.EXAMPLE)
    with pytest.raises(ValueError, match="user-level mechanism"):
        make_fedavg_step(_loss, optax.sgd(1.0), _local(), example_level, *data(10))


@pytest.mark.slow  # compiles the SecAgg round's two programs (~20 s on a loaded machine)
def test_a_secagg_round_with_overflow_equals_the_plain_round_within_the_quantization_bound():
    """One party per slot; ~6 sampled users in 4 slots, so parties hold the sums of two
    chunks' users, aggregated in one round."""
    x, y = data(120)
    params, partition, local = initial_params(), iid_partition(120, 12, seed=0), _local()
    kw = dict(num_users=12, sample_rate=0.5, l2_clip_norm=5.0, params=params,
              noise_multiplier=0.0, num_slots=4)
    aggregation = user_secagg(SecAggSettings(4, mode="simulation", seed=0), 5.0)
    plain, secure = user_level_mechanism(**kw), user_level_mechanism(**kw,
                                                                      aggregation=aggregation)
    secret = seeded_secret(2)
    sampler = user_sampler(plain, partition, local, secret=secret)
    round_users = next(r for r in map(sampler.sample, range(50)) if len(r) == 2)
    server = optax.sgd(1.0)
    results = []
    for mech in (plain, secure):
        step = make_fedavg_step(_loss, server, local, mech, x, y)
        state = init_state(params, server, secret=secret, privatizer=mech.privatizer())
        results.append(_flat(step.run(state, round_users)[0].params))
    diff = np.abs(results[0] - results[1]).max()
    bound = aggregation.error_bound / (0.5 * 12) + 1e-6  # + float32 rounding of the update
    assert 0 < diff <= bound
    assert np.abs(results[0] - _flat(params)).max() > 100 * bound  # the round did move


@pytest.mark.slow  # 40 rounds of a real model on digits (~30 s on a loaded machine)
def test_dp_fedavg_learns_digits_from_label_skewed_users():
    from dpjax.data import load_digits
    from dpjax.federated.users import label_skew_partition
    from dpjax.models import MLP
    from dpjax.train import cross_entropy_loss

    ds = load_digits()
    partition = label_skew_partition(ds.y_train, 100, seed=0)
    model = MLP(num_classes=10, hidden=(32,))
    params = model.init(jax.random.PRNGKey(0), jnp.asarray(ds.x_train[:1]))["params"]
    local = LocalTraining(optax.sgd(0.1), epochs=2, batch_size=8, max_examples=20)
    mech = user_level_mechanism(num_users=100, sample_rate=0.2, l2_clip_norm=1.0,
                                params=params, noise_multiplier=0.5)
    secret = seeded_secret(0)
    sampler = user_sampler(mech, partition, local, secret=secret)
    server = optax.sgd(1.0, momentum=0.9)
    step = make_fedavg_step(cross_entropy_loss(model.apply), server, local, mech,
                            ds.x_train, ds.y_train)
    state = init_state(params, server, secret=secret, privatizer=mech.privatizer())
    ledger = accounting.Ledger()
    for t in range(40):
        state, _ = step.run(state, sampler.sample(t))
        ledger = mech.record(ledger)
    logits = model.apply({"params": state.params}, ds.x_test)
    accuracy = float(jnp.mean(jnp.argmax(logits, -1) == ds.y_test))
    assert accuracy > 0.6  # chance is 0.1; every user holds at most two classes
    assert ledger.steps == 40 and np.isfinite(ledger.epsilon(1e-3, "pld"))
