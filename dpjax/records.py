"""What a logged step writes: public metrics, non-private diagnostics, the progress line.

:class:`StepRecorder` decides, for each step the loop hands it, which of the three
outputs get a record and what goes in it; every field is classified in
:mod:`dpjax.outputs` (the validation split is training data: its metrics are
diagnostics, never metrics).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

import dpjax.distributed as distributed
from dpjax.outputs import JsonLines


class StepRecorder:
    """Writes the records of logged and evaluated steps; keeps the last evaluation."""

    def __init__(self, run, metrics: JsonLines, diagnostics: JsonLines, progress,
                 elapsed: Callable[[], float], last_eval: dict[str, float]):
        self.run, self.metrics, self.diagnostics, self.progress = run, metrics, diagnostics, \
            progress
        self.elapsed, self.last_eval = elapsed, last_eval
        loss_fn = run.task.loss_fn
        self.batch_loss = jax.jit(
            lambda p, b, m: jnp.sum(loss_fn(p, b) * m) / jnp.maximum(jnp.sum(m), 1))

    def step(self, done: int, state, stats, chunks, ledger) -> None:
        run, t, d = self.run, self.run.cfg.train, self.run.cfg.dp
        is_eval = done % t.eval_every == 0 or done == run.plan.to_run
        if not (done % t.log_every == 0 or is_eval):
            return
        public_eval = t.eval_split == "test"
        record: dict[str, Any] = {"step": done}
        if run.mechanism is not None and (d.accountant == "rdp" or is_eval):  # PLD: slow
            record["epsilon"] = ledger.epsilon(d.delta, d.accountant)
        if is_eval:
            params = distributed.local_copy(state.params) if run.mesh else state.params
            self.last_eval = run.task.evaluate(params, *run.task.holdout)
            if public_eval:
                record.update(test_accuracy=self.last_eval["accuracy"],
                              test_loss=self.last_eval["loss"])
                if "bits_per_byte" in self.last_eval:
                    record["test_bits_per_byte"] = self.last_eval["bits_per_byte"]
        self.metrics.write(record)
        # Every process computes the diagnostics (the batch loss is a computation over
        # the global batch, a collective on a multi-process mesh); only the writer
        # (process 0) has a stream. Gating on the stream deadlocked train.distributed.
        if t.nonprivate_diagnostics:
            diag: dict[str, Any] = {
                "step": done, "batch_size": int(stats.batch_size),
                "num_nonfinite": int(stats.num_nonfinite), "wall_time_s": self.elapsed()}
            if run.federated is None:  # a round's users train locally: no one batch loss
                diag["loss"] = float(self.batch_loss(state.params, *chunks[0]))
            if run.mechanism is not None:
                diag.update(clipped_fraction=float(stats.clipped_fraction),
                            mean_grad_norm=float(stats.mean_grad_norm))
            if is_eval and not public_eval:
                diag.update({f"validation_{k}": v for k, v in self.last_eval.items()})
            self.diagnostics.write(diag)
        self.progress.update(done, {k: v for k, v in record.items() if k != "step"})
