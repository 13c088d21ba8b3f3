"""A run assembled from its config: the task, the mechanism, the plan and the step.

:func:`assemble` builds everything the step loop of :mod:`dpjax.loop` reads, in
order: the task (data, model, loss), the planned step count, the devices and the
physical batch size, the :class:`~dpjax.mechanism.Mechanism` (which calibrates
sigma for a target epsilon), its jitted step, and the initial state with the
run's secret.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import dpjax.accounting as accounting
import dpjax.checkpoint as checkpoint
import dpjax.distributed as distributed
import dpjax.randomness as randomness
from dpjax.aggregation import SecAggSettings
from dpjax.clipping import per_layer_clip_norms
from dpjax.config import ConfigError, RunConfig, check_survivors, perf, secagg_mode
from dpjax.mechanism import Mechanism
from dpjax.plan import Plan, plan_run, planned_steps
from dpjax.sampling import PoissonSampler
from dpjax.task import Task, build_optimizer, build_task
from dpjax.train import DPStep, TrainState, init_state, make_nonprivate_step, make_step


@dataclasses.dataclass(frozen=True)
class Run:
    """Everything the step loop reads; fixed before the first step."""

    cfg: RunConfig
    task: Task
    mechanism: Mechanism | None  # None: the non-private baseline (dp.enabled=false)
    plan: Plan
    physical_batch_size: int
    step_fn: DPStep
    mesh: Any  # jax.sharding.Mesh, or None on one device (the unsharded path)
    checkpointer: checkpoint.Checkpointer
    federated: Any = None  # dp.unit=user: (partition, local training)

    def sampler(self, secret: randomness.Secret):
        if self.federated is not None:
            from dpjax.federated.rounds import user_sampler  # noqa: PLC0415

            partition, local = self.federated
            return user_sampler(self.mechanism, partition, local, secret=secret)
        if self.mechanism is not None:
            return self.mechanism.sampler(secret)
        num_train = len(self.task.x_train)
        return PoissonSampler(num_train, self.cfg.train.batch_size / num_train,
                              self.physical_batch_size, seed=None, secret=secret)

    def batches(self, sampler, step: int):
        """The step's input to ``step_fn.run``: placed chunks of rows, or (DP-FedAvg) the
        round's slot chunks of users."""
        if self.federated is not None:
            return sampler.sample(step)
        return distributed.place_chunks(sampler.sample(step), self.task.x_train,
                                        self.task.y_train, self.mesh)

    def data_fingerprint(self, secret: randomness.Secret) -> str:
        return checkpoint.data_fingerprint(secret, self.task.x_train, self.task.y_train)


@dataclasses.dataclass(frozen=True)
class Parts:
    """The pieces of a run that an audit also needs: task, mechanism, planned steps, the
    physical batch size and the device mesh."""

    task: Task
    mechanism: Mechanism | None
    steps: int
    physical_batch_size: int
    mesh: Any
    federated: Any = None  # dp.unit=user: (partition, local training)


def assemble_parts(cfg: RunConfig, task: Task | None = None) -> Parts:
    """Task (built unless given), planned steps, devices, physical batch size and mechanism
    (which calibrates sigma for a target epsilon) of ``cfg``."""
    task = task or build_task(cfg)
    num_train = len(task.x_train)
    steps = planned_steps(cfg, num_train)
    devices = distributed.select_devices(cfg.train.devices)
    mesh = distributed.make_mesh(devices)
    d, p = cfg.dp, perf(cfg)
    parties = d.num_parties if d.enabled and d.aggregation == "secagg" else 1
    physical = distributed.physical_batch_size(p.physical_batch_size, num_train,
                                               cfg.train.batch_size / num_train, len(devices),
                                               parties)
    if d.enabled and d.sampling == "fixed_size":
        physical = cfg.train.batch_size
    if d.enabled and d.unit == "user":
        return _user_level(cfg, task, steps, mesh)
    mechanism = None
    if d.enabled:
        mechanism = Mechanism.from_config(d, num_examples=num_train,
                                          batch_size=cfg.train.batch_size, steps=steps,
                                          physical_batch_size=physical, params=task.params,
                                          seed=cfg.train.seed)
    return Parts(task, mechanism, steps, physical, mesh)


def _user_level(cfg: RunConfig, task: Task, steps: int, mesh) -> Parts:
    """DP-FedAvg: the user partition, each user's local training and the user-level
    mechanism (users Poisson-sampled into a fixed number of slots; :mod:`dpjax.federated`)."""
    import dpjax.federated.settings as fed  # noqa: PLC0415
    from dpjax.federated.rounds import user_level_mechanism, user_secagg  # noqa: PLC0415

    if task.lm is not None:
        raise ConfigError(f"Expected dp.unit='example' with dataset={cfg.dataset.name!r} (got "
                          "dp.unit='user'): a language model's unit of privacy is one record, "
                          "and a text corpus has no users or labels to partition them by "
                          "(federated.partition would group records by their lengths).")
    if mesh is not None:
        raise ConfigError("Expected train.devices=1 with dp.unit='user': a round runs on one "
                          "device.")
    d, f = cfg.dp, cfg.federated
    fed.validate_federated(f, len(task.x_train))
    user_ids = None
    if f.partition == "natural":
        from dpjax.federated.users import load_npz_user_ids  # noqa: PLC0415

        user_ids = load_npz_user_ids(cfg.dataset.options.get("path"), len(task.x_train))
    partition = fed.build_partition(f, task.y_train, user_ids)
    local = fed.build_local_training(f)
    accounting.check_delta(d.delta, partition.num_users)
    clip = d.l2_clip_norm
    if d.per_layer_clipping:
        clip = per_layer_clip_norms(task.params, d.l2_clip_norm, depth=1)
    q = fed.sample_rate(f, partition.num_users)
    from dpjax.federated.slots import default_num_slots  # noqa: PLC0415

    slots = f.num_slots or default_num_slots(partition.num_users, q)
    if d.noise != "gaussian":  # each user's slot adds its share of discrete noise
        # simulated dropouts are slots kept empty (UserSampler.free_slots): extra ones, so
        # users keep the free slots they would have and overflow stays as rare
        slots += d.simulated_dropouts
        check_survivors(d, slots, f"the round's {slots} slots (federated.num_slots, or the "
                        "default, plus dp.simulated_dropouts)")
        import math  # noqa: PLC0415

        import jax  # noqa: PLC0415

        from dpjax.choices import Noise, Sampling, Unit  # noqa: PLC0415
        from dpjax.mechanism import distributed_mechanism  # noqa: PLC0415

        common = dict(sampling=Sampling.POISSON, num_examples=partition.num_users,
                      sample_rate=q, expected_batch_size=q * partition.num_users,
                      physical_batch_size=slots, noise=Noise(d.noise), unit=Unit.USER,
                      num_params=sum(math.prod(p.shape)
                                     for p in jax.tree_util.tree_leaves(task.params)))
        mechanism = distributed_mechanism(Mechanism, d, common, clip, steps, cfg.train.seed)
        return Parts(task, mechanism, steps, slots, None, (partition, local))
    aggregation = None
    if d.aggregation == "secagg":
        settings = SecAggSettings(slots, d.secagg_threshold, d.secagg_neighbours,
                                  secagg_mode(d), seed=cfg.train.seed)
        aggregation = user_secagg(settings, clip)
    mechanism = user_level_mechanism(
        num_users=partition.num_users, sample_rate=q, l2_clip_norm=clip, params=task.params,
        noise_multiplier=d.noise_multiplier, target_epsilon=d.target_epsilon, delta=d.delta,
        rounds=steps, accountant=d.accountant, num_slots=slots, aggregation=aggregation)
    return Parts(task, mechanism, steps, slots, None, (partition, local))


def step_of(cfg: RunConfig, parts: Parts, optimizer, loss_fn=None) -> DPStep:
    """The jitted step of ``parts`` with ``optimizer`` (and ``loss_fn`` instead of the
    task's), sharded over the mesh when there is one."""
    p, loss_fn = perf(cfg), loss_fn or parts.task.loss_fn
    if parts.federated is not None:
        from dpjax.federated.rounds import make_fedavg_step  # noqa: PLC0415

        return make_fedavg_step(loss_fn, optimizer, parts.federated[1], parts.mechanism,
                                parts.task.x_train, parts.task.y_train)
    if parts.mechanism is not None:
        step_fn = make_step(loss_fn, optimizer, parts.mechanism.clipped,
                            parts.mechanism.privatizer(), microbatch_size=p.microbatch_size,
                            clipping_method=p.clipping)
    else:
        step_fn = make_nonprivate_step(loss_fn, optimizer)
    return distributed.shard_step(step_fn, parts.mesh) if parts.mesh is not None else step_fn


def assemble(cfg: RunConfig, out_dir: Path) -> tuple[Run, TrainState]:
    """The run of ``cfg``: task, mechanism, plan, jitted step, mesh and checkpointer, and a
    fresh state holding the run's secret (a resume replaces it with the checkpoint's)."""
    parts = assemble_parts(cfg)
    task, mechanism, mesh = parts.task, parts.mechanism, parts.mesh
    optimizer = build_optimizer(cfg.optimizer)
    step_fn = step_of(cfg, parts, optimizer)
    # The run's secret: fresh per run (secure) or from train.seed (seeded); one per
    # multi-process run, drawn on process 0. A resume replaces it with the checkpoint's.
    secret = randomness.broadcast_secret(randomness.run_secret(cfg.dp.randomness,
                                                               cfg.train.seed))
    privatizer = mechanism.privatizer() if mechanism is not None else None
    state = init_state(task.params, optimizer, secret=secret, privatizer=privatizer)
    if mesh is not None:
        state = distributed.replicate(state, mesh)
    num_train = len(task.x_train)
    resolved = mechanism.fingerprint() if mechanism is not None else {"num_train": num_train}
    checkpointer = checkpoint.Checkpointer(out_dir / checkpoint.CHECKPOINT_DIR,
                                           checkpoint.fingerprint(cfg, **resolved))
    run = Run(cfg, task, mechanism, plan_run(cfg, parts.steps, mechanism),
              parts.physical_batch_size, step_fn, mesh, checkpointer, parts.federated)
    return run, state
