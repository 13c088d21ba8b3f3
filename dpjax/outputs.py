"""What a run writes, and the privacy class of every field.

A run's output directory holds ``summary.json``, ``metrics.jsonl`` and (unless
``train.nonprivate_diagnostics=false``) ``diagnostics.nonprivate.jsonl``, plus
the checkpoints (private: they hold the run's secret and the parameters).

Every field written to the first two is either

- ``public``: a function of the configuration and of the training-set size N
  (which dpjax, like every DP-SGD library, treats as public), or of events
  outside the data (a preemption), or an evaluation on the public test split
  of a model that is itself covered (the test split is assumed public: see
  ``TEST_SPLIT`` for the text corpora where it is not); or
- ``covered``: released by the mechanism, so covered by the reported
  (epsilon, delta) (e.g. epsilon so far, which is a function of the steps
  taken, and the test metrics of the privately trained model).

Values computed from private data without noise (batch loss, realized batch
size, gradient-norm statistics, non-finite row counts, validation metrics on a
split of the training data, wall time, which depends on realized batch sizes
through the number of chunks) are ``nonprivate`` and go only to
``diagnostics.nonprivate.jsonl``, never to the summary or the report. The
writers refuse a field that is not classified here, so a new one cannot slip
into a public file unreviewed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TextIO

SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
DIAGNOSTICS = "diagnostics.nonprivate.jsonl"

PUBLIC, COVERED, NONPRIVATE = "public", "covered", "nonprivate"
TEST_SPLIT = ("the private model evaluated on the test split, which dpjax treats as public: "
              "the image datasets' test sets and pydoc_text's are; for private_text and the "
              "user's text given as one file it is held-out records of that corpus (not "
              "trained on, so outside epsilon's claim, and released without noise: publish "
              "only if they may be public, or give a directory with a public test.txt)")

SUMMARY_FIELDS: dict[str, tuple[str, str]] = {
    "dataset": (PUBLIC, "configuration"),
    "model": (PUBLIC, "configuration"),
    "optimizer": (PUBLIC, "configuration"),
    "learning_rate": (PUBLIC, "configuration"),
    "dp_enabled": (PUBLIC, "configuration"),
    "randomness": (PUBLIC, "configuration: secure or seeded (replayable from the seed)"),
    "epsilon": (PUBLIC, "accountant: function of the configuration and the steps taken"),
    "delta": (PUBLIC, "configuration"),
    "noise_multiplier": (PUBLIC, "configuration, or calibrated from it and N"),
    "target_epsilon": (PUBLIC, "configuration"),
    "max_epsilon": (PUBLIC, "configuration"),
    "l2_clip_norm": (PUBLIC, "configuration"),
    "sample_rate": (PUBLIC, "configuration and N"),
    "expected_batch_size": (PUBLIC, "configuration"),
    "num_train": (PUBLIC, "N, public by convention"),
    "steps": (PUBLIC, "planned steps, the budget's limit (both from configuration and N), "
                      "or a preemption"),
    "planned_steps": (PUBLIC, "configuration and N"),
    "accountant": (PUBLIC, "configuration"),
    "sampling": (PUBLIC, "configuration"),
    "clipping": (PUBLIC, "configuration"),
    "aggregation": (PUBLIC, "configuration"),
    "num_parties": (PUBLIC, "configuration"),
    "noise": (PUBLIC, "configuration: gaussian (central) or the parties' discrete noise"),
    "secagg_bits": (PUBLIC, "configuration"),
    "unit": (PUBLIC, "configuration: the unit of privacy (example or user)"),
    "num_users": (PUBLIC, "the number of users, public like N (dp.unit=user)"),
    "distributed_dp": (PUBLIC, "gamma, per-party noise and sensitivities, chosen from the "
                               "configuration, N and the parameter count"),
    "test_accuracy": (COVERED, TEST_SPLIT),
    "test_loss": (COVERED, TEST_SPLIT),
    "eval_split": (PUBLIC, "configuration"),
    "stopped_reason": (PUBLIC, "completed or budget: from configuration and N"),
    "seed": (PUBLIC, "configuration (initialization, validation split; and, in seeded "
                     "mode, everything)"),
    "num_devices": (PUBLIC, "configuration and hardware"),
    "num_processes": (PUBLIC, "configuration and hardware"),
    "resumed_from": (PUBLIC, "steps at which the run was restarted: external events"),
    "status": (PUBLIC, "completed"),
    # language models (dpjax.lm_task); their test_accuracy is next-token accuracy
    "test_bits_per_byte": (COVERED, TEST_SPLIT),
    "corpus_hash": (PUBLIC, "SHA-256 of a corpus made from public inputs only (pydoc of the "
                            "running Python; the seeded synthetic corpus); null for the "
                            "user's text, whose hash would confirm guesses of it"),
    "generator_version": (PUBLIC, "the Python or faker version that produced the corpus"),
    "context_length": (PUBLIC, "configuration"),
    "trainable": (PUBLIC, "configuration: full, lora or last_layer"),
    "num_trainable_params": (PUBLIC, "configuration: the leaves clipped and noised (the "
                                     "noise's dimension)"),
    "init_from": (PUBLIC, "configuration: the run whose parameters started this one"),
    "init_from_dataset": (PUBLIC, "the source run's configuration"),
    "init_from_dp_enabled": (PUBLIC, "the source run's configuration"),
    "init_from_epsilon": (PUBLIC, "the source run's accountant, for its own dataset"),
    "init_from_randomness": (PUBLIC, "the source run's configuration: seeded means its "
                                     "epsilon does not hold against anyone with its seed"),
    "init_from_ancestors": (PUBLIC, "the source's own chain of sources: their paths, "
                                    "datasets, whether with DP and their epsilons "
                                    "(configuration and accountants)"),
}

METRICS_FIELDS: dict[str, tuple[str, str]] = {
    "step": (PUBLIC, "the step counter"),
    "epsilon": (PUBLIC, "accountant: function of the configuration and the steps taken"),
    "test_accuracy": (COVERED, TEST_SPLIT),
    "test_loss": (COVERED, TEST_SPLIT),
    "test_bits_per_byte": (COVERED, TEST_SPLIT),
}

DIAGNOSTIC_FIELDS: dict[str, str] = {
    "step": "the step counter (public)",
    "final": "true on the last record, which holds run totals",
    "loss": "mean training loss of the step's first chunk, without noise",
    "batch_size": "realized (Poisson) batch size of the step",
    "num_nonfinite": "rows dropped because their gradient was not finite (per step; run "
                     "total on the final record)",
    "clipped_fraction": "fraction of the step's rows whose gradient norm exceeded the bound",
    "mean_grad_norm": "mean per-example gradient norm of the step, before clipping",
    "validation_accuracy": "accuracy on the validation split, part of the training data",
    "validation_loss": "loss on the validation split, part of the training data",
    "validation_bits_per_byte": "bits per byte on the validation split (language models)",
    "wall_time_s": "seconds since the run started (resumed runs included); depends on "
                   "realized batch sizes through the number of chunks per step",
}


class UnclassifiedFieldError(KeyError):
    """A field was about to be written to an output without a privacy class."""


def _check(record: dict[str, Any], fields, where: str) -> None:
    unknown = sorted(set(record) - set(fields))
    if unknown:
        raise UnclassifiedFieldError(
            f"Expected only classified fields in {where}; {unknown} are not in "
            f"dpjax.outputs (classify them as public, covered or non-private first)."
        )


def write_summary(out_dir: Path, summary: dict[str, Any]) -> None:
    """``summary.json``: public and covered fields only."""
    _check(summary, SUMMARY_FIELDS, SUMMARY)
    (Path(out_dir) / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")


class JsonLines:
    """An append-only JSON-lines file whose records may hold only the given fields."""

    def __init__(self, stream: TextIO | None, fields, name: str):
        self.stream, self.fields, self.name = stream, fields, name

    def write(self, record: dict[str, Any]) -> None:
        _check(record, self.fields, self.name)
        if self.stream is not None:
            self.stream.write(json.dumps(record) + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()


def metrics_writer(stream: TextIO | None) -> JsonLines:
    return JsonLines(stream, METRICS_FIELDS, METRICS)


def diagnostics_writer(stream: TextIO | None) -> JsonLines:
    return JsonLines(stream, DIAGNOSTIC_FIELDS, DIAGNOSTICS)


def build_summary(cfg, *, mechanism, plan, num_train: int, steps: int, ledger,
                  resumed_from: list[int], test: dict[str, float], clipping: str,
                  num_devices: int, num_processes: int,
                  task_fields: dict[str, Any] | None = None) -> dict[str, Any]:
    """``summary.json``'s fields (each classified in :data:`SUMMARY_FIELDS`); ``task_fields``
    are the task's own (a language model's corpus and source, :mod:`dpjax.lm_task`)."""
    d, dp = cfg.dp, mechanism is not None
    lm = {"test_bits_per_byte": test["bits_per_byte"]} if "bits_per_byte" in test else {}
    return {
        "dataset": cfg.dataset.name,
        "model": cfg.model.name,
        "optimizer": cfg.optimizer.name,
        "learning_rate": cfg.optimizer.learning_rate,
        "dp_enabled": d.enabled,
        "randomness": d.randomness,
        "epsilon": ledger.epsilon(d.delta, d.accountant) if dp else None,
        "delta": d.delta if dp else None,
        "noise_multiplier": mechanism.noise_multiplier if dp else None,
        "target_epsilon": d.target_epsilon if dp else None,
        "max_epsilon": d.max_epsilon if dp else None,
        "l2_clip_norm": d.l2_clip_norm if dp else None,
        "sample_rate": mechanism.sample_rate if dp else cfg.train.batch_size / num_train,
        "expected_batch_size": (mechanism.expected_batch_size if dp
                                else float(cfg.train.batch_size)),
        "num_train": num_train,
        "steps": steps,
        "planned_steps": plan.steps,
        "accountant": d.accountant if dp else None,
        "sampling": d.sampling if dp else "poisson",
        "clipping": clipping if dp else None,
        "aggregation": d.aggregation,
        "num_parties": d.num_parties if d.aggregation == "secagg" else None,
        "noise": d.noise if dp else None,
        "secagg_bits": d.secagg_bits if d.aggregation == "secagg" else None,
        "unit": str(mechanism.unit) if dp else None,
        "num_users": mechanism.num_examples if dp and str(mechanism.unit) == "user" else None,
        "distributed_dp": (mechanism.clipped.aggregation.params.summary()
                           if dp and mechanism.distributed else None),
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "eval_split": cfg.train.eval_split,
        "stopped_reason": plan.stopped_reason,
        "seed": cfg.train.seed,
        "num_devices": num_devices,
        "num_processes": num_processes,
        "resumed_from": resumed_from,
        **lm,
        **(task_fields or {}),
        "status": "completed",
    }
