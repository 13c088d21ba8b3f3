"""Median time of a non-private and a DP-SGD (vmap clipping) step, and their ratio.

Models: the MLP 784-512-512-10 and the DP CNN of the literature, batch 256 on
28x28x1 inputs, SGD. Both steps are measured in this one run on this machine,
alternating step by step. The DP step draws its noise as ``dpjax-train`` does:
ChaCha20 keyed with a 256-bit run secret (``dp.randomness=secure``).

A second table times the noise draw alone for each model's parameter count:
``jax.random.normal`` from a JAX key (Threefry; what the step drew before the
run secret, and what the library still draws from a caller's JAX key) against
the ChaCha20 stream of the run secret, alternating.

    python scripts/bench_step.py [--batch-size 256] [--repeats 30] [--models mlp dp_cnn]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpjax import randomness
from dpjax.models import get_model
from dpjax.train import cross_entropy_loss, init_state, make_dp_step, make_nonprivate_step


def median_step_times(steps, states, batch, mask, repeats: int) -> list[float]:
    """Median time of each step, timed alternately round by round (drift hits all alike)."""
    for i, step in enumerate(steps):  # compile
        states[i], _ = step.step(states[i], batch, mask)
        jax.block_until_ready(states[i])
    times = [[] for _ in steps]
    for _ in range(repeats):
        for i, step in enumerate(steps):
            t0 = time.perf_counter()
            states[i], _ = step.step(states[i], batch, mask)
            jax.block_until_ready(states[i])
            times[i].append(time.perf_counter() - t0)
    return [float(np.median(t)) for t in times]


def bench(model_name: str, batch_size: int, repeats: int, method: str) -> dict:
    model = get_model(model_name, 10)
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(batch_size, 28, 28, 1), jnp.float32)
    y = jnp.asarray(rng.randint(0, 10, batch_size), jnp.int32)
    params = model.init(jax.random.PRNGKey(0), x[:1])["params"]
    loss_fn = cross_entropy_loss(model.apply)
    opt = optax.sgd(0.05)
    mask = jnp.ones(batch_size)
    nonprivate = make_nonprivate_step(loss_fn, opt)
    dp = make_dp_step(loss_fn, opt, noise_multiplier=1.0, l2_clip_norm=1.0,
                      expected_batch_size=float(batch_size), clipping_method=method)
    # each step donates its state: give each its own copy of the params
    states = [init_state(jax.tree_util.tree_map(jnp.copy, params), opt,
                         secret=randomness.fresh_secret()) for _ in range(2)]
    t_np, t_dp = median_step_times([nonprivate, dp], states, (x, y), mask, repeats)
    n_params = sum(a.size for a in jax.tree_util.tree_leaves(params))
    t_threefry, t_chacha = noise_draw_times(params, repeats)
    return {"model": model_name, "params": n_params, "nonprivate_ms": 1e3 * t_np,
            "dp_ms": 1e3 * t_dp, "ratio": t_dp / t_np, "threefry_ms": 1e3 * t_threefry,
            "chacha_ms": 1e3 * t_chacha}


def noise_draw_times(params, repeats: int) -> tuple[float, float]:
    """Median time of one step's N(0, 1) draw for every parameter: Threefry vs ChaCha20."""

    @jax.jit
    def threefry(key, step):
        leaves, treedef = jax.tree_util.tree_flatten(params)
        keys = jax.random.split(jax.random.fold_in(key, step), len(leaves))
        return treedef.unflatten([jax.random.normal(k, leaf.shape)
                                  for k, leaf in zip(keys, leaves, strict=True)])

    @jax.jit
    def chacha(secret, step):
        return randomness.normal_like(
            params, randomness.stream_key(secret, randomness.Stream.NOISE, step))

    fns = [(threefry, jax.random.PRNGKey(0)), (chacha, randomness.fresh_secret())]
    for fn, key in fns:
        jax.block_until_ready(fn(key, 0))
    times = [[], []]
    for step in range(repeats):
        for i, (fn, key) in enumerate(fns):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(key, step))
            times[i].append(time.perf_counter() - t0)
    return float(np.median(times[0])), float(np.median(times[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--models", nargs="+", default=["mlp", "dp_cnn"])
    parser.add_argument("--method", default="vmap", choices=["vmap", "fast", "auto"])
    args = parser.parse_args()
    print(f"# bench_step: {datetime.date.today()}, {platform.processor() or platform.machine()}, "
          f"{jax.device_count()}x {jax.devices()[0].device_kind}, jax {jax.__version__}, "
          f"batch {args.batch_size}, clipping {args.method}, median of {args.repeats}")
    print("| model | params | non-private (ms) | DP (ms) | DP / non-private |")
    print("|---|---:|---:|---:|---:|")
    results = [bench(name, args.batch_size, args.repeats, args.method) for name in args.models]
    for r in results:
        print(f"| {r['model']} | {r['params']:,} | {r['nonprivate_ms']:.1f} | {r['dp_ms']:.1f} "
              f"| {r['ratio']:.2f} |")
    print("\nNoise draw of one step (all parameters), median, alternating:\n")
    print("| model | params | Threefry, JAX key (ms) | ChaCha20, run secret (ms) | ratio |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['model']} | {r['params']:,} | {r['threefry_ms']:.2f} | {r['chacha_ms']:.2f} "
              f"| {r['chacha_ms'] / r['threefry_ms']:.2f} |")


if __name__ == "__main__":
    main()
