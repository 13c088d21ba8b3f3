"""User-level distributed DP in rounds with more sampled users than slots (docs/secagg.md,
"Known privacy issues", 1; fixed 2026-11-30).

Slot ``s`` of every chunk is party ``s``. The parties used to round the *sum* of their
users' updates; conditional rounding is not linear, so adding one user (which re-pairs the
overflow users: they are packed in id order) moved the integer sum by about 4 B. Now every
user is rounded on its own with the key of its position (chunk, slot), and the positions'
keys are independent of the data: the round's rounded users are independent draws, one per
user, so adding one user adds one independent vector of norm <= B (a coupling; Renyi
divergence is jointly quasi-convex).

The construction (as found by the review): ``n`` slots, ``n + 4`` sampled users; user
``10 + p`` holds ``C/2 e0 + 0.8 C e_{2+p}``, user ``100 + p`` holds
``C/2 e0 - 0.8 C e_{3+p}``: paired in one party their sum has norm 1.51 C > B (noise
only); adding user 50 (a zero update) re-pairs them into sums ``C e0`` (accepted).

The rounds are in Z_2^14, where the party noise (std 317) comes from the alias table and
compiles in a fraction of the rejection sampler's time (20 bits: std 18,730).
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import dpjax.cli  # noqa: F401  (registers the schema)
import dpjax.secagg.ddp as ddp
from dpjax.randomness import seeded_secret
from dpjax.sampling import _pad_chunks

ROOT = Path(__file__).resolve().parents[2]


def _cfg(*overrides):
    base = ["dataset=digits", "model=mlp", "model.options.hidden=[16]", "dp.unit=user",
            "federated.num_users=100", "federated.users_per_round=10", "train.steps=3",
            "dp.randomness=seeded"]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return OmegaConf.to_object(compose("config", overrides=[*base, *overrides]))


@pytest.fixture(scope="module")
def aggregation():
    from dpjax.assembly import assemble_parts

    parts = assemble_parts(_cfg("dp.noise_multiplier=1.0", "dp.aggregation=secagg",
                                "dp.secagg_mode=simulation", "dp.noise=skellam",
                                "dp.secagg_bits=14"))
    agg = parts.mechanism.clipped.aggregation
    assert agg.stacks_chunks and agg.params.unit is ddp.Unit.USER
    return agg, parts.task.params


def _updates(n: int, dim: int, clip: float) -> dict[int, np.ndarray]:
    axis = np.eye(dim)
    first = {10 + p: clip * axis[0] / 2 + 0.8 * clip * axis[2 + p] for p in range(n)}
    second = {100 + p: clip * axis[0] / 2 - 0.8 * clip * axis[3 + p] for p in range(4)}
    return first | second | {50: np.zeros(dim)}


def _stacked(users, updates, n, dim, params):
    """The round's partial as the step hands it over: ``[chunks, n, ...]``, users packed in id
    order into ``n`` slots per chunk (the UserSampler's packing)."""
    chunks = _pad_chunks(np.array(sorted(users)), n)
    flat = np.zeros((len(chunks), n, dim), np.float32)
    for k, c in enumerate(chunks):
        for s in np.flatnonzero(c.mask):
            flat[k, s] = updates[int(c.indices[s])]
    leaves, treedef = jax.tree_util.tree_flatten(params)
    sizes = np.cumsum([leaf.size for leaf in leaves])[:-1]
    pieces = np.split(flat, sizes, axis=2)
    return jax.tree_util.tree_unflatten(treedef, [
        jnp.asarray(p.reshape((len(chunks), n) + leaf.shape)) for p, leaf in
        zip(pieces, leaves, strict=True)]), len(chunks)


def _decoded(agg, params, users, updates, step=7):
    n, dim = agg.num_parties, agg.params.dim
    partial, k = _stacked(users, updates, n, dim, params)
    finish = jax.jit(agg.finish, static_argnums=2)  # one compilation for both worlds
    out = finish(partial, agg.prepare(step), k, seeded_secret(11), jnp.int32(step))
    return np.concatenate([np.ravel(np.asarray(a)) for a in jax.tree_util.tree_leaves(out)])


def test_adding_one_user_to_an_overflow_round_moves_the_sum_along_the_paired_axis_by_at_most_c(
        aggregation):
    """The round's decoded sum along ``e0`` (where every pair's accepted or rejected mass
    lies) moves by at most ``C`` plus rounding noise when user 50 (zero update) is added.
    Same secret and step in both worlds: the noise is identical, so the difference is the
    rounded signal's. Rounding-sum-of-pairs moved it by ~4 C (4 pairs switch from noise
    only to accepted)."""
    agg, params = aggregation
    n, dim, clip = agg.num_parties, agg.params.dim, agg.row_bound
    assert n + 4 <= 2 * n and 3 + n + 4 < dim  # one overflow chunk; distinct axes
    updates = _updates(n, dim, clip)
    base = [10 + p for p in range(n)] + [100 + p for p in range(4)]
    assert all(np.linalg.norm(updates[u]) <= clip * (1 + 1e-6) for u in base + [50])
    without = _decoded(agg, params, base, updates)
    moved = _decoded(agg, params, base + [50], updates) - without
    # rounding noise along e0: each re-keyed user's rounding error, after unrotation, is a
    # sum of D terms bounded by 1/gamma; 4 standard deviations of up to 2(n + 5) of them
    noise = 4 * np.sqrt(2 * (n + 5) * agg.params.padded_dim / 12 / agg.params.padded_dim)
    slack = noise / agg.params.gamma
    assert abs(moved[0]) <= clip + slack, (moved[0], clip)
    # and every user's mass arrives in both worlds: the e0 total is (n + 4) C / 2
    total = without[0]
    noise_std = agg.params.noise_multiplier * agg.params.l2_sensitivity / agg.params.gamma
    assert abs(total - (n + 4) * clip / 2) < 5 * noise_std + slack, (total, noise_std)


def test_each_unit_is_rounded_alone_with_its_own_position_key(aggregation):
    """``party_round_units`` is the sum of the units' own roundings (keys per unit), and a
    zero unit adds exactly zero; the pair that is too long together passes unit by unit."""
    agg, _ = aggregation
    p, dim, clip = agg.params, agg.params.dim, agg.row_bound
    u = _updates(agg.num_parties, dim, clip)
    xs = jnp.asarray(np.stack([u[10], u[100], u[50]]), jnp.float32)
    keys = jax.random.split(jax.random.key(5), 3)
    rot = jax.random.key(6)
    units = jax.jit(lambda x, k: ddp.party_round_units(x, p, rotation_key=rot, rounding_keys=k))
    one = jax.jit(lambda x, k: ddp.party_round(x, p, rotation_key=rot, rounding_key=k))
    together, failed = units(xs, keys)
    alone = [one(xs[i], keys[i]) for i in range(3)]
    assert not bool(failed) and not any(bool(f) for _, f in alone)
    np.testing.assert_array_equal(np.asarray(together),
                                  np.sum([np.asarray(v) for v, _ in alone], axis=0))
    np.testing.assert_array_equal(np.asarray(alone[2][0]), 0)
    pair, pair_failed = one(xs[0] + xs[1], keys[0])
    assert bool(pair_failed) and not np.any(np.asarray(pair))  # the old behaviour: noise only


def test_a_round_of_two_chunks_keeps_chunk_zero_keys_and_an_empty_chunk_adds_nothing(tmp_path):
    """Through the round step (``DPStep.run``: the chunks' partials are stacked, not summed):
    a round whose second chunk is empty releases bit-for-bit what the one-chunk round does
    (chunk 0's positions keep the one-chunk keys; an empty unit rounds to exactly 0), and
    the stats count both chunks' users."""
    import optax

    from dpjax.assembly import assemble_parts
    from dpjax.federated.rounds import make_round_step
    from dpjax.train import init_state

    parts = assemble_parts(_cfg("dp.noise_multiplier=1.0", "dp.aggregation=secagg",
                                "dp.secagg_mode=simulation", "dp.noise=skellam",
                                "dp.secagg_bits=14"))
    mech, local = parts.mechanism, parts.federated[1]
    slots, rows = mech.physical_batch_size, local.rows_per_slot
    sgd = optax.sgd(1.0)
    step = make_round_step(parts.task.loss_fn, sgd, local, mech.clipped, mech.privatizer())
    x, y = parts.task.x_train, parts.task.y_train
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(x), (slots, rows))
    full = (((jnp.asarray(x[idx]), jnp.asarray(y[idx])), jnp.ones((slots, rows))),
            jnp.ones(slots))
    empty = jax.tree_util.tree_map(jnp.zeros_like, full)

    def run(chunks):
        state = init_state(parts.task.params, sgd, secret=seeded_secret(3),
                           privatizer=mech.privatizer())
        state, stats = step.run(state, chunks)
        return np.concatenate([np.ravel(np.asarray(a))
                               for a in jax.tree_util.tree_leaves(state.params)]), stats

    one, stats_one = run([full])
    two, stats_two = run([full, empty])
    np.testing.assert_array_equal(one, two)
    assert int(stats_two.batch_size) == int(stats_one.batch_size) == slots
    three, _ = run([full, full])
    assert not np.array_equal(one, three)


def test_central_secagg_rounds_each_user_of_an_overflow_round_on_its_own():
    """User-level SecAgg with central noise (``user_secagg``): two users in one slot (chunk 0
    and chunk 1), each coordinate ``1 / (2 scale)``. Rounded together (the old sum) every
    coordinate is exactly 1 unit; rounded on their own, each is 0 or 1 with probability
    1/2, so the sum is 0, 1, 2 with probability 1/4, 1/2, 1/4. Over 4096 coordinates the
    frequencies are within 4 standard errors (<= 0.032) of those."""
    from dpjax.aggregation import SecAggSettings
    from dpjax.federated.rounds import user_secagg

    agg = user_secagg(SecAggSettings(4, None, None, "simulation", seed=1), 1.0)
    assert agg.stacks_chunks
    d = 4096
    half = np.float32(0.5 / agg.scale)
    stacked = np.zeros((2, 4, d), np.float32)
    stacked[:, 2] = half  # slot 2 holds a user in both chunks
    total = agg.finish({"w": jnp.asarray(stacked)}, agg.prepare(0), 2, jax.random.key(4),
                       jnp.int32(0))
    units = np.rint(np.asarray(total["w"], np.float64) * agg.scale)
    freq = [np.mean(units == v) for v in (0, 1, 2)]
    assert np.all(np.isin(units, (0, 1, 2)))
    np.testing.assert_allclose(freq, [0.25, 0.5, 0.25], atol=4 * 0.5 / np.sqrt(d))


def test_a_units_aggregation_refuses_a_partial_that_is_not_stacked_by_chunk():
    """``DPStep.accumulate`` (documented: 'adds one more chunk') followed by ``aggregate(...,
    num_chunks=2)`` hands ``SecAggSum.finish`` a summed ``[n, ...]`` partial. With
    ``round_units_alone`` it reads the leading axes as ``[chunks, parties]``: for a ``(2, 4)``
    parameter it returns a ``(4,)`` total (which optax would broadcast into the update)
    instead of refusing (found by review, 2026-11-30)."""
    from dpjax.aggregation import SecAggSettings
    from dpjax.federated.rounds import user_secagg

    agg = user_secagg(SecAggSettings(4, None, None, "simulation", seed=1), 1.0)
    summed = {"w": jnp.full((4, 2, 4), 0.01)}  # 4 parties, a (2, 4) parameter, 2 chunks
    with pytest.raises(ValueError, match="stacked"):
        agg.finish(summed, agg.prepare(0), 2, jax.random.key(0), jnp.int32(0))
