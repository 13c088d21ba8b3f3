"""Kill-and-resume through the real command line: the resumed run is bit-exact.

Each run is a subprocess of ``python -m dpjax.cli`` on the worktree's code (the
digits MLP, 120 steps, a checkpoint every 10). A run is interrupted once its
checkpoint at step 20 exists, while at least 100 steps are left, and started
again in the same directory. The subprocesses share a persistent compilation
cache (JAX_COMPILATION_CACHE_DIR), so only the first one compiles.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dpjax import accounting

ROOT = Path(__file__).resolve().parent.parent
STEPS = 120
# Seeded randomness: the straight and the interrupted run must draw the same noise.
CONFIG = ["dataset=digits", "model=mlp", "model.options.hidden=[32]", "train.batch_size=64",
          f"train.steps={STEPS}", "train.eval_every=40", "train.log_every=10",
          "train.checkpoint_every=10", "train.seed=3", "dp.randomness=seeded"]


ENV: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def _subprocess_env(tmp_path_factory):
    path = os.environ.get("PYTHONPATH")
    ENV.update({
        **os.environ,
        "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else ""),
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    })
    yield
    ENV.clear()


def _env():
    return ENV


def _command(run_dir, *overrides):
    return [sys.executable, "-m", "dpjax.cli", *CONFIG, *overrides, f"hydra.run.dir={run_dir}"]


def _run(run_dir, *overrides, check=True):
    proc = subprocess.run(_command(run_dir, *overrides), capture_output=True, text=True,
                          timeout=600, cwd=run_dir.parent, env=_env())
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _interrupt(run_dir, sig, at_step=20):
    """Starts a run, sends ``sig`` once the checkpoint of ``at_step`` is complete."""
    proc = subprocess.Popen(_command(run_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=run_dir.parent, env=_env())
    marker = run_dir / "checkpoints" / str(at_step)  # orbax renames a finished save to this
    deadline = time.monotonic() + 240
    while not marker.is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.is_dir(), "the checkpoint to interrupt after never appeared"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=240)
    return proc.returncode, out, err


def _final_checkpoint(run_dir):
    """Every leaf of the latest saved TrainState (as numpy) and its metadata."""
    manager = ocp.CheckpointManager(run_dir.absolute() / "checkpoints")
    step = manager.latest_step()
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    manager.close()
    leaves = jax.tree_util.tree_leaves_with_path(restored.state)
    return step, {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}, restored.meta


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The same config, never interrupted."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    _run(run_dir)
    return run_dir


def _assert_same_run(resumed, straight):
    step_a, leaves_a, meta_a = _final_checkpoint(straight)
    step_b, leaves_b, meta_b = _final_checkpoint(resumed)
    assert step_a == step_b == STEPS
    assert leaves_a.keys() == leaves_b.keys()
    assert any("opt_state" in k for k in leaves_a)  # Adam's moments and count are compared too
    for key in leaves_a:
        np.testing.assert_array_equal(leaves_a[key], leaves_b[key], err_msg=key)
    assert meta_a["ledger"] == meta_b["ledger"]
    sa = json.loads((straight / "summary.json").read_text())
    sb = json.loads((resumed / "summary.json").read_text())
    assert sb["epsilon"] == sa["epsilon"]  # bitwise: the same ledger of 120 steps
    assert sb["epsilon"] == accounting.epsilon(sb["noise_multiplier"], sb["sample_rate"], STEPS,
                                               sb["delta"])
    assert sb["steps"] == STEPS and sb["test_accuracy"] == sa["test_accuracy"]
    assert sa["resumed_from"] == [] and len(sb["resumed_from"]) == 1
    assert 20 <= sb["resumed_from"][0] < STEPS
    # every step logged once, with the same numbers as the uninterrupted run
    assert (resumed / "metrics.jsonl").read_text() == (straight / "metrics.jsonl").read_text()
    diag = [json.loads(line) for line in
            (resumed / "diagnostics.nonprivate.jsonl").read_text().splitlines()]
    assert [d["step"] for d in diag if not d.get("final")] == list(range(10, STEPS + 1, 10))
    assert sum(bool(d.get("final")) for d in diag) == 1
    return sb


def test_sigkill_after_a_checkpoint_then_restart_is_bit_exact(tmp_path, straight):
    run_dir = tmp_path / "run"
    code, _, _ = _interrupt(run_dir, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert not (run_dir / "summary.json").exists()
    _run(run_dir)
    _assert_same_run(run_dir, straight)


def test_sigterm_saves_at_the_next_step_exits_143_and_resumes_bit_exactly(tmp_path, straight):
    run_dir = tmp_path / "run"
    code, _, err = _interrupt(run_dir, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, err[-3000:]
    assert "Stopped by SIGTERM after step" in err
    stopped_at = int(err.split("Stopped by SIGTERM after step ")[1].split(";")[0])
    assert (run_dir / "checkpoints" / str(stopped_at)).is_dir()
    assert not (run_dir / "summary.json").exists()  # a preempted run is not a failed one
    _run(run_dir)
    summary = _assert_same_run(run_dir, straight)
    assert summary["resumed_from"] == [stopped_at]


def test_a_corrupt_checkpoint_is_refused_and_the_run_does_not_start_fresh(tmp_path, straight):
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    (run_dir / "summary.json").unlink()
    metrics_before = (run_dir / "metrics.jsonl").read_text()
    for f in (run_dir / "checkpoints" / str(STEPS) / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"not a checkpoint")
    proc = _run(run_dir, check=False)
    assert proc.returncode != 0
    assert f"Expected a readable checkpoint step {STEPS}" in proc.stderr
    assert "not started fresh" in proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "CheckpointError" in summary["error"]
    assert (run_dir / "metrics.jsonl").read_text() == metrics_before
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["110", "120"]


def test_a_checkpoint_of_another_config_is_refused_naming_the_key(tmp_path, straight):
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    proc = _run(run_dir, "dp.noise_multiplier=2.0", check=False)
    assert proc.returncode != 0
    assert "dp.noise_multiplier (checkpoint 1.0, this run 2.0)" in proc.stderr


def test_a_secure_run_resumes_bit_exactly_from_its_checkpoint_and_its_secret(tmp_path, straight):
    """dp.randomness=secure: the secret is drawn once and kept in the checkpoint, so a run
    resumed from its step-110 checkpoint ends exactly where the uninterrupted run ended."""
    secure = tmp_path / "secure"
    _run(secure, "dp.randomness=secure")
    resumed = tmp_path / "resumed"
    shutil.copytree(secure, resumed)
    shutil.rmtree(resumed / "checkpoints" / str(STEPS))
    (resumed / "summary.json").unlink()
    _run(resumed, "dp.randomness=secure")
    _, leaves_a, meta_a = _final_checkpoint(secure)
    _, leaves_b, meta_b = _final_checkpoint(resumed)
    for key in leaves_a:
        np.testing.assert_array_equal(leaves_a[key], leaves_b[key], err_msg=key)
    assert meta_a["ledger"] == meta_b["ledger"]
    assert json.loads((resumed / "summary.json").read_text())["resumed_from"] == [110]
    # and the secure run's secret is not the seeded run's
    _, seeded, _ = _final_checkpoint(straight)
    assert not np.array_equal(seeded["['key']['words']"], leaves_a["['key']['words']"])


def test_checkpoints_are_readable_by_their_owner_only(straight):
    root = straight / "checkpoints"
    assert root.stat().st_mode & 0o077 == 0
    paths = list(root.rglob("*"))
    assert any(p.is_file() for p in paths)
    for p in paths:
        assert p.stat().st_mode & 0o077 == 0, p


@pytest.mark.slow
def test_a_two_job_submitit_sweep_completes_and_a_relaunch_resumes_each_run_once(tmp_path):
    from dpjax.report import collect

    sweep = tmp_path / "sweep"
    command = [sys.executable, "-m", "dpjax.cli", "-m", "hydra/launcher=local_submitit",
               *CONFIG[:4], "dp.randomness=seeded", "train.steps=10", "train.eval_every=5",
               "train.log_every=5", "train.seed=0,1", f"hydra.sweep.dir={sweep}"]
    for launch in range(2):  # the second launch finds both runs' final checkpoints
        proc = subprocess.run(command, capture_output=True, text=True, timeout=600,
                              cwd=tmp_path, env=_env())
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = collect(sweep)
        assert sorted(r["run"] for r in rows) == ["0", "1"], (launch, rows)
        assert all(r["status"] == "completed" and r["steps"] == 10 for r in rows)
        assert [r["resumed_from"] for r in rows] == ([[10], [10]] if launch else [[], []])
    assert not list(sweep.rglob("checkpoints/**/summary.json"))
