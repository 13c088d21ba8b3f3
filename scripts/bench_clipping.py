"""Benchmarks one DP-SGD step: non-private vs vmap clipping vs fast clipping.

Prints one table: median time of a full jitted optimizer step (SGD, donated
state) for each model and path, the DP / non-private ratio, and XLA's compiled
memory estimate (arguments + outputs + temporaries - aliased) of that step. The
paths are timed interleaved, round by round, so drift in machine load hits all
of them alike. Then the MLP at B=1024 memory comparison, and, when installed,
Opacus (ghost clipping, CPU torch) and jax-privacy (vmap clipping) step times.

    python scripts/bench_clipping.py [--rounds 15] [--quick]
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

import flax  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from dpjax.models.nets import DPCNN, MLP  # noqa: E402
from dpjax.train import (  # noqa: E402
    cross_entropy_loss,
    init_state,
    make_dp_step,
    make_nonprivate_step,
)

PATHS = ("non-private", "vmap DP", "fast DP")
LEARNING_RATE = 0.05


class TransformerBlock(nn.Module):
    heads: int
    d: int

    @nn.compact
    def __call__(self, x):
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(nn.LayerNorm()(x))
        h = nn.gelu(nn.Dense(4 * self.d)(nn.LayerNorm()(x)))
        return x + nn.Dense(self.d)(h)


class Transformer(nn.Module):
    """Token + position embeddings, pre-LN blocks, mean-pooled classifier."""

    vocab: int = 256
    length: int = 64
    d: int = 128
    heads: int = 4
    layers: int = 2
    num_classes: int = 10

    @nn.compact
    def __call__(self, ids):
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)  # per example
        x = nn.Embed(self.vocab, self.d)(ids) + nn.Embed(self.length, self.d)(positions)
        for _ in range(self.layers):
            x = TransformerBlock(self.heads, self.d)(x)
        return nn.Dense(self.num_classes)(jnp.mean(nn.LayerNorm()(x), axis=1))


def workloads(quick: bool):
    """(name, model, batch) triples at the sizes of issue 4."""
    key = jax.random.PRNGKey(0)
    k1, k2 = jax.random.split(key)
    b = 32 if quick else 256
    images = jax.random.normal(k1, (b, 28, 28, 1))
    labels = jax.random.randint(k2, (b,), 0, 10)
    tb = 8 if quick else 64
    tokens = jax.random.randint(k1, (tb, 64), 0, 256)
    return [
        (f"MLP 784-512-512-10, B={b}", MLP(), (images, labels)),
        (f"DP CNN 28x28x1, B={b}", DPCNN(), (images, labels)),
        (f"Transformer 2x128, T=64, B={tb}", Transformer(), (tokens, labels[:tb])),
    ]


def make_steps(model, batch):
    params = model.init(jax.random.PRNGKey(1), batch[0][:1])["params"]
    loss_fn = cross_entropy_loss(model.apply)
    opt = optax.sgd(LEARNING_RATE)
    b = batch[1].shape[0]
    dp = dict(noise_multiplier=1.0, l2_clip_norm=1.0, expected_batch_size=float(b))
    steps = {
        "non-private": make_nonprivate_step(loss_fn, opt),
        "vmap DP": make_dp_step(loss_fn, opt, clipping_method="vmap", **dp),
        "fast DP": make_dp_step(loss_fn, opt, clipping_method="fast", **dp),
    }
    return steps, params, opt


def peak_bytes(step_fn, state, batch, mask) -> int:
    """XLA's estimate of the step's live memory: arguments + outputs + temporaries - aliased."""
    m = step_fn.lower(state, batch, mask).compile().memory_analysis()
    return (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )


def time_paths(steps, params, opt, batch, rounds: int) -> dict[str, tuple[float, float]]:
    """Median seconds of (whole step, gradient part only) of each path, timed interleaved."""
    mask = jnp.ones(batch[1].shape[0])
    states = {p: init_state(params, opt, seed=0) for p in steps}
    for p, s in steps.items():  # compile + warm up
        for _ in range(2):
            states[p], stats = s.step(states[p], batch, mask)
            jax.block_until_ready(s.clipped_sum(states[p].params, batch, mask))
        jax.block_until_ready(states[p])
    times: dict[str, list[float]] = {p: [] for p in steps}
    grad_times: dict[str, list[float]] = {p: [] for p in steps}
    for _ in range(rounds):
        for p, s in steps.items():
            t0 = time.perf_counter()
            states[p], stats = s.step(states[p], batch, mask)
            jax.block_until_ready((states[p], stats))
            t1 = time.perf_counter()
            jax.block_until_ready(s.clipped_sum(states[p].params, batch, mask))
            times[p].append(t1 - t0)
            grad_times[p].append(time.perf_counter() - t1)
    return {p: (statistics.median(times[p]), statistics.median(grad_times[p])) for p in steps}


def memories(steps, params, opt, batch) -> dict[str, tuple[int, int]]:
    """XLA peak estimates of (whole step, gradient part only) of each path."""
    mask = jnp.ones(batch[1].shape[0])
    state = init_state(params, opt, 0)
    return {
        p: (peak_bytes(s.step, state, batch, mask), peak_bytes(s.clipped_sum, params, batch, mask))
        for p, s in steps.items()
    }


def jax_privacy_step_time(model, batch, rounds: int) -> float | None:
    """A DP-SGD step with ``jax_privacy.clipping.clipped_grad`` (vmap), Gaussian noise, SGD."""
    if importlib.util.find_spec("jax_privacy") is None:
        return None
    from jax_privacy import clipping as jp_clipping  # noqa: PLC0415

    params = model.init(jax.random.PRNGKey(1), batch[0][:1])["params"]
    loss = cross_entropy_loss(model.apply)
    grad_fn = jp_clipping.clipped_grad(
        lambda p, x, y: loss(p, (x, y))[0], l2_clip_norm=1.0, batch_argnums=(1, 2)
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


def opacus_step_time(name: str, batch, rounds: int) -> float | None:
    """Opacus 'ghost' clipping (two backward passes) on the same MLP / CNN in CPU torch."""
    if importlib.util.find_spec("opacus") is None or importlib.util.find_spec("torch") is None:
        return None
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415
    from opacus import PrivacyEngine  # noqa: PLC0415

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    tnn = torch.nn
    if name.startswith("MLP"):
        model = tnn.Sequential(
            tnn.Flatten(), tnn.Linear(784, 512), tnn.ReLU(), tnn.Linear(512, 512), tnn.ReLU(),
            tnn.Linear(512, 10),
        )  # fmt: skip
    elif name.startswith("DP CNN"):
        model = tnn.Sequential(
            tnn.Conv2d(1, 16, 8, 2, padding=3), tnn.Tanh(), tnn.MaxPool2d(2, 1),
            tnn.Conv2d(16, 32, 4, 2), tnn.Tanh(), tnn.MaxPool2d(2, 1), tnn.Flatten(),
            tnn.Linear(32 * 4 * 4, 32), tnn.Tanh(), tnn.Linear(32, 10),
        )  # fmt: skip
    else:
        return None
    x = torch.from_numpy(np.asarray(batch[0])).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(np.asarray(batch[1])).long()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="small batches (a smoke test)")
    args = parser.parse_args()

    print(
        f"# {datetime.date.today()}  {platform.machine()} CPU x{os.cpu_count()}  "
        f"jax {jax.__version__}  flax {flax.__version__}  optax {optax.__version__}  "
        f"median of {args.rounds} interleaved steps"
    )
    print(
        "# step = whole jitted DP-SGD step (clipped sum + Gaussian noise + SGD update); "
        "grad = the clipped sum alone (non-private: the plain gradient sum)"
    )
    head = (
        f"| {'model':34} | {'path':12} | step ms | x non-private | grad ms | x non-private "
        "| step MiB | grad MiB |"
    )
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for name, model, batch in workloads(args.quick):
        steps, params, opt = make_steps(model, batch)
        t = time_paths(steps, params, opt, batch, args.rounds)
        mem = memories(steps, params, opt, batch)
        for p in PATHS:
            (step, grad), (step_mem, grad_mem) = t[p], mem[p]
            print(
                f"| {name:34} | {p:12} | {1e3 * step:7.1f} | {step / t['non-private'][0]:13.2f} "
                f"| {1e3 * grad:7.1f} | {grad / t['non-private'][1]:13.2f} "
                f"| {_mib(step_mem)} | {_mib(grad_mem)} |"
            )
        others = (
            ("opacus ghost", opacus_step_time(name, batch, max(5, args.rounds // 3))),
            ("jax-privacy", jax_privacy_step_time(model, batch, max(3, args.rounds // 3))),
        )
        for label, s in others:
            cells = (
                ("n/a", "") if s is None else (f"{1e3 * s:.1f}", f"{s / t['non-private'][0]:.2f}")
            )
            print(f"| {name:34} | {label:12} | {cells[0]:>7} | {cells[1]:>13} |{' |' * 4}")

    b = 64 if args.quick else 1024
    images = jax.random.normal(jax.random.PRNGKey(0), (b, 28, 28, 1))
    batch = (images, jnp.zeros((b,), jnp.int32))
    steps, params, opt = make_steps(MLP(), batch)
    mem = memories(steps, params, opt, batch)
    print(f"\nMLP 784-512-512-10 at B={b}, XLA peak estimate (arguments + outputs + temporaries):")
    for p in PATHS:
        (step, grad), (step0, grad0) = mem[p], mem["non-private"]
        print(
            f"  {p:11} whole step {_mib(step)} MiB ({step / step0:.2f}x non-private), "
            f"gradient part {_mib(grad)} MiB ({grad / grad0:.2f}x)"
        )
    for label, spec in (("opacus", "opacus"), ("jax-privacy", "jax_privacy")):
        if importlib.util.find_spec(spec) is None:
            print(f"{label} is not installed: its column is n/a.")


if __name__ == "__main__":
    main()
