"""SecAgg protocol: masks cancel, seeds stay with their pair, dropouts, thresholds."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dpjax.secagg import (
    complete_graph,
    harary_graph,
    prepare_round,
    protocol,
    random_regular_graph,
    weighted_stream_sum,
)
from dpjax.secagg.graph import check_graph
from dpjax.secagg.randomness import Purpose

D = 40  # words per input


def _encoded_inputs(n, seed=0):
    return np.random.default_rng(seed).integers(0, 2**32, (n, D), dtype=np.uint32)


_masked = jax.jit(jax.vmap(protocol.masked_input))
_aggregate = jax.jit(protocol.aggregate_masked)


def _aggregate_round(masks, x):
    masked = _masked(jnp.asarray(x), masks.party_keys, masks.party_nonces, masks.party_weights)
    alive = np.flatnonzero(np.asarray(masks.survivor_weights))
    total = _aggregate(masked[alive], masks.unmask_keys, masks.unmask_nonces, masks.unmask_weights)
    return np.asarray(total), np.asarray(masked), alive


def _sum_mod(x):
    return np.sum(x, axis=0, dtype=np.uint32)


@pytest.mark.parametrize("key_agreement", ["x25519", "trusted_dealer"])
@pytest.mark.parametrize("num_neighbours", [None, 3])
def test_pairwise_masks_cancel_exactly(key_agreement, num_neighbours):
    masks = prepare_round(
        6, threshold=2, num_neighbours=num_neighbours, key_agreement=key_agreement,
        mode="simulation", seed=3,
    )  # fmt: skip
    pair_only = jax.jit(jax.vmap(lambda k, n, w: weighted_stream_sum(k, n, w, D)))(
        masks.party_keys[:, 1:], masks.party_nonces[:, 1:], masks.party_weights[:, 1:]
    )
    assert not np.any(np.all(np.asarray(pair_only) == 0, axis=1))  # masks are not trivially zero
    np.testing.assert_array_equal(_sum_mod(np.asarray(pair_only)), np.zeros(D, np.uint32))


@pytest.mark.parametrize("num_neighbours", [None, 4])
def test_each_pair_seed_is_used_by_exactly_its_two_parties(num_neighbours):
    n = 8
    masks = prepare_round(n, threshold=3, num_neighbours=num_neighbours, mode="simulation", seed=5)
    users = {}
    for u in range(n):
        for j in range(masks.party_keys.shape[1]):
            seed = tuple(np.asarray(masks.party_keys[u, j]).tolist())
            purpose = int(masks.party_nonces[u, j, 0])
            users.setdefault((seed, purpose), []).append((u, int(masks.party_weights[u, j])))
    self_seeds = [k for k in users if k[1] == Purpose.SELF_MASK]
    pair_seeds = [k for k in users if k[1] == Purpose.PAIR_MASK]
    assert len(self_seeds) == n and all(len(users[k]) == 1 for k in self_seeds)
    k = n - 1 if num_neighbours is None else num_neighbours
    assert len(pair_seeds) == n * k // 2  # one distinct seed per edge
    for key in pair_seeds:
        (u, wu), (v, wv) = sorted(users[key])
        assert u < v and wu == 1 and wv == 2**32 - 1  # lower index adds, higher subtracts


def test_masked_input_alone_is_not_the_input():
    x = _encoded_inputs(4)
    masks = prepare_round(4, threshold=2, mode="simulation", seed=0)
    _, masked, _ = _aggregate_round(masks, x)
    # each word stays unchanged with probability 2^-32 (fixed seed): none should
    assert not np.any(masked == x)


def test_every_survivor_set_of_size_at_least_t_gives_the_exact_sum():
    n, t = 5, 3
    x = _encoded_inputs(n, seed=1)
    for size in range(t, n + 1):
        for alive in itertools.combinations(range(n), size):
            masks = prepare_round(n, threshold=t, survivors=alive, mode="simulation", seed=size)
            total, _, _ = _aggregate_round(masks, x)
            np.testing.assert_array_equal(total, _sum_mod(x[list(alive)]), err_msg=str(alive))


def test_t_minus_1_survivors_or_responders_raise():
    with pytest.raises(ValueError, match="threshold=3"):
        prepare_round(5, threshold=3, survivors=[0, 4], mode="simulation", seed=0)
    with pytest.raises(ValueError, match="threshold=3"):
        prepare_round(5, threshold=3, survivors=[0, 1, 4], responders=[1, 4],
                      mode="simulation", seed=0)  # fmt: skip


def test_secagg_plus_sum_is_exact_with_dropouts_and_fewer_responders():
    n = 10
    x = _encoded_inputs(n, seed=2)
    alive = [0, 1, 2, 3, 5, 6, 8, 9]
    masks = prepare_round(
        n, threshold=3, num_neighbours=6, survivors=alive, responders=alive[:-1],
        mode="simulation", seed=4,
    )  # fmt: skip
    total, _, _ = _aggregate_round(masks, x)
    np.testing.assert_array_equal(total, _sum_mod(x[alive]))


def test_secagg_plus_raises_when_a_neighbourhood_lacks_t_holders():
    # Party 0's holders are its 2 neighbours and itself; if both neighbours
    # drop, only 1 < t=2 shares of its self-mask seed remain.
    graph = harary_graph(6, 2)
    config = protocol.RoundConfig(graph, threshold=2, key_agreement="trusted_dealer")
    reveals = [protocol.Reveal(0, 0, "self", (1,) * 8)]
    with pytest.raises(ValueError, match="party 0's self secret"):
        protocol.aggregator_unmask_plan(config, reveals + [protocol.Reveal(3, 3, "self", ())],
                                        survivors={0, 3})  # fmt: skip


def test_holder_refuses_to_reveal_both_secrets_of_a_party():
    with pytest.raises(ValueError, match="disjoint"):
        protocol.party_unmask_response(0, [], survivors={1, 2}, dropped={2})


def test_secure_mode_is_exact_and_refuses_a_seed():
    x = _encoded_inputs(4, seed=3)
    masks = prepare_round(4, threshold=3, survivors=[0, 1, 3])
    total, _, _ = _aggregate_round(masks, x)
    np.testing.assert_array_equal(total, _sum_mod(x[[0, 1, 3]]))
    with pytest.raises(ValueError, match="seed=1"):
        prepare_round(4, threshold=3, seed=1)
    with pytest.raises(ValueError, match="seed=None"):
        prepare_round(4, threshold=3, mode="simulation")


def test_rounds_use_disjoint_seeds_and_nonces():
    a = prepare_round(4, threshold=2, mode="simulation", seed=9, round_index=0)
    b = prepare_round(4, threshold=2, mode="simulation", seed=9, round_index=1)
    seeds_a = {tuple(k) for k in np.asarray(a.party_keys).reshape(-1, 8).tolist()}
    seeds_b = {tuple(k) for k in np.asarray(b.party_keys).reshape(-1, 8).tolist()}
    assert not seeds_a & seeds_b
    assert set(np.asarray(a.party_nonces)[..., 1].ravel()) == {0}
    assert set(np.asarray(b.party_nonces)[..., 1].ravel()) == {1}
    again = prepare_round(4, threshold=2, mode="simulation", seed=9, round_index=0)
    np.testing.assert_array_equal(a.party_keys, again.party_keys)  # simulation is reproducible


def test_round_indices_past_2_to_the_32_get_their_own_nonces():
    # DP training uses round index step * 2^16 + chunk: step 65536 reaches 2^32.
    from dpjax.secagg.randomness import Purpose, nonce

    seen = {tuple(nonce(Purpose.PAIR_MASK, r)) for r in (1, 2**32, 2**32 + 1, 2**63)}
    assert len(seen) == 4
    big = prepare_round(4, threshold=2, mode="simulation", seed=9, round_index=2**32 + 1)
    assert set(map(tuple, np.asarray(big.party_nonces)[..., 1:].reshape(-1, 2).tolist())) == {
        (1, 1)}
    with pytest.raises(ValueError, match=r"round_index=-1 in \[0, 2\^64\)"):
        nonce(Purpose.SHARE, -1)


@given(n=st.integers(3, 16), k=st.integers(1, 15), seed=st.integers(0, 1000))
def test_random_regular_graph_is_symmetric_and_k_regular(n, k, seed):
    if k >= n or (k % 2 and n % 2):
        with pytest.raises(ValueError, match="num_neighbours"):
            random_regular_graph(n, k, np.random.default_rng(seed))
        return
    graph = random_regular_graph(n, k, np.random.default_rng(seed))
    assert graph.shape == (n, k)
    check_graph(graph)


def test_threshold_must_fit_the_neighbourhood():
    with pytest.raises(ValueError, match="threshold=5"):
        protocol.RoundConfig(harary_graph(8, 2), threshold=5)
    protocol.RoundConfig(complete_graph(8), threshold=8)
