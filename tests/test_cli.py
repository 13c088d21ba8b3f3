"""The real `dpjax-train` / `dpjax-report` commands on the embedded digits data."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dpjax import accounting

BIN = Path(sys.executable).parent
QUICK = ["dataset=digits", "model=mlp", "model.options.hidden=[32]", "train.batch_size=64",
         "train.eval_every=5", "train.log_every=5"]


def _train(tmp_path, *overrides, multirun=False, check=True, run_dir=None):
    cmd = [str(BIN / "dpjax-train"), *(["-m"] if multirun else []), *QUICK, *overrides,
           f"hydra.run.dir={run_dir or tmp_path / 'run'}", f"hydra.sweep.dir={tmp_path}/sweep"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_a_short_run_reports_the_epsilon_of_its_own_fields(tmp_path):
    proc = _train(tmp_path, "train.steps=12")
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    for key in ("dataset", "model", "epsilon", "delta", "noise_multiplier", "l2_clip_norm",
                "sample_rate", "expected_batch_size", "steps", "accountant", "test_accuracy",
                "stopped_reason"):
        assert key in s, key
    recomputed = accounting.epsilon(s["noise_multiplier"], s["sample_rate"], s["steps"],
                                    s["delta"], s["accountant"], s["sampling"])
    assert s["epsilon"] == pytest.approx(recomputed, rel=1e-12)
    assert s["steps"] == 12 and s["stopped_reason"] == "completed"
    assert s["expected_batch_size"] == pytest.approx(s["sample_rate"] * s["num_train"])
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [5, 10, 12]
    assert records[-1]["epsilon"] == pytest.approx(s["epsilon"], rel=1e-12)
    assert "test accuracy" in proc.stdout and "epsilon" in proc.stdout


def test_the_budget_stops_training_before_it_is_exceeded(tmp_path):
    _train(tmp_path, "train.steps=500", "dp.max_epsilon=1.5", "dp.noise_multiplier=1.2")
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["stopped_reason"] == "budget"
    assert 0 < s["steps"] < 500
    assert s["epsilon"] <= 1.5
    one_more = accounting.epsilon(s["noise_multiplier"], s["sample_rate"], s["steps"] + 1,
                                  s["delta"])
    assert one_more > 1.5


def test_target_epsilon_calibrates_sigma(tmp_path):
    _train(tmp_path, "train.steps=20", "dp.noise_multiplier=null", "dp.target_epsilon=2.0")
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0.99 * 2.0 <= s["epsilon"] <= 2.0


def test_a_bad_value_fails_before_training_and_names_the_key(tmp_path):
    proc = _train(tmp_path, "train.steps=5", "dp.l2_clip_norm=-1", check=False)
    assert proc.returncode != 0
    assert "dp.l2_clip_norm=-1.0" in proc.stderr
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["status"] == "failed" and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_missing_data_file_names_the_path(tmp_path):
    proc = _train(tmp_path, "dataset=mnist", f"dataset.data_dir={tmp_path}/nowhere",
                  "model=mlp", check=False)
    assert proc.returncode != 0
    assert f"{tmp_path}/nowhere" in proc.stderr


@pytest.mark.slow
def test_a_sweep_with_a_failed_run_and_the_report(tmp_path):
    proc = _train(tmp_path, "train.steps=8", "dp.noise_multiplier=0.8,-1,3.0", multirun=True,
                  check=False)
    sweep = tmp_path / "sweep"
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1", "2"], proc.stderr
    assert json.loads((sweep / "2" / "summary.json").read_text())["status"] == "completed"
    _train(tmp_path, "train.steps=8", "dp=none", run_dir=sweep / "baseline")
    rep = subprocess.run([str(BIN / "dpjax-report"), str(sweep)], capture_output=True,
                         text=True, timeout=120)
    assert rep.returncode == 0, rep.stderr
    for name in ("results.csv", "results.md", "privacy_utility.png"):
        assert (sweep / name).stat().st_size > 0
    md = (sweep / "results.md").read_text()
    assert "non-private" in md and "Failed runs" in md and "dp.noise_multiplier=-1.0" in md
    assert "3 completed, 1 failed" in rep.stdout
    csv_rows = (sweep / "results.csv").read_text().strip().splitlines()
    assert len(csv_rows) == 1 + 4


def test_secagg_aggregation_matches_the_plain_sum_run(tmp_path):
    # seeded: both runs draw the same batches and noise, so they differ by SecAgg alone
    common = ["train.steps=5", "optimizer=sgd", "train.eval_every=5", "dp.randomness=seeded"]
    _train(tmp_path, *common, "dp.aggregation=secagg", "dp.num_parties=4",
           "dp.physical_batch_size=96", run_dir=tmp_path / "secagg")
    _train(tmp_path, *common, "dp.physical_batch_size=96", run_dir=tmp_path / "plain96")
    plain = json.loads((tmp_path / "plain96" / "summary.json").read_text())
    sec = json.loads((tmp_path / "secagg" / "summary.json").read_text())
    assert sec["epsilon"] == plain["epsilon"]
    # same noise key (std larger by a factor 1 + sqrt(d)/(scale C), for the rounding),
    # sums within n/scale ~ 1e-8 per coordinate: the models agree closely
    assert sec["test_loss"] == pytest.approx(plain["test_loss"], rel=1e-4)
    assert sec["test_accuracy"] == pytest.approx(plain["test_accuracy"], abs=1 / 360)
