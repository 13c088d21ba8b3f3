"""Benchmarks one DP-SGD step: non-private vs vmap clipping vs fast clipping, three frameworks.

Prints one table: median time of a full jitted optimizer step (SGD, donated
state) for each model, framework (Flax Linen, Flax NNX, Equinox) and path, the
DP / non-private ratio, and XLA's compiled memory estimate (arguments +
outputs + temporaries - aliased) of the step and of its gradient part. The
paths are timed interleaved, round by round, so drift in machine load hits all
of them alike (except vmap DP, timed in its own rounds: see ``time_paths``).
Then the MLP at B=1024 memory comparison, and, when installed,
Opacus (ghost clipping, CPU torch) and jax-privacy (vmap clipping) step times.

Paths: ``fast DP`` is the default fast path (``clipping_method="fast"``: book-keeping,
one backward pass); ``fast_lean DP`` its memory-lean mode (``clipping_method="fast_lean"``:
norms from one backward pass, the sum from a second; the step runs the clipped sum
and the update as two compiled programs, so its whole-step memory is the larger of
the two, the update's counted with the batch the caller still holds).

    python scripts/bench_clipping.py [--rounds 15] [--quick] [--batch-size 256]
                                     [--frameworks linen nnx equinox]
                                     [--models mlp cnn transformer] [--no-memory-table]
                                     [--memory-only]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import equinox as eqx  # noqa: E402
import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from benchlib.clipping_models import BUILDERS  # noqa: E402  (scripts/ is sys.path[0])

from dpjax.memory import compiled_peak_bytes, step_peak_bytes  # noqa: E402
from dpjax.train import (  # noqa: E402
    init_state,
    make_dp_step,
    make_nonprivate_step,
)

PATHS = ("non-private", "vmap DP", "fast DP", "fast_lean DP")
FRAMEWORKS = ("linen", "nnx", "equinox")
MODELS = ("mlp", "cnn", "transformer")
LEARNING_RATE = 0.05
DP = dict(noise_multiplier=1.0, l2_clip_norm=1.0)




def workloads(quick: bool, image_batch: int = 256):
    """(name, kind, batch) triples at the sizes of issue 4 (``image_batch`` for the MLP
    and the CNN)."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    b = 32 if quick else image_batch
    images = jax.random.normal(k1, (b, 28, 28, 1))
    labels = jax.random.randint(k2, (b,), 0, 10)
    tb = 8 if quick else 64
    tokens = jax.random.randint(k1, (tb, 64), 0, 256)
    return [
        (f"MLP 784-512-512-10, B={b}", "mlp", (images, labels)),
        (f"DP CNN 28x28x1, B={b}", "cnn", (images, labels)),
        (f"Transformer 2x128, T=64, B={tb}", "transformer", (tokens, labels[:tb])),
    ]


def memory_workloads(quick: bool):
    """(name, kind, batch) triples of the memory table: B=1024 images (the issue's size),
    B=256 sequences; ``quick``: the timed table's shapes (compiled once for both)."""
    b, tb = (32, 8) if quick else (1024, 256)
    images = jax.random.normal(jax.random.PRNGKey(0), (b, 28, 28, 1))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (tb, 64), 0, 256)
    return [
        (f"MLP 784-512-512-10 at B={b}", "mlp", (images, jnp.zeros((b,), jnp.int32))),
        (f"DP CNN 28x28x1 at B={b}", "cnn", (images, jnp.zeros((b,), jnp.int32))),
        (f"Transformer 2x128, T=64, at B={tb}", "transformer",
         (tokens, jnp.zeros((tb,), jnp.int32))),
    ]


def make_steps(loss_fn, params, batch):
    opt = optax.sgd(LEARNING_RATE)
    b = batch[1].shape[0]
    dp = dict(**DP, expected_batch_size=float(b))
    steps = {
        "non-private": make_nonprivate_step(loss_fn, opt),
        "vmap DP": make_dp_step(loss_fn, opt, clipping_method="vmap", **dp),
        "fast DP": make_dp_step(loss_fn, opt, clipping_method="fast", **dp),
        "fast_lean DP": make_dp_step(loss_fn, opt, clipping_method="fast_lean", **dp),
    }
    return steps, params, opt


def time_paths(steps, params, opt, batch, rounds: int) -> dict[str, tuple[float, float]]:
    """Median seconds of (whole step, gradient part only) of each path.

    The paths are timed interleaved, round by round, except ``vmap DP``, which is timed
    in its own rounds afterwards: its per-example gradients (660 MiB for the MLP at
    B = 256) evict the caches and hand memory back to the OS, and the path timed right
    after it paid for that (2026-11-30, idle: the MLP's fast clipped sum 1.91x
    non-private interleaved after vmap, 1.06x without; the "wall-time gap" of earlier
    notes).
    """
    mask = jnp.ones(batch[1].shape[0])
    states = {p: init_state(params, opt, seed=0) for p in steps}
    for p, s in steps.items():  # compile + warm up
        for _ in range(2):
            states[p], _ = s.step(states[p], batch, mask)
            jax.block_until_ready(s.clipped_sum(states[p].params, batch, mask))
        jax.block_until_ready(states[p])
    times: dict[str, list[float]] = {p: [] for p in steps}
    grad_times: dict[str, list[float]] = {p: [] for p in steps}
    light = [p for p in steps if p != "vmap DP"]
    for group in (light, [p for p in steps if p not in light]):
        _time_rounds({p: steps[p] for p in group}, states, batch, mask, rounds, times,
                     grad_times)
    return {p: (statistics.median(times[p]), statistics.median(grad_times[p])) for p in steps}


def _time_rounds(steps, states, batch, mask, rounds: int, times, grad_times) -> None:
    for _ in range(rounds if steps else 0):
        for p, s in steps.items():
            t0 = time.perf_counter()
            states[p], stats = s.step(states[p], batch, mask)
            jax.block_until_ready((states[p], stats))
            t1 = time.perf_counter()
            jax.block_until_ready(s.clipped_sum(states[p].params, batch, mask))
            times[p].append(t1 - t0)
            grad_times[p].append(time.perf_counter() - t1)


def memories(steps, params, opt, batch) -> dict[str, tuple[int, int]]:
    """XLA peak estimates of (whole step, gradient part only) of each path."""
    mask = jnp.ones(batch[1].shape[0])
    state = init_state(params, opt, 0)
    return {
        p: (step_peak_bytes(s, state, batch, mask),
            compiled_peak_bytes(s.clipped_sum, params, batch, mask))
        for p, s in steps.items()
    }


def jax_privacy_step_time(loss_fn, params, batch, rounds: int) -> float | None:
    """A DP-SGD step with ``jax_privacy.clipping.clipped_grad`` (vmap), Gaussian noise, SGD."""
    if importlib.util.find_spec("jax_privacy") is None:
        return None
    from jax_privacy import clipping as jp_clipping  # noqa: PLC0415

    grad_fn = jp_clipping.clipped_grad(
        lambda p, x, y: loss_fn(p, (x, y))[0], l2_clip_norm=1.0, batch_argnums=(1, 2)
    )
    opt = optax.sgd(LEARNING_RATE)
    b = batch[1].shape[0]

    @jax.jit
    def step(params, opt_state, key, x, y):
        g = grad_fn(params, x, y)
        leaves, treedef = jax.tree_util.tree_flatten(g)
        keys = jax.random.split(key, len(leaves))
        noisy = [
            (v + jax.random.normal(k, v.shape, v.dtype)) / b
            for v, k in zip(leaves, keys, strict=True)
        ]
        updates, opt_state = opt.update(jax.tree_util.tree_unflatten(treedef, noisy), opt_state)
        return optax.apply_updates(params, updates), opt_state

    opt_state, times = opt.init(params), []
    for i in range(rounds + 2):
        t0 = time.perf_counter()
        params, opt_state = step(params, opt_state, jax.random.PRNGKey(i), *batch)
        jax.block_until_ready(params)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


def opacus_step_time(kind: str, batch, rounds: int) -> float | None:
    """Opacus 'ghost' clipping (two backward passes) on the same MLP / CNN in CPU torch,
    timed in a child process so that torch's thread pool (``set_num_threads``) never
    shares a process with XLA's. (In-process and child-process runs, 2026-11-30, gave the
    same JAX rows within the run-to-run spread: this is hygiene, not a measured fix.)"""
    if importlib.util.find_spec("opacus") is None or importlib.util.find_spec("torch") is None:
        return None
    import multiprocessing  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415

    args = (kind, np.asarray(batch[0]), np.asarray(batch[1]), rounds)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_opacus_child, args)


def _opacus_child(kind: str, images, labels, rounds: int) -> float | None:
    import torch  # noqa: PLC0415
    from opacus import PrivacyEngine  # noqa: PLC0415

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    tnn = torch.nn
    if kind == "mlp":
        model = tnn.Sequential(
            tnn.Flatten(), tnn.Linear(784, 512), tnn.ReLU(), tnn.Linear(512, 512), tnn.ReLU(),
            tnn.Linear(512, 10),
        )  # fmt: skip
    elif kind == "cnn":
        model = tnn.Sequential(
            tnn.Conv2d(1, 16, 8, 2, padding=3), tnn.Tanh(), tnn.MaxPool2d(2, 1),
            tnn.Conv2d(16, 32, 4, 2), tnn.Tanh(), tnn.MaxPool2d(2, 1), tnn.Flatten(),
            tnn.Linear(32 * 4 * 4, 32), tnn.Tanh(), tnn.Linear(32, 10),
        )  # fmt: skip
    else:
        return None
    x = torch.from_numpy(images.copy()).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(labels.copy()).long()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=x.shape[0]
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    model, optimizer, criterion, _ = PrivacyEngine().make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        criterion=tnn.CrossEntropyLoss(),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        grad_sample_mode="ghost",
        poisson_sampling=False,
    )
    times = []
    for _ in range(rounds + 2):
        t0 = time.perf_counter()
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        optimizer.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


def _mib(n: int) -> str:
    return f"{n / 2**20:8.1f}"


def _header(rounds: int, memory_only: bool) -> str:
    timing = ("memory only (XLA estimates, nothing timed)" if memory_only
              else f"median of {rounds} interleaved steps (vmap DP in its own rounds, after)")
    return (
        f"# {datetime.date.today()}  {platform.machine()} CPU x{os.cpu_count()}  "
        f"jax {jax.__version__}  flax {flax.__version__}  equinox {eqx.__version__}  "
        f"optax {optax.__version__}  {timing}\n"
        "# step = whole jitted DP-SGD step (clipped sum + Gaussian noise + SGD update; "
        "fast_lean: two programs, the larger counted); "
        "grad = the clipped sum alone (non-private: the plain gradient sum)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="small batches (a smoke test)")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="the MLP's and the CNN's batch in the timed table")
    parser.add_argument("--frameworks", nargs="+", default=list(FRAMEWORKS), choices=FRAMEWORKS)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--no-memory-table", action="store_true",
                        help="skip the memory comparison at B=1024")
    parser.add_argument("--memory-only", action="store_true",
                        help="only the memory comparison (XLA estimates: no timing)")
    args = parser.parse_args()

    print(_header(args.rounds, args.memory_only))
    if not args.memory_only:
        timing_table(args)
    if not args.no_memory_table:
        memory_table(args)
    for label, spec in (("opacus", "opacus"), ("jax-privacy", "jax_privacy")):
        if importlib.util.find_spec(spec) is None:
            print(f"{label} is not installed: its rows are n/a.")


def timing_table(args) -> None:
    """The timed table: every model, framework and path, and Opacus / jax-privacy."""
    head = (
        f"| {'model':32} | {'framework':9} | {'path':14} | step ms | x non-private | grad ms "
        "| x non-private | step MiB | grad MiB |"
    )
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for name, kind, batch in workloads(args.quick, args.batch_size):
        if kind not in args.models:
            continue
        for framework in args.frameworks:
            loss_fn, params = BUILDERS[framework](kind, batch[0])
            steps, params, opt = make_steps(loss_fn, params, batch)
            t = time_paths(steps, params, opt, batch, args.rounds)
            mem = memories(steps, params, opt, batch)
            for p in PATHS:
                (step, grad), (step_mem, grad_mem) = t[p], mem[p]
                print(
                    f"| {name:32} | {framework:9} | {p:14} | {1e3 * step:7.1f} "
                    f"| {step / t['non-private'][0]:13.2f} | {1e3 * grad:7.1f} "
                    f"| {grad / t['non-private'][1]:13.2f} | {_mib(step_mem)} | {_mib(grad_mem)} |",
                    flush=True,
                )
            if framework != "linen":
                continue
            others = (
                ("opacus ghost", opacus_step_time(kind, batch, max(5, args.rounds // 3))),
                ("jax-privacy",
                 jax_privacy_step_time(loss_fn, params, batch, max(3, args.rounds // 3))),
            )
            for label, s in others:
                cells = (("n/a", "") if s is None
                         else (f"{1e3 * s:.1f}", f"{s / t['non-private'][0]:.2f}"))
                print(f"| {name:32} | {'torch' if 'opacus' in label else 'jax':9} "
                      f"| {label:14} | {cells[0]:>7} | {cells[1]:>13} |{' |' * 4}")


def memory_table(args) -> None:
    """Whole-step and gradient-part memory of every path at the issue's batch size."""
    for name, kind, batch in memory_workloads(args.quick):
        if kind not in args.models:
            continue
        print(f"\n{name}, XLA peak estimate (arguments + outputs + temporaries):", flush=True)
        for framework in args.frameworks:
            steps, params, opt = make_steps(*BUILDERS[framework](kind, batch[0]), batch)
            mem = memories(steps, params, opt, batch)
            for p in PATHS:
                (step, grad), (step0, grad0) = mem[p], mem["non-private"]
                print(
                    f"  {framework:8} {p:14} whole step {_mib(step)} MiB ({step / step0:.2f}x "
                    f"non-private), gradient part {_mib(grad)} MiB ({grad / grad0:.2f}x)",
                    flush=True,
                )


if __name__ == "__main__":
    main()
