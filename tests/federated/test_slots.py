"""User sampling into slots: fixed shapes whatever the number sampled, no truncation, empty
slots contribute exactly zero, the rate is q, and each user's examples for a round."""

import math

import jax.numpy as jnp
import numpy as np
import optax

from dpjax.federated.local import LocalTraining, clipped_user_sum
from dpjax.federated.slots import UserSampler, default_num_slots, place_slots
from dpjax.federated.users import iid_partition, natural_partition
from dpjax.randomness import seeded_secret
from dpjax.sampling import PoissonSampler


def test_default_num_slots_is_the_mean_plus_three_standard_deviations():
    # 600 users at q = 0.05: 30 + 3 sqrt(30 * 0.95) = 46.03 -> 47
    assert default_num_slots(600, 0.05) == math.ceil(30 + 3 * math.sqrt(30 * 0.95)) == 47
    assert default_num_slots(10, 1.0) == 10  # never more slots than users


def test_the_number_of_slots_never_depends_on_how_many_users_were_sampled():
    partition = iid_partition(120, 40, seed=0)
    secret = seeded_secret(5)
    sampler = UserSampler(partition, 0.3, num_slots=8, max_examples=2, rows_per_slot=4,
                          secret=secret)
    reference = PoissonSampler(40, 0.3, 8, seed=None, secret=secret)  # DP-SGD's sampler
    counts, chunk_counts = [], []
    for t in range(60):
        chunks = sampler.sample(t)
        assert all(c.users.shape == (8,) and c.slot_mask.shape == (8,) for c in chunks)
        assert all(c.examples.shape == (8, 4) and c.example_mask.shape == (8, 4)
                   for c in chunks)
        users = np.concatenate([c.users[c.slot_mask > 0] for c in chunks])
        expected = np.concatenate([c.indices[c.mask > 0] for c in reference.sample(t)])
        assert np.array_equal(users, expected)  # the same Poisson draw, nothing truncated
        counts.append(len(users))
        chunk_counts.append(len(chunks))
        assert len(chunks) == max(1, math.ceil(len(users) / 8))
    assert len(set(counts)) > 5 and max(chunk_counts) >= 2  # overflow occurred, same shapes

    rare = UserSampler(partition, 0.01, num_slots=3, max_examples=2, secret=secret)
    empty = [t for t in range(40) if sum(c.slot_mask.sum() for c in rare.sample(t)) == 0]
    assert empty  # P(no user) = 0.99^40 = 0.67 per round
    (chunk,) = rare.sample(empty[0])
    assert chunk.slot_mask.shape == (3,) and not chunk.slot_mask.any()
    assert not chunk.example_mask.any()


def test_empty_slots_contribute_exactly_zero_before_noise(problem):
    loss_fn, params, x, y = problem
    local = LocalTraining(optax.sgd(0.5), epochs=2, batch_size=2, max_examples=4)
    fn = clipped_user_sum(loss_fn, local, 0.3)
    clean = jnp.asarray(np.broadcast_to(x[:4], (6, 4, 5)))
    ys = jnp.asarray(np.broadcast_to(y[:4], (6, 4)))
    # empty slots filled with garbage (non-finite and huge features, all rows "real")
    xs = clean.at[1].set(jnp.nan).at[3].set(1e30).at[5].set(-jnp.inf)
    xs = xs.at[2].multiply(2.0).at[4].multiply(-1.0)
    example_mask = jnp.ones((6, 4))
    slot_mask = jnp.array([1.0, 0, 1, 0, 1, 0])
    total, norms = fn(params, ((xs, ys), example_mask), slot_mask)
    # the same real slots with harmless data in the empty ones (one compiled shape)
    tame = xs.at[1].set(clean[1]).at[3].set(clean[3]).at[5].set(clean[5])
    reference, _ = fn(params, ((tame, ys), example_mask), slot_mask)
    for a, b in zip(_leaves(total), _leaves(reference), strict=True):
        assert np.array_equal(a, b)  # bit for bit: the empty slots added exact zeros
    assert any((leaf != 0).any() for leaf in _leaves(total))
    none, _ = fn(params, ((xs, ys), example_mask), jnp.zeros(6))
    assert all((leaf == 0).all() for leaf in _leaves(none))
    assert np.isfinite(norms[np.array([0, 2, 4])]).all()


def _leaves(tree):
    return [np.asarray(tree[k]) for k in sorted(tree)]


def test_the_user_sampling_rate_is_q_within_4_standard_errors():
    num_users, q, rounds = 400, 0.05, 300
    sampler = UserSampler(iid_partition(800, num_users, seed=0), q, default_num_slots(400, q),
                          max_examples=2, secret=seeded_secret(11))
    sampled = np.array([sum(int(c.slot_mask.sum()) for c in sampler.sample(t))
                        for t in range(rounds)])
    # 120,000 independent Bernoulli(q) inclusions: standard error sqrt(q (1 - q) / 120,000)
    rate = sampled.sum() / (rounds * num_users)
    assert abs(rate - q) < 4 * math.sqrt(q * (1 - q) / (rounds * num_users))


def test_a_user_over_the_cap_trains_on_a_fresh_uniform_subset_each_round():
    ids = np.array([0] * 20 + [1] * 3 + [2] * 5)
    sampler = UserSampler(natural_partition(ids), 0.5, 3, max_examples=5,
                          secret=seeded_secret(2))
    rounds = 400
    subsets = np.array([sampler.local_examples(t, 0) for t in range(rounds)])  # [400, 5]
    assert subsets.shape == (rounds, 5)
    assert all(len(set(s)) == 5 and set(s) <= set(range(20)) for s in subsets)
    # each of the 20 examples is in a round's subset with probability 5/20; 400 rounds:
    # standard error sqrt(0.25 * 0.75 / 400)
    freq = np.bincount(subsets.ravel(), minlength=20) / rounds
    assert np.abs(freq - 0.25).max() < 4 * math.sqrt(0.25 * 0.75 / rounds)
    # a user under the cap trains on all its examples, in an order that changes by round
    orders = {tuple(sampler.local_examples(t, 1)) for t in range(30)}
    assert all(sorted(o) == [20, 21, 22] for o in orders) and len(orders) > 1
    again = UserSampler(natural_partition(ids), 0.5, 3, max_examples=5, secret=seeded_secret(2))
    assert np.array_equal(again.local_examples(7, 0), subsets[7])  # a function of the secret
    other = UserSampler(natural_partition(ids), 0.5, 3, max_examples=5, secret=seeded_secret(3))
    assert not np.array_equal(other.local_examples(7, 0), subsets[7])


def test_slots_hold_their_users_examples_and_zero_padding():
    ids = np.array([0] * 3 + [1] * 1 + [2] * 6)
    x = np.arange(1, 21, dtype=np.float32).reshape(10, 2)
    y = np.arange(1, 11, dtype=np.int32)
    sampler = UserSampler(natural_partition(ids), 1.0, 3, max_examples=4, rows_per_slot=6,
                          secret=seeded_secret(0))
    (chunk,) = sampler.sample(0)
    assert list(chunk.users) == [0, 1, 2] and chunk.slot_mask.all()
    assert list(chunk.example_mask.sum(axis=1)) == [3, 1, 4]
    (((xs, ys), example_mask), slot_mask), = place_slots([chunk], x, y)
    members = {0: {0, 1, 2}, 1: {3}, 2: {4, 5, 6, 7, 8, 9}}
    for s, u in enumerate(chunk.users):
        n = int(example_mask[s].sum())
        assert set(chunk.examples[s, :n]) <= members[int(u)]
        assert np.array_equal(xs[s, :n], x[chunk.examples[s, :n]])
        assert (xs[s, n:] == 0).all() and (ys[s, n:] == 0).all()


def test_simulated_dropouts_keep_their_slots_empty_so_no_users_update_is_lost():
    """With ``simulated_dropouts`` the dropped parties are slots kept empty in every chunk,
    so whether a user's update arrives never depends on which other users were sampled
    (docs/secagg.md, Known privacy issues 2: dropping the slot a user was packed into lost
    updates that moved with the packing, 3 C for one added user). 60 rounds at q = 0.3
    with 8 slots, 3 of them dropped: every sampled user is placed, exactly once, never in a
    dropped slot; rounds overflow into further chunks of the 5 free slots."""
    from dpjax.aggregation import simulated_dropped_parties

    partition = iid_partition(120, 40, seed=0)
    secret = seeded_secret(5)
    sampler = UserSampler(partition, 0.3, num_slots=8, max_examples=2, rows_per_slot=4,
                          secret=secret, simulated_dropouts=3)
    reference = PoissonSampler(40, 0.3, 8, seed=None, secret=secret)
    overflowed = 0
    for t in range(60):
        chunks = sampler.sample(t)
        dropped = simulated_dropped_parties(8, 3, t)
        assert len(dropped) == 3
        for c in chunks:
            assert not np.any(c.slot_mask[dropped]) and not np.any(c.example_mask[dropped])
        users = np.concatenate([c.users[c.slot_mask > 0] for c in chunks])
        expected = np.concatenate([c.indices[c.mask > 0] for c in reference.sample(t)])
        assert np.array_equal(users, expected)
        assert len(chunks) == max(1, math.ceil(len(users) / 5))
        overflowed += len(chunks) > 1
    assert overflowed > 10  # mean 12 users per round over 5 free slots


def test_simulated_dropouts_must_leave_a_free_slot():
    import pytest

    partition = iid_partition(120, 40, seed=0)
    for bad in (8, -1, True):
        with pytest.raises(ValueError, match="simulated_dropouts"):
            UserSampler(partition, 0.3, num_slots=8, max_examples=2, simulated_dropouts=bad)
