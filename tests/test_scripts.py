"""Every benchmark script in scripts/ runs in its smallest mode and prints its tables.

No other test imports the scripts, so a refactor of the library could break one
silently (bench_clipping.py called ``train.make_apply`` for days after it went
away). Each test runs one script as a user does, in a subprocess from the repo
root, and checks that its tables have rows of finite numbers that satisfy what
the script claims (ratios > 0, epsilons > 0, equalities it prints). The numbers
of a smoke run measure nothing; only their consistency is checked.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from scipy import optimize, stats

ROOT = Path(__file__).resolve().parent.parent


def run_script(name: str, args: list[str]) -> str:
    """The stdout of ``python scripts/<name>.py *args`` from the repo root; fails on rc != 0.

    The environment is inherited (so the JAX compilation cache of conftest.py is
    shared), with the repo root first on PYTHONPATH as the scripts' usage lines say.
    """
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / f"{name}.py"), *args], cwd=ROOT,
        env={**os.environ, "PYTHONPATH": path}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{name} {args} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc.stdout


def _squash(line: str) -> str:
    return " ".join(line.split())


def table(out: str, header: str) -> list[list[str]]:
    """The cells of each data row of the markdown table whose header line is ``header``."""
    lines = out.splitlines()
    starts = [i for i, line in enumerate(lines) if _squash(line) == _squash(header)]
    assert len(starts) == 1, f"expected the header {header!r} once in:\n{out}"
    rows = []
    for line in lines[starts[0] + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    assert rows, f"no data row under {header!r} in:\n{out}"
    return rows


def num(cell: str) -> float:
    """The finite number a cell starts with: ``1,234``, ``50%``, ``2^16``, ``0.1 (mean of ..)``."""
    token = cell.split()[0].replace(",", "").rstrip("%")
    value = 2.0 ** int(token[2:]) if token.startswith("2^") else float(token)
    assert math.isfinite(value), f"not a finite number: {cell!r}"
    return value


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def gdp_epsilon(mu: float, delta: float) -> float:
    """Epsilon of mu-GDP at delta (Dong, Roth, Su 2019, Corollary 2.13), by root finding."""

    def excess(eps):
        return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(
            -eps / mu - mu / 2) - delta

    return optimize.brentq(excess, 0.0, 100.0, xtol=1e-12)


# --- what each script's output must satisfy --------------------------------------------------


def check_audit_sharpness(out: str) -> None:
    rows = table(out, "| sigma | true eps | claim at 1.15 sigma | method | selection | bound: mean "
                      "(min-max) | seeds above the claim |")
    assert len(rows) == 3 * 4  # 3 sigmas x 4 (method, selection) variants
    for row in rows:
        sigma, true, claim = num(row[0]), num(row[1]), num(row[2])
        assert true == pytest.approx(gdp_epsilon(1 / sigma, 1e-5), abs=1e-3)
        assert true > claim > 0  # a claim of more noise gives a smaller epsilon
        low, high = (float(v) for v in re.fullmatch(r"\S+ \((\S+)-(\S+)\)", row[5]).groups())
        assert 0 <= low <= num(row[5]) <= high
        assert 0 <= num(row[6]) <= 100
    across = table(out, "| R per world | gdp holdout | gdp bonferroni | clopper_pearson holdout | "
                        "clopper_pearson bonferroni |")
    assert len(across) >= 2 and all(num(c) >= 0 for row in across for c in row[1:])
    calls = table(out, "| input | call | ms |")
    assert len(calls) >= 4 + 2 and all(num(row[2]) >= 0 for row in calls)


def check_bench_audit(out: str) -> None:
    rows = table(out, "| path | R | seconds | claim | lower bound (0.95) | lower bound (0.999) "
                      "| bound at 0.87 sigma (0.999) | caught |")
    assert [row[0] for row in rows] == ["vmap", "fast", "per_layer", "microbatch", "multi_chunk",
                                        "secagg", "fixed_size"]
    for row in rows:
        seconds, claim, bound, strict, weak = (num(c) for c in row[2:7])
        assert seconds > 0 and claim > 0
        # lower bounds on the correct mechanism; at R = 200 far below the claim, and the
        # 0.999 one below the 0.95 one (same releases)
        assert 0 <= strict <= bound <= claim
        assert row[7] == ("yes" if weak > claim else "no")


def check_step_audit_seeds(out: str) -> None:
    rows = table(out, "| sigma | claim | seeds above claim (0.95) | simulated rate "
                      "| seeds above (0.99) | simulated rate | mean z (+- 3 se) | sd z | KS p "
                      "| signal / C | noise sd / sigma C | seconds/seed |")
    assert [row[0] for row in rows] == ["2"]
    row = rows[0]
    # the claim: exact GDP at mu = 1/2
    assert num(row[1]) == pytest.approx(gdp_epsilon(0.5, 1e-5), abs=1e-3)
    above95, above99 = (int(row[i].split("/")[0]) for i in (2, 4))
    assert above99 <= above95 <= 3 and row[2].strip().endswith("/ 3")
    assert 0 <= num(row[3]) <= 1 and 0 <= num(row[5]) <= num(row[3])
    # 3 seeds of 250 releases: the signal and the noise scale within 25% of the claim's
    assert abs(num(row[9]) - 1) < 0.25 and abs(num(row[10]) - 1) < 0.25


def check_ddp_audit_sharpness(out: str) -> None:
    rows = table(out, "| path | R | claim | claim at 1.15x noise | lower bounds (min / median "
                      "/ max) | consistent | sharp | seconds/seed |")
    assert [(row[0], num(row[1])) for row in rows] == [("skellam", 250)]
    claim, at_more_noise = num(rows[0][2]), num(rows[0][3])
    assert 0 < at_more_noise < claim  # more noise, a smaller claim
    low, mid, high = (float(v) for v in rows[0][4].split("/"))
    assert low <= mid <= high
    consistent, sharp = (rows[0][i].split("/") for i in (5, 6))
    assert int(consistent[1]) == int(sharp[1]) == 2
    assert 0 <= int(sharp[0]) <= 2 and 0 <= int(consistent[0]) <= 2
    # a seed is counted sharp when its bound is above the claim at more noise
    assert (int(sharp[0]) > 0) == (high > at_more_noise)


def check_bench_clipping(out: str) -> None:
    rows = table(out, "| model | framework | path | step ms | x non-private | grad ms "
                      "| x non-private | step MiB | grad MiB |")
    timed = [row for row in rows if row[2] in ("non-private", "vmap DP", "fast DP",
                                               "fast_lean DP")]
    assert len(timed) == 3 * 3 * 4  # models x frameworks x paths
    for row in timed:
        step_ms, step_x, grad_ms, grad_x, step_mib, grad_mib = (num(c) for c in row[3:9])
        assert min(step_ms, step_x, grad_ms, grad_x, step_mib, grad_mib) > 0
        if row[2] == "non-private":
            assert step_x == grad_x == 1.0
    others = {(row[0], row[2]): row[3] for row in rows if row not in timed}
    models = {row[0] for row in timed}
    assert set(others) == {(m, p) for m in models for p in ("opacus ghost", "jax-privacy")}
    for (model, label), cell in others.items():
        missing = not installed("jax_privacy") if label == "jax-privacy" else not (
            installed("opacus") and installed("torch")) or model.startswith("Transformer")
        assert (cell == "n/a") == missing, (model, label, cell)
        if not missing:
            assert num(cell) > 0
    memory = re.findall(r"^  (\w+) +(.+?) +whole step +(\S+) MiB \((\S+)x non-private\), "
                        r"gradient part +(\S+) MiB \((\S+)x\)$", out, flags=re.M)
    assert len(memory) == 3 * 3 * 4  # models x frameworks x paths
    for _, path, step, step_x, grad, grad_x in memory:
        assert min(float(step), float(grad)) > 0
        if path == "non-private":
            assert float(step_x) == float(grad_x) == 1.0
    for label, module in (("opacus", "opacus"), ("jax-privacy", "jax_privacy")):
        assert (f"{label} is not installed: its rows are n/a." in out) == (not installed(module))


def check_bench_exposure(out: str) -> None:
    rows = table(out, "| method | space | first call (s) | median (s) | max abs diff vs trie "
                      "(bits) |")
    assert [(row[0], row[1]) for row in rows] == [
        ("trie + KV cache", "10^1"), ("trie, full forward per level", "10^1"),
        ("brute force", "10^1"), ("trie + KV cache", "10^2")]
    for row in rows:
        assert num(row[2]) >= 0 and num(row[3]) >= 0
        # the three ways score the same candidates: float32 round-off only
        assert 0 <= float(row[4]) < 1e-3


def check_bench_lm(out: str) -> None:
    rows = table(out, "| trainable | trainable params | step | time (ms) | / non-private | memory "
                      "(MiB) | GFLOP (XLA) |")
    assert [(row[0], row[2]) for row in rows] == [
        (t, s) for t in ("full", "lora") for s in ("non-private", "DP vmap", "DP fast")]
    params = {row[0]: num(row[1]) for row in rows}
    assert params["full"] == 479_747  # the default DecoderLM, as the docstring says
    assert 0 < params["lora"] < params["full"]
    for row in rows:
        assert num(row[3]) > 0 and num(row[4]) > 0 and num(row[5]) > 0 and num(row[6]) > 0
        if row[2] == "non-private":
            assert num(row[4]) == 1.0
    gflop = {(row[0], row[2]): num(row[6]) for row in rows}
    # the non-private LoRA baseline differentiates the adapters only: fewer flops than the
    # full step, which also computes every frozen kernel's gradient
    assert gflop["lora", "non-private"] < gflop["full", "non-private"]


def check_bench_scaling(out: str) -> None:
    rows = table(out, "| scaling | devices | global batch | step (ms) | examples/s |")
    assert [(row[0], num(row[1]), num(row[2])) for row in rows] == [
        ("weak", 1, 4), ("weak", 2, 8), ("strong", 1, 8), ("strong", 2, 8)]
    for row in rows:
        batch, ms, rate = num(row[2]), num(row[3]), num(row[4])
        assert ms > 0
        # examples/s is the batch over the step time (both rounded when printed)
        assert rate == pytest.approx(1e3 * batch / ms, rel=0.05 / ms + 1e-3, abs=1)


def check_bench_secagg(out: str) -> None:
    prg = table(out, "| generator | seconds | GB/s |")
    assert len(prg) == 2 and all(num(row[1]) > 0 and num(row[2]) > 0 for row in prg)
    rounds = table(out, "| n | graph | dropouts | setup s (host: keys, Shamir, recovery) | party s "
                        "| party PRG-bound s | aggregator s | round total s (sequential) "
                        "| round / PRG-bound |")
    assert [(row[1], row[2]) for row in rounds] == [
        ("k=8", "0%"), ("k=8", "10%"), ("complete", "0%"), ("complete", "10%")]
    for row in rounds:
        assert num(row[4]) > 0 and num(row[8]) > 0
    growth = table(out, "| n | party s | aggregator s | round total s (sequential) |")
    assert [num(row[0]) for row in growth] == [5, 10, 20]
    ddp = table(out, "| noise | unit | gamma | noise inflation | party s (rotate+round+noise+mask) "
                     "| plain party s (encode+mask) | ratio |")
    assert [(row[0], row[1]) for row in ddp] == [
        ("skellam", "user"), ("ddgauss", "user"), ("skellam", "example")]
    for row in ddp:
        assert num(row[2]) > 0 and num(row[3]) >= 1 and num(row[6]) > 0
    skipped = "skipped: the `phe` package is not installed (pip install phe)"
    if installed("phe"):
        assert skipped not in out and table(out, "| step | ms per value | extrapolated to one "
                                                 "round, d = 2^14, n = 20 |")
    else:
        assert skipped in out


def check_bench_step(out: str) -> None:
    rows = table(out, "| model | params | non-private (ms) | DP (ms) | DP / non-private |")
    assert [(row[0], num(row[1])) for row in rows] == [("dp_cnn", 26_010)]
    for row in rows:
        assert num(row[2]) >= 0 and num(row[3]) >= 0 and num(row[4]) > 0
    noise = table(out, "| model | params | Threefry, JAX key (ms) | ChaCha20, run secret (ms) "
                       "| ratio |")
    assert [row[0] for row in noise] == ["dp_cnn"]
    assert all(num(row[2]) >= 0 and num(row[3]) >= 0 and num(row[4]) > 0 for row in noise)


def check_rdp_compare(out: str) -> None:
    rows = table(out, "| z | q | T | d | scale | n | gauss | gauss@L2 | gauss-general | skellam "
                      "| ddg | DDG tau | skellam / gauss | ddg / gauss | skellam / gauss@L2 |")
    assert [num(row[5]) for row in rows] == [10, 2000]  # the first and the last setting
    for row in rows:
        gauss, at_l2, general, skellam, ddg, tau, skellam_x, ddg_x, skellam_l2 = (
            num(c) for c in row[6:])
        assert gauss > 0 and ddg > 0 and 0 <= tau
        # rounding inflates the sensitivity; the general subsampling bound is looser than the
        # tight Gaussian; Skellam's RDP is the Gaussian's at the inflated sensitivity plus a
        # positive term, subsampled like the Gaussian (symmetric loss)
        assert at_l2 >= gauss and general >= gauss and skellam >= at_l2
        assert skellam_x == pytest.approx(skellam / gauss, abs=1e-3)
        assert ddg_x == pytest.approx(ddg / gauss, rel=1e-3, abs=1e-3)
        assert skellam_l2 == pytest.approx(skellam / at_l2, abs=1e-3)
        assert 1.0 <= skellam_l2 <= 1.02  # observed 1.003 and 1.002 in these two rows


# --- the smallest mode of each script --------------------------------------------------------

SMOKE: dict[str, tuple[list[str], Callable[[str], None]]] = {
    "audit_sharpness": (["--quick"], check_audit_sharpness),
    "bench_audit": (["--trials", "200"], check_bench_audit),
    "bench_clipping": (["--quick", "--rounds", "1"], check_bench_clipping),
    "ddp_audit_sharpness": (["--paths", "skellam", "--trials", "250", "--seeds", "2"],
                            check_ddp_audit_sharpness),
    "bench_exposure": (["--digits", "1", "--full-digits", "2", "--repeats", "1"],
                       check_bench_exposure),
    "bench_lm": (["--batch-size", "2", "--repeats", "1", "--rank", "2"], check_bench_lm),
    "bench_scaling": (["--quick"], check_bench_scaling),
    "bench_secagg": (["--quick"], check_bench_secagg),
    "bench_step": (["--batch-size", "4", "--repeats", "1", "--models", "dp_cnn"],
                   check_bench_step),
    "rdp_compare": (["--quick"], check_rdp_compare),
    "step_audit_seeds": (["--sigmas", "2", "--seeds", "3", "--trials", "250", "--sim", "20"],
                         check_step_audit_seeds),
}


def test_every_script_has_a_smoke_test():
    assert sorted(p.stem for p in (ROOT / "scripts").glob("*.py")) == sorted(SMOKE)


@pytest.mark.parametrize("name", sorted(SMOKE))
def test_the_script_runs_in_its_smallest_mode(name):
    args, check = SMOKE[name]
    check(run_script(name, args))
