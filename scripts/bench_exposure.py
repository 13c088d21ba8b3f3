"""Time to score a whole candidate space for the Secret Sharer exposure, three ways.

Model: the default ``DecoderLM`` (2 layers, width 128, 4 heads, context 128),
random init; prefix ``"the PIN of Ann Lee is "``; digits as secrets.

- ``trie + KV cache`` (what ``dpjax.audit.exposure`` does): the prefix once,
  then one new position per trie node, attending to cached keys/values;
- ``trie, full forward per level``: every node of a level as a whole
  ``prefix + digits so far`` sequence (no cache);
- ``brute force``: every candidate as a whole sequence.

Each way's scores are checked against the first (max abs difference, bits).
Times include compilation of the first call, then the median of ``--repeats``.

    python scripts/bench_exposure.py [--digits 5] [--full-digits 6] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from dpjax.audit.exposure import make_candidate_scorer
from dpjax.data.text import encode
from dpjax.models.transformer import DecoderLM

PREFIX = "the PIN of Ann Lee is "
CHUNK = 10_000


def _digits(n: int, length: int) -> np.ndarray:
    return (np.arange(n)[:, None] // 10 ** np.arange(length)[::-1]) % 10 + ord("0")


def _forward_last_logp(forward, params, seqs: np.ndarray) -> np.ndarray:
    """Log-probs of the next digit after each whole sequence, in chunks of CHUNK rows."""
    out = []
    chunk = min(CHUNK, len(seqs))
    for start in range(0, len(seqs), chunk):
        part = seqs[start:start + chunk]
        padded = np.zeros((chunk, seqs.shape[1]), np.int32)
        padded[:len(part)] = part
        logits = forward({"params": params}, jnp.asarray(padded))[:, -1]
        out.append(np.asarray(jax.nn.log_softmax(logits)[:, ord("0"):ord("9") + 1])[:len(part)])
    return np.concatenate(out).astype(np.float64)


def level_forward_scores(forward, params, length: int) -> np.ndarray:
    ids = encode(PREFIX)[:-1]
    nll = np.zeros(1)
    for depth in range(length):
        n = 10**depth
        seqs = np.concatenate([np.broadcast_to(ids, (n, len(ids))), _digits(n, depth)], axis=1)
        nll = (nll[:, None] - _forward_last_logp(forward, params, seqs.astype(np.int32)))
        nll = nll.reshape(-1)
    return nll / math.log(2)


def brute_force_scores(forward, params, length: int) -> np.ndarray:
    ids = encode(PREFIX)[:-1]
    n = 10**length
    seqs = np.concatenate([np.broadcast_to(ids, (n, len(ids))), _digits(n, length)], axis=1)
    seqs = seqs.astype(np.int32)
    p = len(ids)
    total = np.zeros(n)
    for start in range(0, n, CHUNK):
        part = seqs[start:start + CHUNK]
        logp = jax.nn.log_softmax(forward({"params": params}, jnp.asarray(part[:, :-1])))
        logp = np.asarray(logp, np.float64)
        rows = np.arange(len(part))
        total[start:start + len(part)] = -sum(logp[rows, p - 1 + j, part[:, p + j]]
                                              for j in range(length))
    return total / math.log(2)


def timed(fn, repeats: int) -> tuple[float, float, np.ndarray]:
    t0 = time.perf_counter()
    result = fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, float(np.median(times)), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digits", type=int, default=5, help="secret length for all three")
    parser.add_argument("--full-digits", type=int, default=6, help="trie + KV cache only")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = DecoderLM()
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    forward = jax.jit(model.apply)
    print(f"# bench_exposure  {datetime.date.today()}  {platform.node()}  "
          f"{platform.processor() or platform.machine()}  python {platform.python_version()}  "
          f"jax {jax.__version__}  devices {jax.devices()}")
    print(f"model: DecoderLM() ({sum(x.size for x in jax.tree_util.tree_leaves(params)):,} "
          f"params), prefix {PREFIX!r} ({len(encode(PREFIX)) - 1} tokens with BOS)\n")
    print("| method | space | first call (s) | median (s) | max abs diff vs trie (bits) |")
    print("|---|---|---|---|---|")
    for length in (args.digits, args.full_digits):
        scorer = make_candidate_scorer(model, alphabet="0123456789", secret_length=length)
        first, median, ref = timed(lambda s=scorer: s(params, PREFIX), args.repeats)
        print(f"| trie + KV cache | 10^{length} | {first:.1f} | {median:.1f} | 0 |", flush=True)
        if length != args.digits:
            continue
        for name, fn in (("trie, full forward per level", level_forward_scores),
                         ("brute force", brute_force_scores)):
            first, median, got = timed(lambda f=fn, n=length: f(forward, params, n),
                                       args.repeats)
            diff = float(np.abs(got - ref).max())
            print(f"| {name} | 10^{length} | {first:.1f} | {median:.1f} | {diff:.1e} |",
                  flush=True)


if __name__ == "__main__":
    main()
