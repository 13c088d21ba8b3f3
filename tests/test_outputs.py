"""What a run writes (privacy rules 2 and 7): every field is classified, the non-private
ones live in their own file only, and the run's secret appears in no output.

One real ``dpjax-train`` run (secure randomness, evaluation on a validation split, so
that private validation metrics exist) is inspected file by file.
"""

import base64
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from dpjax import outputs

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent

EXPECTED_SUMMARY = {
    "dataset", "model", "optimizer", "learning_rate", "dp_enabled", "randomness", "epsilon",
    "delta", "noise_multiplier", "target_epsilon", "max_epsilon", "l2_clip_norm", "sample_rate",
    "expected_batch_size", "num_train", "steps", "planned_steps", "accountant", "sampling",
    "clipping", "aggregation", "num_parties", "test_accuracy", "test_loss", "eval_split",
    "stopped_reason", "seed", "num_devices", "num_processes", "resumed_from", "status",
    # distributed DP and user-level DP (issue 13): public choices and their parameters
    "noise", "secagg_bits", "unit", "num_users", "distributed_dp",
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("secure") / "run"
    cmd = [str(BIN / "dpjax-train"), "dataset=digits", "model=mlp", "model.options.hidden=[16]",
           "train.batch_size=64", "train.steps=6", "train.eval_every=3", "train.log_every=2",
           "train.eval_split=validation", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=run_dir.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir / "stdout.txt").write_text(proc.stdout + proc.stderr)  # the console, grepped too
    rep = subprocess.run([str(BIN / "dpjax-report"), str(run_dir)], capture_output=True,
                         text=True, timeout=120)
    assert rep.returncode == 0, rep.stderr
    return run_dir


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_secret_appears_in_no_file_outside_the_checkpoint(run):
    manager = ocp.CheckpointManager((run / "checkpoints").absolute())
    state = manager.restore(manager.latest_step(),
                            args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
    manager.close()
    words = np.asarray(state["key"]["words"], np.uint32)
    raw = words.astype("<u4").tobytes()
    needles = [raw, raw.hex().encode(), raw.hex().upper().encode(), base64.b64encode(raw),
               words.astype(">u4").tobytes().hex().encode()]
    needles += [str(int(w)).encode() for w in words if int(w) >= 10**6]
    needles += [str(int(w)).encode() for w in words.view(np.int32) if abs(int(w)) >= 10**6]
    files = [p for p in run.rglob("*") if p.is_file() and "checkpoints" not in p.parts]
    assert {".hydra", "summary.json", "metrics.jsonl"} <= {p.parts[-2] if p.parts[-2] == ".hydra"
                                                           else p.name for p in files}
    for path in files:
        content = path.read_bytes()
        for needle in needles:
            assert needle not in content, (path, needle[:12])


def test_every_field_of_every_output_is_classified(run):
    summary = json.loads((run / outputs.SUMMARY).read_text())
    assert set(summary) == EXPECTED_SUMMARY  # a new key must be added here and classified
    assert all(outputs.SUMMARY_FIELDS[k][0] in (outputs.PUBLIC, outputs.COVERED)
               for k in summary)
    metrics = _records(run / outputs.METRICS)
    assert [r["step"] for r in metrics] == [2, 3, 4, 6]
    for record in metrics:
        assert set(record) <= set(outputs.METRICS_FIELDS)
        assert not any(k.startswith("validation") for k in record)  # training data: private
    diagnostics = _records(run / outputs.DIAGNOSTICS)
    for record in diagnostics:
        assert set(record) <= set(outputs.DIAGNOSTIC_FIELDS)
    assert {"loss", "batch_size", "validation_accuracy"} <= set().union(*diagnostics)
    assert diagnostics[-1]["final"] and "wall_time_s" in diagnostics[-1]
    for name in ("num_nonfinite", "wall_time_s", "final_eval", "loss", "batch_size"):
        assert name not in summary


def test_the_report_reads_no_non_private_field(run):
    with open(run / "results.csv") as f:
        columns = next(csv.reader(f))
    assert not set(columns) & (set(outputs.DIAGNOSTIC_FIELDS) - {"step"})
    assert "randomness" in columns


def test_the_console_shows_no_unlabelled_non_private_value(run):
    console = (run / "stdout.txt").read_text()
    assert "loss" not in console.lower().replace("test_loss", "")
    assert "(wall time, non-private)" in console


def test_the_readme_lists_every_non_private_field():
    readme = (ROOT / "README.md").read_text()
    for name in outputs.DIAGNOSTIC_FIELDS:
        assert f"`{name}`" in readme, name


def test_writers_refuse_a_field_that_is_not_classified(tmp_path):
    with pytest.raises(outputs.UnclassifiedFieldError, match="batch_loss"):
        outputs.write_summary(tmp_path, {"dataset": "x", "batch_loss": 0.3})
    with pytest.raises(outputs.UnclassifiedFieldError, match="realized_batch"):
        outputs.metrics_writer(None).write({"step": 1, "realized_batch": 12})
    assert not (tmp_path / outputs.SUMMARY).exists()
