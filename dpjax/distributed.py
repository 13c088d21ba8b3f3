"""Data-parallel DP-SGD over devices and processes, with ``jax.sharding``.

The physical batch is sharded along its leading axis over a one-axis
:class:`jax.sharding.Mesh` (axis ``"batch"``); the state is replicated. The
clipped sum is computed with ``shard_map``: each device runs the
single-device clipping function (vmap or fast) on its own rows, exactly as it
would on one device, and the per-device sums are added by ``psum`` (an
all-reduce); the noise, drawn from the replicated key of the step, and the
optimizer update are the same on every device. The update equals the
single-device update up to the summation order of floats.

Why ``shard_map`` rather than letting XLA partition the vmapped clipping from
in/out shardings alone: XLA:CPU's SPMD partitioning of batched convolution
gradients returned zero per-example gradients for the rows of every device but
the first (a bare ``jit(vmap(grad(conv_loss)))`` with a batch-sharded input does
the same), so conv models got wrong updates. With ``shard_map`` nothing inside
a device's clipping is partitioned, and the data-parallel structure is explicit.

Several processes (``train.distributed=true``, one per GPU under Slurm) see
one global mesh; each gathers only its slice of every chunk's rows and
contributes it with :func:`jax.make_array_from_process_local_data`.

With one device nothing here is used: the step runs exactly as before.
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dpjax.config import ConfigError
from dpjax.sampling import Chunk, default_party_rows, default_physical_batch_size
from dpjax.train import DPStep, combine_stats, jit_step

log = logging.getLogger("dpjax")
BATCH_AXIS = "batch"
PHYSICAL_MULTIPLE = 8  # the sampler's default rounding


def initialize(distributed: bool) -> None:
    """``jax.distributed.initialize()`` (Slurm and other clusters auto-detected) when
    ``distributed``; must run before anything touches a device."""
    if distributed and not jax.distributed.is_initialized():
        jax.distributed.initialize()
        log.info("jax.distributed: process %d of %d, %d local / %d global devices",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count())


def select_devices(spec: str | int) -> list[jax.Device]:
    """The devices of ``train.devices``: ``"all"`` or a positive count (the first ones)."""
    available = jax.devices()
    if str(spec) == "all":
        return available
    try:
        n = int(spec)
    except ValueError:
        n = 0
    if not 1 <= n <= len(available):
        raise ConfigError(
            f"Expected train.devices={spec!r} to be 'all' or an integer in "
            f"[1, {len(available)}] (the devices present)."
        )
    if jax.process_count() > 1 and n != len(available):
        raise ConfigError(
            f"Expected train.devices={spec!r} to be 'all' with {jax.process_count()} processes."
        )
    return available[:n]


def make_mesh(devices: list[jax.Device]) -> Mesh | None:
    """A one-axis batch mesh, or ``None`` for a single device (the unsharded path)."""
    if len(devices) == 1:
        return None
    return Mesh(np.asarray(devices), (BATCH_AXIS,))


def physical_batch_size(
    explicit: int | None,
    num_examples: int,
    sample_rate: float,
    num_devices: int,
    num_parties: int = 1,
) -> int:
    """The Poisson sampler's chunk size: the user's ``dp.physical_batch_size``, which
    must divide evenly over the devices (and SecAgg parties), or the default rounded
    up to a multiple of ``lcm(8, num_devices, num_parties)``.

    With ``num_parties > 1`` the default is ``num_parties`` blocks of
    :func:`~dpjax.sampling.default_party_rows` rows each (every party's shard gets its own
    3-sigma margin), the block rounded up so the whole stays a multiple of that lcm. A
    device's slice is then ``num_parties / num_devices`` whole blocks (:func:`shard_step`
    requires ``num_devices`` to divide ``num_parties``), so SecAgg's per-device reshape to
    ``(-1, rows)`` sees whole parties."""
    if explicit is not None:
        if explicit % num_devices:
            raise ConfigError(
                f"Expected dp.physical_batch_size={explicit} to be a multiple of the device "
                f"count {num_devices}: every device takes an equal slice of the physical "
                "batch (set train.devices, or leave dp.physical_batch_size=null)."
            )
        if explicit % num_parties:
            raise ConfigError(
                f"Expected dp.physical_batch_size={explicit} to be a multiple of "
                f"dp.num_parties={num_parties}: every SecAgg party holds an equal block of rows."
            )
        return explicit
    multiple = math.lcm(PHYSICAL_MULTIPLE, num_devices, num_parties)
    if num_parties == 1:
        return default_physical_batch_size(num_examples, sample_rate, multiple)
    block = multiple // num_parties  # rows per party must be a multiple of this
    rows = default_party_rows(num_examples, sample_rate, num_parties)
    return num_parties * block * math.ceil(rows / block)


def pad_chunk(chunk: Chunk, multiple: int) -> Chunk:
    """``chunk`` padded with masked rows (index 0, mask 0) to a multiple of ``multiple``."""
    extra = -len(chunk.indices) % multiple
    if not extra:
        return chunk
    return Chunk(np.concatenate([chunk.indices, np.zeros(extra, chunk.indices.dtype)]),
                 np.concatenate([chunk.mask, np.zeros(extra, chunk.mask.dtype)]))


def process_rows(chunk: Chunk) -> Chunk:
    """This process's contiguous slice of a chunk's rows (all rows with one process)."""
    n, i = jax.process_count(), jax.process_index()
    if n == 1:
        return chunk
    rows = len(chunk.indices) // n
    part = slice(i * rows, (i + 1) * rows)
    return Chunk(chunk.indices[part], chunk.mask[part])


def global_batch(local_tree, mesh: Mesh, global_rows: int):
    """Process-local rows -> global arrays sharded along the batch axis."""
    sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXIS))

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(sharding, x, (global_rows, *x.shape[1:]))

    return jax.tree_util.tree_map(put, local_tree)


def place_chunks(chunks: list[Chunk], x: np.ndarray, y: np.ndarray, mesh: Mesh | None):
    """The ``((x, y), mask)`` batches of a step's chunks: numpy on one device (the
    unsharded path); on a mesh, global arrays sharded by rows, each chunk padded to a
    multiple of the device count and each process gathering only its own rows."""
    if mesh is None:
        return [((x[c.indices], y[c.indices]), c.mask) for c in chunks]
    placed = []
    for c in chunks:
        c = pad_chunk(c, mesh.size)
        mine = process_rows(c)
        placed.append(global_batch(((x[mine.indices], y[mine.indices]), mine.mask), mesh,
                                   len(c.indices)))
    return placed


def replicate(tree, mesh: Mesh):
    """Every leaf replicated on every device of the mesh (same value in all processes)."""
    sharding = NamedSharding(mesh, PartitionSpec())
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree
    )


def local_copy(tree):
    """A replicated global tree as arrays on one local device (for host-side evaluation)."""
    return jax.tree_util.tree_map(lambda x: x.addressable_data(0), tree)


def sharded_local(local, aggregation, mesh: Mesh):
    """``local(params, batch, mask) -> (partial, stats)`` over rows sharded on ``mesh``.

    Each device evaluates ``local`` on its own rows alone (``shard_map``). A plain sum's
    partials are added across devices (``psum``); SecAgg's party sums stay on their
    devices (the party axis is sharded), to meet only in the step's one SecAgg round.
    The stats are combined.
    """
    rep, rows = PartitionSpec(), PartitionSpec(BATCH_AXIS)

    def per_device(params, batch, mask):
        partial, stats = local(params, batch, mask)
        stacked = jax.tree_util.tree_map(lambda x: x[None], stats)
        return aggregation.across_devices(partial, BATCH_AXIS), stacked

    # check_vma=False: with it, a replicated input used by per-device rows gets an implicit
    # pvary whose transpose is a psum, so each row's gradient would be summed over devices
    # inside the per-example vmap (mixing examples) before clipping.
    mapped = jax.shard_map(per_device, mesh=mesh, in_specs=(rep, rows, rows),
                           out_specs=(rows if aggregation.partial_sharded else rep, rows),
                           check_vma=False)

    def total(params, batch, mask):
        partial, stacked = mapped(params, batch, mask)
        return partial, combine_stats(stacked)

    return total


def shard_step(dp_step: DPStep, mesh: Mesh) -> DPStep:
    """``dp_step`` for ``mesh``: each device clips its own rows (:func:`sharded_local`), the
    batch is sharded and the state replicated (and still donated). Works for every
    aggregation; with SecAgg each device must hold whole parties."""
    aggregation = dp_step.aggregation
    if aggregation.num_parties % mesh.size and aggregation.num_parties > 1:
        raise ConfigError(
            f"Expected dp.num_parties={aggregation.num_parties} to be a multiple of the device "
            f"count {mesh.size}: every device holds whole SecAgg parties."
        )
    wrap = _one_at_a_time if mesh.devices.flat[0].platform == "cpu" else None
    shardings = (NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh,
                                                                     PartitionSpec(BATCH_AXIS)))
    return jit_step(dp_step.parts, aggregation,
                    local=sharded_local(dp_step.parts.local, aggregation, mesh), wrap=wrap,
                    shardings=shardings)


def _one_at_a_time(jitted):
    """Waits for each call's result before returning it (CPU meshes only).

    On XLA:CPU, every device of a mesh runs its part of a program on a shared
    thread pool with about one thread per device, and an all-reduce blocks its
    thread until all devices arrive. With several sharded calls in flight
    (asynchronous dispatch), the threads can all be taken by parts waiting at
    a collective whose last part has no thread left to run on: the process
    aborts after XLA's 40 s rendezvous timeout (seen with 8 host devices on a
    2-core machine). Host CPU meshes are for tests and simulation, so giving
    up the overlap of dispatch and compute there costs little; GPU and TPU
    meshes keep asynchronous dispatch.
    """

    @functools.wraps(jitted)
    def call(*args):
        return jax.block_until_ready(jitted(*args))

    return call
