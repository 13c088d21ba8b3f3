"""Fixed party shards for example-level Poisson sampling (docs/secagg.md, known issue 3).

Example ``i`` belongs to party ``i mod n``; each party's sampled examples fill its own
block of rows in every chunk. The guarantee tested here: adding one example changes only
its own party's rows, so the rounded per-party sums of SecAgg (stochastic rounding) and of
distributed DP (randomized rounding) move by at most the accounted sensitivity. The
controls run today's contiguous packing (``_pad_chunks``), which breaks that bound.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import dpjax.distributed as distributed
from dpjax.aggregation import DistributedNoiseSum, PlainSum, SecAggSettings, SecAggSum
from dpjax.choices import Sampling, Unit
from dpjax.mechanism import ClippedSum, Mechanism
from dpjax.randomness import Stream, seeded_secret
from dpjax.sampling import (
    PoissonSampler,
    _pad_chunks,
    _shard_chunks,
    default_party_rows,
    default_physical_batch_size,
)
from dpjax.secagg import chacha20_stream, ddp
from dpjax.secagg.ddp_params import choose_parameters
from dpjax.secagg.encoding import decode, encode

N, PARTIES, Q, DIM, CLIP = 512, 64, 0.25, 64, 1.0
ROWS = 6  # 2 expected per party plus 3 sigma (the default raises it to 8, the whole shard)
PHYSICAL = PARTIES * ROWS
OLD_PHYSICAL = default_physical_batch_size(N, Q, math.lcm(8, PARTIES))  # today's default: 192
OLD_ROWS = OLD_PHYSICAL // PARTIES


def _shards(selected):
    return _shard_chunks(selected, PHYSICAL, PARTIES), ROWS


def _contiguous(selected):
    """Today's packing at today's default size: party p = rows [p r, (p + 1) r)."""
    return _pad_chunks(selected, OLD_PHYSICAL), OLD_ROWS


def _reference_uniforms(secret, step, n):
    """The sampler's uniforms from the jnp ChaCha20 (independent of the host cipher)."""
    nonce = np.array([int(Stream.SAMPLING), step, 0], np.uint32)
    words = np.asarray(chacha20_stream(secret.words, nonce, 2 * n)).astype(np.uint64)
    return (((words[0::2] << np.uint64(32)) | words[1::2]) >> np.uint64(11)) * 2.0**-53


def _party_rows(chunks, party, rows, num_chunks):
    """Party ``party``'s (indices, mask) over all chunks, padded with empty chunks (index 0,
    mask 0, as the sampler pads) to ``num_chunks``."""
    idx = np.zeros((num_chunks, rows), np.int64)
    mask = np.zeros((num_chunks, rows), np.float32)
    for c, chunk in enumerate(chunks):
        idx[c] = chunk.indices[party * rows:(party + 1) * rows]
        mask[c] = chunk.mask[party * rows:(party + 1) * rows]
    return idx, mask


def _neighbours(z: int, overflow: bool = False):
    """``(S, S + {z})`` as sorted index arrays: a fixed random set without ``z``; with
    ``overflow``, ``z``'s party holds exactly ``ROWS`` examples of ``S``, so adding ``z``
    takes a second chunk."""
    included = np.random.default_rng(7).random(N) < Q
    if overflow:
        members = np.arange(z % PARTIES, N, PARTIES)
        included[members] = False
        included[members[members != z][:ROWS]] = True
    included[z] = False
    without = np.flatnonzero(included)
    return without, np.sort(np.append(without, z))


CASES = {"first": (0, False), "last": (N - 1, False), "middle": (131, False),
         "overflow": (70, True)}


@pytest.mark.parametrize("case", list(CASES))
def test_adding_one_example_changes_only_its_own_partys_rows(case):
    z, overflow = CASES[case]
    without, with_z = _neighbours(z, overflow)
    a, b = _shard_chunks(without, PHYSICAL, PARTIES), _shard_chunks(with_z, PHYSICAL, PARTIES)
    assert {c.indices.shape for c in a + b} == {(PHYSICAL,)}
    assert (len(a), len(b)) == ((1, 2) if overflow else (1, 1))
    num_chunks = max(len(a), len(b))
    for p in range(PARTIES):
        ia, ma = _party_rows(a, p, ROWS, num_chunks)
        ib, mb = _party_rows(b, p, ROWS, num_chunks)
        if p == z % PARTIES:
            assert sorted(ib[mb > 0]) == sorted([*ia[ma > 0], z])
        else:
            np.testing.assert_array_equal(ia, ib)
            np.testing.assert_array_equal(ma, mb)
    # the same neighbours under today's contiguous packing move rows of many parties
    (old_a, rows), (old_b, _) = _contiguous(without), _contiguous(with_z)
    changed = sum(not np.array_equal(_party_rows(old_a, p, rows, 2)[0],
                                     _party_rows(old_b, p, rows, 2)[0]) for p in range(PARTIES))
    if case == "first":
        assert changed > PARTIES // 2


def _party_sums(packed, grads):
    """Each party's clipped sum accumulated over the chunks, as the step does."""
    chunks, rows = packed
    sums = np.zeros((PARTIES, grads.shape[1]), np.float32)
    for c in chunks:
        sums += (c.mask[:, None] * grads[c.indices]).reshape(PARTIES, rows, -1).sum(axis=1)
    return sums


def _unit_grads(seed=0):
    g = np.random.default_rng(seed).normal(size=(N, DIM))
    return (CLIP * g / np.linalg.norm(g, axis=1, keepdims=True)).astype(np.float32)


def _moved(total, z, overflow, pack):
    without, with_z = _neighbours(z, overflow)
    return float(np.linalg.norm(total(pack(with_z)) - total(pack(without))))


def test_distributed_noise_integer_sum_moves_at_most_the_l2_sensitivity():
    """Example level, 64 parties of 6 rows, d = 64, 10 bits (gamma C = 1.0, so the rounding
    term sqrt(D) = 8 dominates the accounted l2 = gamma C + sqrt(D) = 9). Fixed rotation and
    per-party rounding keys: with shards one added example moves the sum of the parties'
    ``party_round`` vectors by at most ``l2_sensitivity`` (measured 1.4-3.2); today's
    packing (3 rows per party) re-rounds about 40 parties and moves it by 19.3 for the
    first example (14-18.5 for other random sets)."""
    params = choose_parameters(noise_multiplier=1.0, l2_clip_norm=CLIP,
                               party_l2_bound=DistributedNoiseSum.max_chunks * ROWS * CLIP,
                               dim=DIM, num_parties=PARTIES, min_honest_survivors=PARTIES,
                               bits=10, unit="example", noise="skellam")
    grads, rotation = _unit_grads(), jax.random.key(1)
    keys = jax.random.split(jax.random.key(2), PARTIES)
    rounded = jax.jit(jax.vmap(lambda x, k: ddp.party_round(
        x, params, rotation_key=rotation, rounding_key=k)[0]))

    def total(packed):
        sums = _party_sums(packed, grads)
        return np.asarray(rounded(jnp.asarray(sums), keys), np.int64).sum(axis=0)

    bound = params.l2_sensitivity
    for z, overflow in CASES.values():
        assert _moved(total, z, overflow, _shards) <= bound
    old = _moved(total, 0, False, _contiguous)
    assert old > 1.5 * bound


def test_central_secagg_rounding_moves_the_total_at_most_c_plus_sqrt_d_over_scale():
    """The fixed-point encode of SecAgg's round (one stochastic rounding key for the [n, d]
    block, as ``secure_sum``), at the coarse scale 1 so rounding (sqrt(d)/scale = 8) is
    visible next to C = 1: with shards the decoded total moves by at most C + sqrt(d)/scale
    = 9 (measured 2.2-3.2); today's packing moves it by 17.7 for the first example."""
    scale, grads, key = 1.0, _unit_grads(1), jax.random.key(3)
    max_abs = 2 * ROWS * CLIP

    def total(packed):
        sums = jnp.asarray(_party_sums(packed, grads))
        encoded = encode(sums, scale, key=key, max_abs=max_abs, num_parties=PARTIES)
        return np.asarray(decode(jnp.sum(encoded, axis=0, dtype=jnp.uint32), scale))

    bound = CLIP + math.sqrt(DIM) / scale
    for z, overflow in CASES.values():
        assert _moved(total, z, overflow, _shards) <= bound
    assert _moved(total, 0, False, _contiguous) > 1.5 * bound


@pytest.mark.parametrize("num_parties", [2, 4, 7])
def test_the_sampled_set_is_todays_and_each_party_holds_its_own_shard(num_parties):
    """Over 20 steps the real examples of all chunks are exactly ``u_i < q`` (reference
    uniforms); party p's rows hold only examples ``i = p mod n``, in index order."""
    n_ex, q, rows = 500, 0.3, 9
    sampler = PoissonSampler(n_ex, q, num_parties * rows, seed=5, num_parties=num_parties)
    for step in range(20):
        chunks = sampler.sample(step)
        real = np.concatenate([c.indices[c.mask > 0] for c in chunks])
        expected = np.flatnonzero(_reference_uniforms(seeded_secret(5), step, n_ex) < q)
        np.testing.assert_array_equal(np.sort(real), expected)
        for p in range(num_parties):
            idx, mask = _party_rows(chunks, p, rows, len(chunks))
            mine = idx[mask > 0]
            assert np.all(mine % num_parties == p)
            np.testing.assert_array_equal(mine, np.sort(mine))
            assert np.all(idx[mask == 0] == 0)


def test_one_party_gives_todays_chunks_bit_for_bit():
    """num_parties=1 (also the default) packs exactly as the unsharded ``_pad_chunks``."""
    for step in range(5):
        for physical in (16, 64, 200):
            ours = PoissonSampler(300, 0.2, physical, seed=2, num_parties=1).sample(step)
            default = PoissonSampler(300, 0.2, physical, seed=2).sample(step)
            selected = np.flatnonzero(_reference_uniforms(seeded_secret(2), step, 300) < 0.2)
            old = _pad_chunks(selected, physical)
            assert len(ours) == len(default) == len(old)
            for a, b, c in zip(ours, default, old, strict=True):
                for x in (a, b):
                    assert x.indices.dtype == c.indices.dtype and x.mask.dtype == c.mask.dtype
                    np.testing.assert_array_equal(x.indices, c.indices)
                    np.testing.assert_array_equal(x.mask, c.mask)


def test_default_party_rows_overflows_each_party_in_about_a_thousandth_of_steps():
    """N = 60000, q N = 256, 16 parties: rows = ceil(16 + 3 sqrt(16 (1 - q))) = 28. The
    exact per-party overflow rate P(Binomial(3750, q) > 28) (scipy) is 0.1-0.4%, and the
    rate measured over 200000 steps x 16 parties (numpy binomials) is within 4 standard
    errors of it."""
    n_ex, q, n = 60_000, 256 / 60_000, 16
    rows = default_party_rows(n_ex, q, n)
    mean = q * n_ex / n
    assert rows == math.ceil(mean + 3 * math.sqrt(mean * (1 - q))) == 28
    exact = stats.binom.sf(rows, n_ex // n, q)
    assert 1e-3 <= exact <= 4e-3
    counts = np.random.default_rng(0).binomial(n_ex // n, q, size=(200_000, n))
    measured = np.mean(counts > rows)
    assert abs(measured - exact) <= 4 * math.sqrt(exact * (1 - exact) / counts.size)
    assert stats.binom.sf(2 * rows, n_ex // n, q) < 1e-12  # a third chunk: never


def test_default_party_rows_stays_within_one_and_the_shard():
    # 0.003 expected per shard of 3: 3 sigma gives 1 row, the third-chunk bound 2
    assert default_party_rows(10, 0.001, 4) == 2
    assert default_party_rows(N, Q, PARTIES) == 8  # the third-chunk bound binds, capped
    assert default_party_rows(10, 1.0, 4) == 3  # ceil(10 / 4): a full shard
    assert default_party_rows(1000, 0.5, 3) == math.ceil(167 + 3 * math.sqrt(334 * 0.25))
    with pytest.raises(ValueError, match="num_parties=0"):
        default_party_rows(100, 0.1, 0)


def test_sampler_refuses_a_physical_size_that_does_not_split_into_party_blocks():
    with pytest.raises(ValueError, match=r"physical_batch_size=10 to be a multiple of "
                                         r"num_parties=4"):
        PoissonSampler(100, 0.1, 10, seed=0, num_parties=4)
    with pytest.raises(ValueError, match="num_parties=0"):
        PoissonSampler(100, 0.1, 10, seed=0, num_parties=0)
    assert PoissonSampler(1000, 0.1, seed=0, num_parties=4).physical_batch_size == (
        4 * default_party_rows(1000, 0.1, 4))


@pytest.mark.parametrize("devices,parties", [(1, 4), (2, 4), (4, 4), (2, 6), (8, 16)])
def test_default_physical_size_is_whole_party_blocks_on_every_device(devices, parties):
    n_ex, q = 60_000, 256 / 60_000
    size = distributed.physical_batch_size(None, n_ex, q, devices, parties)
    rows = default_party_rows(n_ex, q, parties)
    assert size % math.lcm(8, devices, parties) == 0
    assert parties * rows <= size < parties * rows + math.lcm(8, devices, parties)
    per_device, rows_per_party = size // devices, size // parties
    assert per_device % rows_per_party == 0  # every device holds whole parties
    assert distributed.physical_batch_size(96, n_ex, q, 2, 4) == 96  # explicit: unchanged
    assert distributed.physical_batch_size(None, n_ex, q, devices, 1) == (
        default_physical_batch_size(n_ex, q, math.lcm(8, devices)))


def _mechanism(aggregation, unit=Unit.EXAMPLE):
    return Mechanism(sampling=Sampling.POISSON, num_examples=400, sample_rate=0.1,
                     expected_batch_size=40.0, physical_batch_size=64,
                     clipped=ClippedSum(CLIP, aggregation), noise_multiplier=1.0,
                     num_params=DIM, unit=unit)


def test_the_mechanism_shards_example_level_parties_only():
    settings = SecAggSettings(4, mode="simulation", seed=0)
    params = choose_parameters(noise_multiplier=1.0, l2_clip_norm=CLIP, party_l2_bound=32.0,
                               dim=DIM, num_parties=4, min_honest_survivors=4, bits=16,
                               unit="example", noise="skellam")
    secret = seeded_secret(0)
    cases = [(PlainSum(), Unit.EXAMPLE, 1), (SecAggSum(settings, 16, CLIP), Unit.EXAMPLE, 4),
             (DistributedNoiseSum(settings, 16, CLIP, params, 4), Unit.EXAMPLE, 4),
             (SecAggSum(settings, 16, CLIP), Unit.USER, 1)]
    for aggregation, unit, parties in cases:
        sampler = _mechanism(aggregation, unit).sampler(secret)
        assert sampler.num_parties == parties
        chunk = sampler.sample(0)[0]
        blocks = chunk.indices.reshape(parties, -1)
        masks = chunk.mask.reshape(parties, -1)
        for p in range(parties):
            assert np.all(blocks[p][masks[p] > 0] % parties == p)


def test_default_party_rows_makes_a_third_chunk_unlikely_at_any_expected_count():
    """Where 3 standard deviations would leave a small expected count ``m`` (say ``m = 1``,
    ``r = 4``) a party needs a third chunk (more than ``2 r``, which distributed noise refuses)
    with probability ~1e-6 per step; the default raises ``r`` until the exact binomial tail
    (scipy) beyond ``2 r`` is below 1e-12."""
    from scipy.stats import binom

    for n_ex, q, n in [(1000, 0.004, 4), (10000, 0.01, 100), (60000, 0.0005, 16),
                       (512, 0.25, 64), (60000, 256 / 60000, 16)]:
        rows = default_party_rows(n_ex, q, n)
        shard = math.ceil(n_ex / n)
        assert rows == shard or binom.sf(2 * rows, shard, q) <= 1e-12, (n_ex, q, n, rows)
        assert rows >= math.ceil(q * shard + 3 * math.sqrt(q * shard * (1 - q))) or rows == shard
