"""The training loop: data, model, sampler, DP step, accounting, evaluation, outputs.

``run_training(cfg, out_dir)`` is the whole job behind ``dpjax-train``; it takes
plain dataclasses (``dpjax.config.RunConfig``), no Hydra objects. It writes
``metrics.jsonl`` (one JSON object per logged step), ``summary.json`` and
``diagnostics.nonprivate.jsonl`` into ``out_dir`` (what each field is, and why
it may be published or not: :mod:`dpjax.outputs`), and checkpoints into
``out_dir/checkpoints`` (:mod:`dpjax.checkpoint`); a run started where a
checkpoint exists resumes from it. With more than one device the step is
data-parallel (:mod:`dpjax.distributed`).

The noise and the batches come from the run's secret (:mod:`dpjax.randomness`):
fresh from the operating system in ``dp.randomness=secure`` mode, derived from
``train.seed`` in ``seeded`` mode. The secret is kept in the checkpoint only.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpjax import accounting, checkpoint, distributed, outputs, preemption, randomness, resume
from dpjax.clipping import per_layer_clip_norms
from dpjax.config import ConfigError, RunConfig, check_against_dataset, secagg_mode, validate
from dpjax.models import MODELS, check_no_batch_mixing, get_model
from dpjax.sampling import FixedSizeSampler, PoissonSampler
from dpjax.train import (
    DPStep,
    TrainState,
    cross_entropy_loss,
    init_state,
    make_dp_step,
    make_nonprivate_step,
)

log = logging.getLogger("dpjax")


def build_optimizer(cfg) -> optax.GradientTransformation:
    """SGD, SGD with momentum, or Adam(W); the DP step privatizes what they consume."""
    if cfg.name == "sgd":
        opt = optax.sgd(cfg.learning_rate)
    elif cfg.name == "momentum":
        opt = optax.sgd(cfg.learning_rate, momentum=cfg.momentum, nesterov=cfg.nesterov)
    else:
        opt = optax.adam(cfg.learning_rate, b1=cfg.b1, b2=cfg.b2)
    if cfg.weight_decay:
        # decay acts on the parameters only: post-processing of the private gradient
        opt = optax.chain(optax.add_decayed_weights(cfg.weight_decay), opt)
    return opt


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the run will do, fixed before the first step."""

    num_train: int
    sample_rate: float
    expected_batch_size: float
    steps: int
    noise_multiplier: float | None
    budget_steps: int | None  # steps allowed by dp.max_epsilon, if set


def plan_run(cfg: RunConfig, num_train: int) -> Plan:
    """Sample rate, step count, calibrated sigma and the budget's step limit."""
    check_against_dataset(cfg, num_train)
    t, d = cfg.train, cfg.dp
    q = t.batch_size / num_train
    steps = t.steps if t.steps is not None else math.ceil(t.epochs / q)
    sigma, budget_steps = None, None
    if d.enabled:
        accounting.check_delta(d.delta, num_train)
        n_kw = {"num_examples": num_train} if d.sampling == "fixed_size" else {}
        sigma = d.noise_multiplier
        if d.target_epsilon is not None:
            sigma = accounting.calibrate_noise_multiplier(
                d.target_epsilon, d.delta, q, steps, d.accountant, d.sampling, **n_kw
            )
        if d.max_epsilon is not None:
            budget_steps = accounting.max_steps(
                accounting.Ledger(), sigma, q, d.max_epsilon, d.delta, d.accountant,
                d.sampling, n_kw.get("num_examples"), limit=steps + 1,
            )
    return Plan(num_train, q, float(t.batch_size), steps, sigma, budget_steps)


def make_evaluator(apply_fn, batch_size: int):
    """Accuracy and mean loss over a whole split, in padded batches of one shape."""

    @jax.jit
    def batch_stats(params, x, y, mask):
        logits = apply_fn({"params": params}, x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
        return jnp.sum(correct * mask), jnp.sum(loss * mask)

    def evaluate(params, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        n = len(x)
        b = min(batch_size, n)
        correct = total_loss = 0.0
        for start in range(0, n, b):
            idx = np.arange(start, start + b)
            mask = (idx < n).astype(np.float32)
            idx = np.minimum(idx, n - 1)
            c, lsum = batch_stats(params, x[idx], y[idx], mask)
            correct += float(c)
            total_loss += float(lsum)
        return {"accuracy": correct / n, "loss": total_loss / n}

    return evaluate


class Progress:
    """A one-line progress bar on a terminal; plain log lines otherwise."""

    def __init__(self, total: int, every: int, stream=None):
        self.total, self.every = total, every
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()

    def update(self, step: int, fields: dict[str, Any]) -> None:
        text = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in fields.items())
        if self.tty:
            width = 24
            done = int(width * step / max(self.total, 1))
            bar = "#" * done + "." * (width - done)
            elapsed = time.perf_counter() - self.start
            self.stream.write(f"\r[{bar}] {step}/{self.total} {text} ({elapsed:.0f}s)\x1b[K")
            self.stream.flush()
        elif step % self.every == 0 or step == self.total:
            log.info("step %d/%d %s", step, self.total, text)

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _split_validation(ds, fraction: float, seed: int):
    # train.seed is public: the split is reproducible, and the validation examples get
    # no protection (their metrics go to the non-private diagnostics only).
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0xDA7A,)))
    perm = rng.permutation(len(ds.x_train))
    n_val = max(1, int(round(fraction * len(perm))))
    val, train = perm[:n_val], perm[n_val:]
    return (ds.x_train[train], ds.y_train[train]), (ds.x_train[val], ds.y_train[val])


def load_data(cfg: RunConfig):
    from dpjax.data import load_dataset  # noqa: PLC0415  (keeps `import dpjax` light)

    options = dict(cfg.dataset.options)
    if cfg.dataset.data_dir is not None:
        options["data_dir"] = cfg.dataset.data_dir
    return load_dataset(cfg.dataset.name, **options)


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything the step loop reads; fixed before the first step."""

    cfg: RunConfig
    plan: Plan
    physical_batch_size: int
    step_fn: DPStep
    x_train: np.ndarray
    y_train: np.ndarray
    holdout: tuple[np.ndarray, np.ndarray]  # evaluated during training (test or validation)
    test_split: tuple[np.ndarray, np.ndarray]
    evaluate: Any
    loss_fn: Any
    mesh: Any  # jax.sharding.Mesh, or None on one device (the unsharded path)
    checkpointer: checkpoint.Checkpointer

    def sampler(self, secret: randomness.Secret):
        """The sampler of the configured kind, drawing from ``secret``."""
        d, plan = self.cfg.dp, self.plan
        if d.enabled and d.sampling == "fixed_size":
            return FixedSizeSampler(plan.num_train, self.cfg.train.batch_size, seed=None,
                                    secret=secret)
        return PoissonSampler(plan.num_train, plan.sample_rate, self.physical_batch_size,
                              seed=None, secret=secret)

    def data_fingerprint(self, secret: randomness.Secret) -> str:
        return checkpoint.data_fingerprint(secret, self.x_train, self.y_train)


SEEDED_WARNING = (
    "dp.randomness=seeded: the noise and the batches are a function of train.seed=%d, so "
    "anyone who knows the seed and the other examples can replay this run and remove its "
    "noise; the reported epsilon does not hold against them. Use for experiments only."
)


def run_training(cfg: RunConfig, out_dir: str | Path) -> dict[str, Any]:
    """Trains as configured; writes ``metrics.jsonl`` and ``summary.json``; returns the summary.

    Resumes from the latest checkpoint in ``out_dir/checkpoints`` when there is
    one (bit-exactly: same parameters, optimizer state and epsilon as a run that
    was never interrupted); refuses one it cannot read or that another config
    wrote. Saves a checkpoint every ``train.checkpoint_every`` steps, at the end,
    and on SIGTERM/SIGUSR2, after which it raises :class:`dpjax.preemption.Preempted`.
    """
    from dpjax.data import DATASETS  # noqa: PLC0415

    validate(cfg, datasets=DATASETS, models=MODELS)
    distributed.initialize(cfg.train.distributed)  # before anything touches a device
    out_dir = Path(out_dir)
    writer = jax.process_index() == 0
    if writer:
        out_dir.mkdir(parents=True, exist_ok=True)
    wall_start = time.perf_counter()
    setup, state = _set_up(cfg, out_dir)
    d, plan = cfg.dp, setup.plan

    if d.randomness == "seeded":
        log.warning(SEEDED_WARNING, cfg.train.seed)

    progressed = resume.Progressed(accounting.Ledger())
    restored = setup.checkpointer.restore_latest(state)
    if restored is not None:
        state, progressed = restored.state, resume.Progressed.from_meta(restored.meta)
        resume.check_restored(restored, progressed, d.enabled)
        resume.check_data(restored, setup.data_fingerprint(state.key))
        progressed.resumed_from.append(restored.step)
        log.info("resuming from checkpoint step %d in %s", restored.step,
                 setup.checkpointer.directory)
    fingerprint = setup.data_fingerprint(state.key)  # keyed by the run's secret

    to_run = plan.steps if plan.budget_steps is None else min(plan.steps, plan.budget_steps)
    stopped_reason = "completed" if to_run == plan.steps else "budget"
    progress = Progress(to_run, cfg.train.log_every)
    resumed, step0 = restored is not None, int(state.step)
    metrics = outputs.metrics_writer(
        resume.open_metrics(out_dir / outputs.METRICS, step0, resumed) if writer else None)
    diagnostics = outputs.diagnostics_writer(
        resume.open_metrics(out_dir / outputs.DIAGNOSTICS, step0, resumed)
        if writer and cfg.train.nonprivate_diagnostics else None)
    try:
        with preemption.stop_on_signals() as stop:
            state, progressed = _train_steps(
                setup, state, setup.sampler(state.key), to_run, progressed, metrics,
                diagnostics, progress, stop, wall_start, fingerprint)
    finally:
        metrics.close()
        progress.close()
    summary = _finish(setup, state, progressed, stopped_reason, out_dir, writer, diagnostics)
    diagnostics.close()
    return summary


def _set_up(cfg: RunConfig, out_dir: Path) -> tuple[Setup, TrainState]:
    ds = load_data(cfg)
    (x_train, y_train), holdout = (ds.x_train, ds.y_train), (ds.x_test, ds.y_test)
    if cfg.train.eval_split == "validation":
        (x_train, y_train), holdout = _split_validation(ds, cfg.train.validation_fraction,
                                                        cfg.train.seed)
    plan = plan_run(cfg, len(x_train))
    devices = distributed.select_devices(cfg.train.devices)
    mesh = distributed.make_mesh(devices)
    d = cfg.dp
    parties = d.num_parties if d.enabled and d.aggregation == "secagg" else 1
    if parties > 1 and mesh is not None:
        raise ConfigError(
            f"Expected train.devices=1 with dp.aggregation='secagg' (got {len(devices)} devices): "
            "the simulated SecAgg round runs on one device."
        )
    physical = distributed.physical_batch_size(d.physical_batch_size, plan.num_train,
                                               plan.sample_rate, len(devices), parties)
    if d.enabled and d.sampling == "fixed_size":
        physical = cfg.train.batch_size

    model = get_model(cfg.model.name, ds.num_classes, **cfg.model.options)
    check_no_batch_mixing(model, jnp.asarray(x_train[:2]))  # two rows: the jvp check
    params = model.init(jax.random.PRNGKey(cfg.train.seed), jnp.asarray(x_train[:1]))["params"]
    optimizer = build_optimizer(cfg.optimizer)
    loss_fn = cross_entropy_loss(model.apply)
    if d.enabled:
        step_fn = _dp_step(cfg, loss_fn, optimizer, plan, params, physical)
    else:
        step_fn = make_nonprivate_step(loss_fn, optimizer)
    # The run's secret: fresh per run (secure) or from train.seed (seeded); one per
    # multi-process run, drawn on process 0. A resume replaces it with the checkpoint's.
    secret = randomness.broadcast_secret(randomness.run_secret(d.randomness, cfg.train.seed))
    state = init_state(params, optimizer, secret=secret)
    if mesh is not None:
        step_fn = distributed.shard_step(step_fn, mesh)
        state = distributed.replicate(state, mesh)
    run_fingerprint = checkpoint.fingerprint(
        cfg, noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate,
        num_train=plan.num_train,
    )
    checkpointer = checkpoint.Checkpointer(out_dir / checkpoint.CHECKPOINT_DIR, run_fingerprint)
    setup = Setup(cfg, plan, physical, step_fn, x_train, y_train, holdout, (ds.x_test, ds.y_test),
                  make_evaluator(model.apply, cfg.train.eval_batch_size), loss_fn, mesh,
                  checkpointer)
    return setup, state


def _finish(setup: Setup, state, progressed: resume.Progressed, stopped_reason, out_dir, writer,
            diagnostics: outputs.JsonLines) -> dict[str, Any]:
    cfg, plan, d = setup.cfg, setup.plan, setup.cfg.dp
    test = setup.evaluate(distributed.local_copy(state.params) if setup.mesh else state.params,
                          *setup.test_split)
    eps = progressed.ledger.epsilon(d.delta, d.accountant) if d.enabled else None
    summary = {
        "dataset": cfg.dataset.name,
        "model": cfg.model.name,
        "optimizer": cfg.optimizer.name,
        "learning_rate": cfg.optimizer.learning_rate,
        "dp_enabled": d.enabled,
        "randomness": d.randomness,
        "epsilon": eps,
        "delta": d.delta if d.enabled else None,
        "noise_multiplier": plan.noise_multiplier,
        "target_epsilon": d.target_epsilon if d.enabled else None,
        "max_epsilon": d.max_epsilon if d.enabled else None,
        "l2_clip_norm": d.l2_clip_norm if d.enabled else None,
        "sample_rate": plan.sample_rate,
        "expected_batch_size": plan.expected_batch_size,
        "num_train": plan.num_train,
        "steps": int(state.step),
        "planned_steps": plan.steps,
        "accountant": d.accountant if d.enabled else None,
        "sampling": d.sampling if d.enabled else "poisson",
        "clipping": d.clipping if d.enabled else None,
        "aggregation": d.aggregation,
        "num_parties": d.num_parties if d.aggregation == "secagg" else None,
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "eval_split": cfg.train.eval_split,
        "stopped_reason": stopped_reason,
        "seed": cfg.train.seed,
        "num_devices": 1 if setup.mesh is None else setup.mesh.size,
        "num_processes": jax.process_count(),
        "resumed_from": progressed.resumed_from,
        "status": "completed",
    }
    setup.checkpointer.close()
    final = {"step": int(state.step), "final": True, "num_nonfinite": progressed.num_nonfinite,
             "wall_time_s": progressed.wall_time_s}
    if cfg.train.eval_split == "validation":
        final.update({f"validation_{k}": v for k, v in progressed.last_eval.items()})
    diagnostics.write(final)
    if writer:
        outputs.write_summary(out_dir, summary)
    return summary


def _dp_step(cfg: RunConfig, loss_fn, optimizer, plan: Plan, params, physical: int):
    d = cfg.dp
    clip = d.l2_clip_norm
    if d.per_layer_clipping:
        # one bound per layer, C / sqrt(layers) each: the total sensitivity stays C
        clip = per_layer_clip_norms(params, d.l2_clip_norm, depth=1)
    if d.aggregation == "secagg":
        from dpjax.secagg.training import SecAggSettings, make_secagg_dp_step  # noqa: PLC0415

        settings = SecAggSettings(d.num_parties, d.secagg_threshold, d.secagg_neighbours,
                                  secagg_mode(d), seed=cfg.train.seed)
        return make_secagg_dp_step(
            loss_fn, optimizer, noise_multiplier=plan.noise_multiplier, l2_clip_norm=clip,
            expected_batch_size=plan.expected_batch_size, physical_batch_size=physical,
            settings=settings, microbatch_size=d.microbatch_size, clipping_method=d.clipping,
        )
    return make_dp_step(
        loss_fn, optimizer,
        noise_multiplier=plan.noise_multiplier,
        l2_clip_norm=clip,
        expected_batch_size=plan.expected_batch_size,
        microbatch_size=d.microbatch_size,
        clipping_method=d.clipping,
    )


def _train_steps(setup: Setup, state: TrainState, sampler, to_run: int,
                 progressed: resume.Progressed, metrics: outputs.JsonLines,
                 diagnostics: outputs.JsonLines, progress, stop, wall_start, fingerprint: str):
    cfg, plan = setup.cfg, setup.plan
    d, t = cfg.dp, cfg.train
    n_kw = {"num_examples": plan.num_train} if d.sampling == "fixed_size" else {}
    eval_x, eval_y = setup.holdout
    loss_fn = setup.loss_fn
    batch_loss = jax.jit(lambda p, b, m: jnp.sum(loss_fn(p, b) * m) / jnp.maximum(jnp.sum(m), 1))
    carried = progressed.num_nonfinite
    nonfinite = jnp.zeros((), jnp.int32)  # summed on device: no host sync per step
    ledger, last_eval = progressed.ledger, progressed.last_eval
    public_eval = t.eval_split == "test"  # the validation split is private training data

    def elapsed() -> float:
        return progressed.wall_time_s + time.perf_counter() - wall_start

    def snapshot() -> resume.Progressed:
        return dataclasses.replace(
            progressed, ledger=ledger, num_nonfinite=carried + int(nonfinite),
            last_eval=last_eval, wall_time_s=elapsed())

    def save() -> int:
        return setup.checkpointer.save(state, {**snapshot().to_meta(),
                                               checkpoint.DATA_FINGERPRINT: fingerprint})

    last_saved = int(state.step) if progressed.resumed_from else None
    for step in range(int(state.step), to_run):
        chunks = distributed.place_chunks(sampler.sample(step), setup.x_train,
                                          setup.y_train, setup.mesh)
        state, stats = setup.step_fn.run(state, chunks)
        nonfinite = nonfinite + stats.num_nonfinite
        if d.enabled:
            ledger = ledger.record(plan.noise_multiplier, plan.sample_rate, 1, d.sampling,
                                   n_kw.get("num_examples"))
        done = step + 1
        if done % t.log_every == 0 or done == to_run or done % t.eval_every == 0:
            record: dict[str, Any] = {"step": done}
            is_eval = done % t.eval_every == 0 or done == to_run
            if d.enabled and (d.accountant == "rdp" or is_eval):  # PLD is slow: eval steps only
                record["epsilon"] = ledger.epsilon(d.delta, d.accountant)
            if is_eval:
                params = distributed.local_copy(state.params) if setup.mesh else state.params
                last_eval = setup.evaluate(params, eval_x, eval_y)
                if public_eval:
                    record["test_accuracy"] = last_eval["accuracy"]
                    record["test_loss"] = last_eval["loss"]
            metrics.write(record)
            if diagnostics.stream is not None:
                diag: dict[str, Any] = {
                    "step": done,
                    "loss": float(batch_loss(state.params, *chunks[0])),
                    "batch_size": int(stats.batch_size),
                    "num_nonfinite": int(stats.num_nonfinite),
                    "wall_time_s": elapsed(),
                }
                if d.enabled:
                    diag["clipped_fraction"] = float(stats.clipped_fraction)
                    diag["mean_grad_norm"] = float(stats.mean_grad_norm)
                if is_eval and not public_eval:
                    diag["validation_accuracy"] = last_eval["accuracy"]
                    diag["validation_loss"] = last_eval["loss"]
                diagnostics.write(diag)
            progress.update(done, {k: v for k, v in record.items() if k != "step"})
        stopping = stop.requested()
        periodic = t.checkpoint_every is not None and done % t.checkpoint_every == 0
        if stopping or periodic or done == to_run:
            last_saved = save()
        if stopping:
            stop.forward()
            raise preemption.Preempted(stop.signum, done, str(setup.checkpointer.directory))
    if last_saved != int(state.step):  # e.g. a run with nothing left to do after a resume
        save()
    return state, snapshot()
