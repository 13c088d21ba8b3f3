"""Step time and examples/s of the data-parallel DP-SGD step on 1, 2, 4, 8 devices.

Weak scaling keeps the rows per device fixed (the global batch grows with the
device count); strong scaling keeps the global batch fixed. Model: the MLP
784-512-512-10 on 28x28x1 inputs, vmap clipping, SGD, the batch sharded over a
one-axis mesh (``dpjax.distributed``); one device is the unsharded step.

On accelerators the counts run in this process on the devices present. On CPU
each count re-runs this script in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=N``: the N "devices" share
the same cores, so the figures show the sharding overhead, not a speedup.
``--quick`` runs 1 and 2 devices at tiny batches (a smoke run).

    python scripts/bench_scaling.py [--per-device 64] [--global-batch 256] [--repeats 20] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

COUNTS = (1, 2, 4, 8)
QUICK_COUNTS = (1, 2)  # the unsharded step and a sharded one


def measure(num_devices: int, batch_size: int, repeats: int) -> dict:
    import jax
    import optax

    from dpjax import distributed
    from dpjax.models import get_model
    from dpjax.sampling import Chunk
    from dpjax.train import cross_entropy_loss, init_state, make_dp_step

    devices = jax.devices()[:num_devices]
    mesh = distributed.make_mesh(devices)
    model = get_model("mlp", 10, hidden=(512, 512))
    rng = np.random.RandomState(0)
    x = rng.randn(batch_size, 28, 28, 1).astype(np.float32)
    y = rng.randint(0, 10, batch_size).astype(np.int32)
    params = model.init(jax.random.PRNGKey(0), x[:1])["params"]
    opt = optax.sgd(0.1)
    step = make_dp_step(cross_entropy_loss(model.apply), opt, noise_multiplier=1.0,
                        l2_clip_norm=1.0, expected_batch_size=float(batch_size))
    state = init_state(params, opt, seed=0)
    chunk = Chunk(np.arange(batch_size, dtype=np.int32), np.ones(batch_size, np.float32))
    if mesh is not None:
        step = distributed.shard_step(step, mesh)
        state = distributed.replicate(state, mesh)
    chunks = distributed.place_chunks([chunk], x, y, mesh)
    state, _ = step.run(state, chunks)  # compile
    jax.block_until_ready(state)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state, _ = step.run(state, chunks)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
    t = float(np.median(times))
    return {"devices": num_devices, "batch": batch_size, "step_ms": 1e3 * t,
            "examples_per_s": batch_size / t, "device_kind": devices[0].device_kind,
            "platform": devices[0].platform}


def run_counts(counts, args) -> list[dict]:
    """Weak and strong scaling rows, each count in this process or in a subprocess."""
    import jax

    on_cpu = jax.default_backend() == "cpu"
    rows = []
    for n in counts:
        for mode, batch in (("weak", args.per_device * n), ("strong", args.global_batch)):
            if on_cpu:
                env = {**os.environ,
                       "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}
                out = subprocess.run(
                    [sys.executable, __file__, "--child", str(n), "--batch", str(batch),
                     "--repeats", str(args.repeats)],
                    capture_output=True, text=True, env=env, check=True)
                row = json.loads(out.stdout.strip().splitlines()[-1])
            elif n <= jax.device_count():
                row = measure(n, batch, args.repeats)
            else:
                continue
            rows.append({"mode": mode, **row})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-device", type=int, default=64, help="weak scaling rows/device")
    parser.add_argument("--global-batch", type=int, default=256, help="strong scaling batch")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="1 and 2 devices, tiny batches")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.batch, args.repeats)))
        return
    if args.quick:
        args.per_device, args.global_batch, args.repeats = 4, 8, 1
    rows = run_counts(QUICK_COUNTS if args.quick else COUNTS, args)
    print(f"# bench_scaling {datetime.date.today()} | {platform.node()} | "
          f"{os.cpu_count()} CPU cores | {rows[0]['platform']}: {rows[0]['device_kind']}")
    if rows[0]["platform"] == "cpu":
        print("# CPU with forced host devices: all 'devices' share the same cores, so these "
              "figures show the sharding overhead, not a speedup.")
    print("| scaling | devices | global batch | step (ms) | examples/s |")
    print("|---|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: (r["mode"] != "weak", r["devices"])):
        print(f"| {r['mode']} | {r['devices']} | {r['batch']} | {r['step_ms']:.1f} "
              f"| {r['examples_per_s']:.0f} |")


if __name__ == "__main__":
    main()
