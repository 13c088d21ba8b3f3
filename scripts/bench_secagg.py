"""Benchmark of dpjax.secagg: PRG throughput, one SecAgg round, distributed DP, a Paillier baseline.

Prints one table per measurement. Times are the best of a few runs after a
warm-up (compilation excluded) on whatever CPU this runs on. The full size
(n = 100 parties, d = 2^20 words) takes a few minutes on 2 cores; ``--quick``
shrinks everything for a smoke run.

    PYTHONPATH=. python scripts/bench_secagg.py [--quick]
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from dpjax.secagg import chacha20_stream, ddp, ddp_params, encode, modular, prepare_round, protocol

_mask = jax.jit(protocol.masked_input)
_aggregate = jax.jit(protocol.aggregate_masked)


def best_time(fn, *args, repeats: int = 3) -> float:
    """Best wall time of ``fn(*args)`` over ``repeats`` runs, after one warm-up run."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def bench_prg(num_words: int) -> float:
    """Prints ChaCha20 vs Threefry throughput; returns seconds per ChaCha20 word."""
    key, nonce = jnp.arange(8, dtype=jnp.uint32), jnp.arange(3, dtype=jnp.uint32)
    chacha = jax.jit(lambda k, n: chacha20_stream(k, n, num_words))
    threefry = jax.jit(lambda k: jax.random.bits(k, (num_words,), jnp.uint32))
    t_chacha = best_time(chacha, key, nonce, repeats=5)
    t_threefry = best_time(threefry, jax.random.key(0), repeats=5)
    gb = num_words * 4 / 1e9
    print(f"\n## PRG throughput ({num_words * 4 / 2**20:.2f} MiB of uint32 words)")
    print("| generator | seconds | GB/s |")
    print("|---|---|---|")
    print(f"| ChaCha20 (dpjax.secagg, jnp) | {t_chacha:.3f} | {gb / t_chacha:.2f} |")
    print(f"| jax.random.bits (Threefry) | {t_threefry:.3f} | {gb / t_threefry:.2f} |")
    print(f"ChaCha20 / Threefry throughput: {t_threefry / t_chacha:.0%} (target >= 70%)")
    return t_chacha / num_words


def party_time(masks, encoded: jax.Array, parties: list[int]) -> float:
    """Mean seconds for one party to mask its encoded input (best of 2 runs each)."""
    times = [
        best_time(_mask, encoded, masks.party_keys[u], masks.party_nonces[u],
                  masks.party_weights[u], repeats=2)
        for u in parties
    ]  # fmt: skip
    return float(np.mean(times))


def bench_round(n: int, d: int, k: int | None, dropout: float, measured: int, prg_word: float):
    """One aggregation round; returns a table row."""
    alive = list(range(n - int(round(dropout * n))))
    start = time.perf_counter()
    masks = prepare_round(
        n, threshold=n // 2 + 1 if k is None else k // 2 + 1, num_neighbours=k,
        survivors=alive, mode="simulation", seed=0,
    )  # fmt: skip
    t_setup = time.perf_counter() - start
    x = jax.random.uniform(jax.random.key(1), (d,), minval=-1.0, maxval=1.0)
    t_encode = best_time(
        jax.jit(lambda v, r: encode(v, 2.0**16, key=r, max_abs=1.0, num_parties=n)),
        x, jax.random.key(2),
    )  # fmt: skip
    encoded = encode(x, 2.0**16, max_abs=1.0, num_parties=n)
    parties = list(range(min(measured, n)))
    t_party = party_time(masks, encoded, parties) + t_encode
    masked = jnp.broadcast_to(encoded, (len(alive), d))  # sum cost does not depend on values
    t_agg = best_time(
        _aggregate, masked, masks.unmask_keys, masks.unmask_nonces, masks.unmask_weights,
        repeats=2,
    )  # fmt: skip
    streams_party = masks.party_keys.shape[1]
    streams_agg = masks.unmask_keys.shape[0]
    prg_party = streams_party * d * prg_word
    total = n * t_party + t_agg
    prg_total = (n * streams_party + streams_agg) * d * prg_word
    graph = "complete" if k is None else f"k={k}"
    note = "" if len(parties) == n else f" (mean of {len(parties)} parties x {n})"
    return (
        f"| {n} | {graph} | {dropout:.0%} | {t_setup:.2f} | {t_party:.3f} | {prg_party:.3f} | "
        f"{t_agg:.2f} ({streams_agg} streams) | {total:.1f}{note} | {total / prg_total:.2f} |"
    )


def bench_plain_sum(n: int, d: int) -> float:
    x = jax.random.uniform(jax.random.key(3), (n, d))
    return best_time(jax.jit(lambda v: jnp.sum(v, axis=0)), x)


def bench_ddp_party(n: int, d: int, k: int, bits: int) -> None:
    """Per-party time of a distributed-DP round (rotate, round, noise, mask) vs a plain one.

    All parties mask against the same k-regular SecAgg+ graph; the plain parties
    encode with stochastic rounding: in ``Z_2^32`` (``secure_sum``, the default
    ``dp.secagg_bits=32``) and in ``Z_2^bits`` (central noise at the distributed round's
    modulus, whose masks are cut in 16-bit lanes like the distributed round's). The
    ratios are measured within this run, the three interleaved (best of 3 each).
    """
    masks = prepare_round(n, threshold=k // 2 + 1, num_neighbours=k, mode="simulation", seed=0)
    keys, nonces, weights = masks.party_keys[0], masks.party_nonces[0], masks.party_weights[0]
    x = jax.random.normal(jax.random.key(4), (d,))
    x = x / jnp.linalg.norm(x)

    @jax.jit
    def plain(x, key):
        encoded = encode(x, 2.0**16, key=key, max_abs=1.0, num_parties=n)
        return protocol.masked_input(encoded, keys, nonces, weights)

    @jax.jit
    def plain_bits(x, key):  # central noise at 16 bits: the scale leaves room for n parties
        encoded = encode(x, 2.0 ** (bits - 9), key=key, max_abs=1.0, num_parties=n)
        return modular.masked_input_mod(modular.to_modular(encoded, bits), keys, nonces,
                                        weights, bits=bits)

    print(
        f"\n## Distributed DP: one party, d = 2^{d.bit_length() - 1}, {bits} bits, "
        f"n = {n}, k = {k} (per-party time; compilation excluded)"
    )
    print(
        "| noise | unit | gamma | noise inflation | party s (rotate+round+noise+mask) | "
        f"plain party s, Z_2^32 | ratio | plain party s, Z_2^{bits} | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for noise, unit in (("skellam", "user"), ("ddgauss", "user"), ("skellam", "example")):
        params = ddp_params.choose_parameters(
            noise_multiplier=1.0, l2_clip_norm=1.0, party_l2_bound=1.0, dim=d, num_parties=n,
            min_honest_survivors=max(1, (4 * n) // 5), bits=bits, unit=unit, noise=noise,
        )  # fmt: skip

        @jax.jit
        def party(x, key, params=params):
            encoded, report = ddp.party_encode(
                x, params, rotation_key=jax.random.fold_in(key, 0),
                rounding_key=jax.random.fold_in(key, 1), noise_key=jax.random.fold_in(key, 2),
            )  # fmt: skip
            return modular.masked_input_mod(encoded, keys, nonces, weights, bits=bits), report

        t_ddp = t_plain = t_bits = float("inf")
        for i in range(3):  # interleaved: the machine's load affects all alike
            t_ddp = min(t_ddp, best_time(party, x, jax.random.key(i), repeats=1))
            t_plain = min(t_plain, best_time(plain, x, jax.random.key(i), repeats=1))
            t_bits = min(t_bits, best_time(plain_bits, x, jax.random.key(i), repeats=1))
        print(
            f"| {noise} | {unit} | {params.gamma:.4g} | {params.noise_inflation:.3f} | "
            f"{t_ddp:.3f} | {t_plain:.3f} | {t_ddp / t_plain:.2f} | {t_bits:.3f} | "
            f"{t_ddp / t_bits:.2f} |",
            flush=True,
        )
    print("target: ratio <= 1.5 (the plain SecAgg round, Z_2^32)")


def bench_paillier(n: int, d: int, num_values: int) -> None:
    print("\n## Paillier baseline (phe, 2048-bit keys)")
    try:
        from phe import paillier
    except ImportError:
        print("skipped: the `phe` package is not installed (pip install phe)")
        return
    public, private = paillier.generate_paillier_keypair(n_length=2048)
    values = np.random.default_rng(0).uniform(-1, 1, num_values)
    start = time.perf_counter()
    encrypted = [public.encrypt(float(v)) for v in values]
    t_enc = (time.perf_counter() - start) / num_values
    start = time.perf_counter()
    total = encrypted[0]
    for c in encrypted[1:]:
        total = total + c
    t_add = (time.perf_counter() - start) / max(num_values - 1, 1)
    start = time.perf_counter()
    for c in encrypted[: max(num_values // 4, 1)]:
        private.decrypt(c)
    t_dec = (time.perf_counter() - start) / max(num_values // 4, 1)
    log2_d = d.bit_length() - 1
    print(f"| step | ms per value | extrapolated to one round, d = 2^{log2_d}, n = {n} |")
    print("|---|---|---|")
    print(f"| encrypt (per party) | {t_enc * 1e3:.2f} | {t_enc * d:.0f} s per party |")
    print(f"| add (aggregator) | {t_add * 1e3:.3f} | {t_add * d * (n - 1):.0f} s |")
    print(f"| decrypt (key holder) | {t_dec * 1e3:.2f} | {t_dec * d:.0f} s |")
    print(f"(measured on {num_values} values; extrapolation is linear in d and n)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    parser.add_argument("--num-parties", type=int, default=100)
    parser.add_argument("--log2-dim", type=int, default=20)
    parser.add_argument("--neighbours", type=int, default=8)
    parser.add_argument("--ddp-only", action="store_true", help="only the distributed-DP table")
    parser.add_argument("--measured-parties", type=int, default=3,
                        help="complete graph: parties timed (rest extrapolated)")  # fmt: skip
    args = parser.parse_args()
    if args.quick:
        args.num_parties, args.log2_dim, args.measured_parties = 20, 14, 2
    n, d = args.num_parties, 2**args.log2_dim
    print(f"# dpjax.secagg benchmark  ({platform.processor() or platform.machine()}, "
          f"{jax.device_count()} {jax.default_backend()} device, jax {jax.__version__}, "
          f"numpy {np.__version__}, python {platform.python_version()})")  # fmt: skip
    if args.ddp_only:
        bench_ddp_party(n, d, args.neighbours, 16)
        return
    prg_word = bench_prg(2**20 if args.quick else max(d, 2**22))

    print(f"\n## One aggregation round, n = {n} parties, d = 2^{args.log2_dim} words")
    print("party = encode (stochastic rounding) + mask; PRG-bound = time to generate the same "
          "number of ChaCha20 streams at the measured throughput.")  # fmt: skip
    print(
        "| n | graph | dropouts | setup s (host: keys, Shamir, recovery) | party s | "
        "party PRG-bound s | aggregator s | round total s (sequential) | round / PRG-bound |"
    )
    print("|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    complete = {}  # (n, dropout) -> row: the growth table reuses the n-party round
    for dropout in (0.0, 0.1):
        print(bench_round(n, d, args.neighbours, dropout, n, prg_word), flush=True)
    for dropout in (0.0, 0.1):
        complete[n, dropout] = bench_round(n, d, None, dropout, args.measured_parties, prg_word)
        print(complete[n, dropout], flush=True)
    print(f"plain float sum jnp.sum(x[{n}, 2^{args.log2_dim}], axis=0): "
          f"{bench_plain_sum(n, d):.4f} s")  # fmt: skip

    print("\n## Complete graph: growth with n (no dropouts)")
    print("| n | party s | aggregator s | round total s (sequential) |")
    print("|---|---|---|---|")
    for m in (n // 4, n // 2, n):
        if (m, 0.0) not in complete:
            complete[m, 0.0] = bench_round(m, d, None, 0.0, args.measured_parties, prg_word)
        row = complete[m, 0.0].split("|")
        print(f"| {m} | {row[5].strip()} | {row[7].strip()} | {row[8].strip()} |", flush=True)

    bench_ddp_party(n, d, args.neighbours, 16)
    bench_paillier(n, d, 8 if args.quick else 40)


if __name__ == "__main__":
    main()
