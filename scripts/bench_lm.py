"""Step time and memory of the language model: DP vs non-private, full fine-tuning and LoRA.

The task is the one ``dpjax-train`` builds (``dpjax.lm_task``): the default
``DecoderLM`` (2 layers, width 128, 4 heads, context 128, 479,747 parameters) on
rows of the synthetic private corpus (one record per row, 129 tokens), batch 32,
Adam. ``full`` trains every leaf; ``lora`` only rank-8 adapters on the attention
and MLP kernels (36,864 parameters; the frozen base is closed over by the loss).
Each configuration's non-private step and its DP steps (vmap and fast clipping;
noise from the ChaCha20 run secret, as in a run) are timed in this one run,
interleaved step by step, median of ``--repeats``. Memory is XLA's compiled
estimate of the whole step (arguments + outputs + temporaries - aliased); GFLOP is
XLA's cost analysis of the compiled step (load-independent: it shows, e.g., that the
non-private LoRA step computes no gradient of the frozen base).

    python scripts/bench_lm.py [--batch-size 32] [--repeats 15] [--rank 8]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from dpjax import randomness
from dpjax.config import DatasetConfig, ModelConfig, RunConfig
from dpjax.lm_task import build_lm_fields
from dpjax.memory import compiled_peak_bytes
from dpjax.train import init_state, make_dp_step, make_nonprivate_step


def task_of(trainable: str, rank: int, num_records: int) -> dict:
    options = {"lora_rank": rank if trainable == "lora" else 0, "trainable": trainable}
    cfg = RunConfig(dataset=DatasetConfig("private_text", options={"num_records": num_records}),
                    model=ModelConfig("transformer", options=options))
    return build_lm_fields(cfg)


def steps_of(task: dict, batch_size: int) -> dict:
    opt = optax.adam(1e-3)
    steps = {"non-private": make_nonprivate_step(task["loss_fn"], opt)}
    for method in ("vmap", "fast"):
        steps[f"DP {method}"] = make_dp_step(
            task["loss_fn"], opt, noise_multiplier=1.0, l2_clip_norm=1.0,
            expected_batch_size=float(batch_size), clipping_method=method)
    return steps, opt


def compiled_gflop(fn, *args) -> float:
    """XLA's flop count of ``fn`` compiled for ``args``, in 10^9 (NaN if XLA gives none)."""
    cost = fn.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float((cost or {}).get("flops", float("nan"))) / 1e9


def bench(trainable: str, rank: int, batch_size: int, repeats: int) -> list[dict]:
    task = task_of(trainable, rank, max(4 * batch_size, 200))
    batch = (jnp.asarray(task["x_train"][:batch_size]), jnp.asarray(task["y_train"][:batch_size]))
    mask = jnp.ones(batch_size)
    steps, opt = steps_of(task, batch_size)

    def fresh():
        return init_state(jax.tree_util.tree_map(jnp.copy, task["params"]), opt,
                          secret=randomness.fresh_secret())

    memory = {name: compiled_peak_bytes(s.step, fresh(), batch, mask) for name, s in steps.items()}
    gflop = {name: compiled_gflop(s.step, fresh(), batch, mask) for name, s in steps.items()}
    states = {name: fresh() for name in steps}
    for name, s in steps.items():  # compile and warm up
        for _ in range(2):
            states[name], _ = s.step(states[name], batch, mask)
        jax.block_until_ready(states[name])
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, s in steps.items():
            t0 = time.perf_counter()
            states[name], stats = s.step(states[name], batch, mask)
            jax.block_until_ready((states[name], stats))
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["non-private"])
    n = sum(a.size for a in jax.tree_util.tree_leaves(task["params"]))
    return [{"trainable": trainable, "params": n, "step": name,
             "ms": 1e3 * statistics.median(times[name]),
             "ratio": statistics.median(times[name]) / base, "mib": memory[name] / 2**20,
             "gflop": gflop[name]}
            for name in steps]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# bench_lm: {datetime.date.today()}, {platform.processor() or platform.machine()} "
          f"x{os.cpu_count()} (load average {load:.1f} at start), "
          f"{jax.devices()[0].device_kind}, jax {jax.__version__}, Python "
          f"{platform.python_version()}, batch {args.batch_size}, sequence 128, Adam, "
          f"median of {args.repeats} interleaved steps")
    print("| trainable | trainable params | step | time (ms) | / non-private | memory (MiB) "
          "| GFLOP (XLA) |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for trainable in ("full", "lora"):
        for r in bench(trainable, args.rank, args.batch_size, args.repeats):
            print(f"| {r['trainable']} | {r['params']:,} | {r['step']} | {r['ms']:.1f} | "
                  f"{r['ratio']:.2f} | {r['mib']:.1f} | {r['gflop']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
