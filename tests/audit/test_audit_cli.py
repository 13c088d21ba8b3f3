"""``dpjax-audit``: audit.json, the exit code of a refuted claim, and the report."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
COMMON = ["experiment=digits_quick", "dp.randomness=seeded", "model.options.hidden=[16]",
          "audit=step", "audit.trials=1500"]
BROKEN = """
import sys
import dpjax.noise as noise
real = noise.privatize
noise.privatize = lambda s, k, **kw: real(s, k, **{**kw, "noise_multiplier":
                                                  kw["noise_multiplier"] / 4})
from dpjax.audit.cli import main
sys.argv = ["dpjax-audit", *sys.argv[1:]]
main()
"""


def _audit(run_dir, *overrides, broken=False):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    head = ["-c", BROKEN] if broken else ["-m", "dpjax.audit.cli"]
    return subprocess.run([sys.executable, *head, *COMMON, *overrides,
                           f"hydra.run.dir={run_dir}"], capture_output=True, text=True,
                          timeout=600, env=env, cwd=run_dir.parent)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("audits")
    ok = _audit(root / "ok")
    broken = _audit(root / "broken", broken=True)
    return root, ok, broken


def test_a_consistent_audit_writes_audit_json_and_exits_0(sweep):
    root, ok, _ = sweep
    assert ok.returncode == 0, ok.stderr[-3000:]
    result = json.loads((root / "ok" / "audit.json").read_text())
    for key in ("kind", "method", "epsilon_claimed", "epsilon_lower_bound", "delta",
                "consistent", "trials"):
        assert key in result, key
    assert result["consistent"] and result["epsilon_lower_bound"] <= result["epsilon_claimed"]
    assert result["trials"] == 1500 and result["method"] == "gdp"
    assert "consistent" in ok.stdout


def test_a_refuted_claim_writes_audit_json_then_exits_non_zero_saying_by_how_much(sweep):
    root, _, broken = sweep
    assert broken.returncode == 3, broken.stderr[-3000:]
    result = json.loads((root / "broken" / "audit.json").read_text())
    assert not result["consistent"]
    assert result["epsilon_lower_bound"] > result["epsilon_claimed"]
    assert "INCONSISTENT" in broken.stderr and "exceeds it by" in broken.stderr
    assert f"{result['epsilon_claimed']:.4g}" in broken.stderr
    # the step audit decides at 0.999 (configs/audit/step.yaml) and says what that means
    assert result["confidence"] == 0.999 and "probability at most 0.001" in broken.stderr


def test_the_report_shows_the_audits_and_plots_lower_bound_against_claim(sweep):
    root, _, _ = sweep
    rep = subprocess.run([str(BIN / "dpjax-report"), str(root)], capture_output=True,
                         text=True, timeout=120)
    assert rep.returncode == 0, rep.stderr
    md = (root / "results.md").read_text()
    assert "Audits:" in md and "| ok | step | gdp |" in md and "| NO |" in md
    assert (root / "audit.png").stat().st_size > 0
    header = (root / "results.csv").read_text().splitlines()[0]
    assert "epsilon_lower_bound" in header


def test_a_bad_audit_value_names_the_key(tmp_path):
    proc = _audit(tmp_path / "bad", "audit.trials=0")
    assert proc.returncode != 0 and "audit.trials=0" in proc.stderr
