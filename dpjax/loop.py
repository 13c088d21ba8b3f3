"""The training loop: orchestration only.

``run_training(cfg, out_dir)`` is the whole job behind ``dpjax-train``; it takes
plain dataclasses (``dpjax.config.RunConfig``), no Hydra objects:

    task      = build_task(cfg)                  data, model, loss, evaluator (dpjax.task)
    mechanism = Mechanism.from_config(cfg.dp)    sampler, clipped sum, privatizer, accounting
    step      = make_step(mechanism parts)       one jitted step type (dpjax.train)
    state     = restore the checkpoint, or init_state(params, secret=run secret)
    for t:  rows = sampler(secret).sample(t); state = step.run(state, rows)
            ledger = mechanism.record(ledger); write metrics / diagnostics; checkpoint
    summary.json                                  (dpjax.outputs: every field classified)

The noise and the batches come from the run's secret (:mod:`dpjax.randomness`):
fresh from the operating system in ``dp.randomness=secure`` mode, derived from
``train.seed`` in ``seeded`` mode; it is kept in the checkpoint only. With more
than one device the step is data-parallel (:mod:`dpjax.distributed`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

import dpjax.accounting as accounting
import dpjax.checkpoint as checkpoint
import dpjax.distributed as distributed
import dpjax.lm_task as lm_task
import dpjax.outputs as outputs
import dpjax.preemption as preemption
import dpjax.resume as resume
from dpjax.assembly import Run, assemble
from dpjax.config import RunConfig, perf, validate
from dpjax.models import MODELS
from dpjax.progress import Progress
from dpjax.records import StepRecorder
from dpjax.train import TrainState

log = logging.getLogger("dpjax")

SEEDED_WARNING = (
    "dp.randomness=seeded: the noise and the batches are a function of train.seed=%d, so "
    "anyone who knows the seed and the other examples can replay this run and remove its "
    "noise; the reported epsilon does not hold against them. Use for experiments only."
)


def run_training(cfg: RunConfig, out_dir: str | Path) -> dict[str, Any]:
    """Trains as configured; writes the outputs (:mod:`dpjax.outputs`); returns the summary.

    Resumes from the latest checkpoint in ``out_dir/checkpoints`` when there is
    one (bit-exactly: same parameters, optimizer state and epsilon as a run that
    was never interrupted); refuses one it cannot read or that another config (or
    other data) wrote. Saves a checkpoint every ``train.checkpoint_every`` steps, at
    the end, and on SIGTERM/SIGUSR2, after which it raises
    :class:`dpjax.preemption.Preempted`.
    """
    from dpjax.data import DATASETS  # noqa: PLC0415

    validate(cfg, datasets=DATASETS, models=MODELS)
    distributed.initialize(cfg.train.distributed)  # before anything touches a device
    out_dir = Path(out_dir)
    writer = jax.process_index() == 0
    if writer:
        out_dir.mkdir(parents=True, exist_ok=True)
    wall_start = time.perf_counter()
    run, state = assemble(cfg, out_dir)
    if cfg.dp.randomness == "seeded":
        log.warning(SEEDED_WARNING, cfg.train.seed)

    progressed = resume.Progressed(accounting.Ledger())
    restored = run.checkpointer.restore_latest(state)
    if restored is not None:
        state, progressed = restored.state, resume.Progressed.from_meta(restored.meta)
        resume.check_restored(restored, progressed, cfg.dp.enabled)
        resume.check_data(restored, run.data_fingerprint(state.key))
        if run.task.lm is not None:
            run.task.lm.check_resumed(restored.meta)
        progressed.resumed_from.append(restored.step)
        log.info("resuming from checkpoint step %d in %s", restored.step,
                 run.checkpointer.directory)

    step0 = int(state.step)
    metrics = outputs.metrics_writer(
        resume.open_metrics(out_dir / outputs.METRICS, step0, restored is not None)
        if writer else None)
    diagnostics = outputs.diagnostics_writer(
        resume.open_metrics(out_dir / outputs.DIAGNOSTICS, step0, restored is not None)
        if writer and cfg.train.nonprivate_diagnostics else None)
    progress = Progress(run.plan.to_run, cfg.train.log_every)
    with contextlib.closing(diagnostics):  # also when a step raises
        try:
            with preemption.stop_on_signals() as stop:
                state, progressed = _train_steps(run, state, progressed, metrics, diagnostics,
                                                 progress, stop, wall_start)
        finally:
            metrics.close()
            progress.close()
        return _finish(run, state, progressed, out_dir, writer, diagnostics)


def _finish(run: Run, state, progressed: resume.Progressed, out_dir, writer,
            diagnostics: outputs.JsonLines) -> dict[str, Any]:
    cfg = run.cfg
    params = distributed.local_copy(state.params) if run.mesh else state.params
    summary = outputs.build_summary(
        cfg, mechanism=run.mechanism, plan=run.plan, num_train=len(run.task.x_train),
        steps=int(state.step), ledger=progressed.ledger, resumed_from=progressed.resumed_from,
        test=run.task.evaluate(params, *run.task.test_split), clipping=perf(cfg).clipping,
        num_devices=1 if run.mesh is None else run.mesh.size,
        num_processes=jax.process_count(), task_fields=lm_task.summary_fields(run.task.lm))
    run.checkpointer.close()
    final = {"step": int(state.step), "final": True, "num_nonfinite": progressed.num_nonfinite,
             "wall_time_s": progressed.wall_time_s}
    if cfg.train.eval_split == "validation":
        final.update({f"validation_{k}": v for k, v in progressed.last_eval.items()})
    diagnostics.write(final)
    if writer:
        outputs.write_summary(out_dir, summary)
    return summary


def _train_steps(run: Run, state: TrainState, progressed: resume.Progressed,
                 metrics: outputs.JsonLines, diagnostics: outputs.JsonLines, progress, stop,
                 wall_start):
    t = run.cfg.train
    sampler, fingerprint = run.sampler(state.key), run.data_fingerprint(state.key)
    carried = progressed.num_nonfinite
    nonfinite = jnp.zeros((), jnp.int32)  # summed on device: no host sync per step
    ledger = progressed.ledger

    def elapsed() -> float:
        return progressed.wall_time_s + time.perf_counter() - wall_start

    recorder = StepRecorder(run, metrics, diagnostics, progress, elapsed, progressed.last_eval)

    def snapshot() -> resume.Progressed:
        return dataclasses.replace(
            progressed, ledger=ledger, num_nonfinite=carried + int(nonfinite),
            last_eval=recorder.last_eval, wall_time_s=elapsed())

    lm_meta = {} if run.task.lm is None else run.task.lm.checkpoint_meta()

    def save() -> int:
        return run.checkpointer.save(state, {**snapshot().to_meta(), **lm_meta,
                                             checkpoint.DATA_FINGERPRINT: fingerprint})

    last_saved = int(state.step) if progressed.resumed_from else None
    for step in range(int(state.step), run.plan.to_run):
        chunks = run.batches(sampler, step)
        state, stats = run.step_fn.run(state, chunks)
        nonfinite = nonfinite + stats.num_nonfinite
        if run.mechanism is not None:
            ledger = run.mechanism.record(ledger)
        done = step + 1
        recorder.step(done, state, stats, chunks, ledger)
        stopping = stop.requested()
        periodic = t.checkpoint_every is not None and done % t.checkpoint_every == 0
        if stopping or periodic or done == run.plan.to_run:
            last_saved = save()
        if stopping:
            stop.forward()
            raise preemption.Preempted(stop.signum, done, str(run.checkpointer.directory))
    if last_saved != int(state.step):  # e.g. a run with nothing left to do after a resume
        save()
    return state, snapshot()
