"""``audit=exposure`` of ``dpjax-audit``: the Secret Sharer on the configured LM run.

    canaries = make_canaries(audit.seed, audit.repetitions, ...)   names + uniform secrets
    run      = run_training(cfg + dataset.options.canaries)         each copy one training record
    params   = the run's final checkpoint, merged with its frozen leaves
    exposure = measure_exposure(model, params, canaries)            per repetition count
    null     = exposure of the fresh (never inserted) canaries
    at start = the inserted canaries' exposure under the run's starting parameters

Exposure (Carlini et al. 2019, Sec. 4) measures memorization; it is not by
itself an epsilon. A canary inserted once is one record, and the run's
per-record (epsilon, delta) guarantee bounds how often its secret can rank
high. That gives the sound lower bound this audit reports (:func:`epsilon_lower_bound`,
from the repetition-1 canaries, exact ranks only). A canary repeated ``r > 1`` times
is a group of ``r`` records that the per-record guarantee does not cover: its
exposure is reported, never turned into a claim.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np

import dpjax.checkpoint as checkpoint
from dpjax.audit.exposure import MAX_ENUMERATED, measure_exposure, uniform_rank_exposure_moments
from dpjax.config import ConfigError, RunConfig
from dpjax.data.canaries import CanarySet, make_canaries
from dpjax.data.text import encode
from dpjax.lm_task import CANARIES_OPTION, build_lm_fields, context_length
from dpjax.loop import run_training

CANARY_DATASETS = ("private_text", "text")
"""Text datasets with a private training split that canaries can be inserted into."""
RUN_DIR = "run"
"""Where, under the audit's output directory, the audited run writes its outputs."""


def canary_spec(cfg) -> dict[str, Any]:
    """``dataset.options.canaries`` of the audited run: :func:`make_canaries`'s arguments
    from the audit section."""
    a = cfg.audit
    return {"seed": int(a.seed), "repetitions": [int(r) for r in a.repetitions],
            "canaries_per_repetition": int(a.canaries_per_repetition),
            "num_fresh": int(a.num_fresh), "secret_length": int(a.secret_length)}


def check_config(cfg, canaries: CanarySet) -> None:
    """Refuses, before training, what the audit cannot measure: a dataset without a private
    training split, canaries already configured, a space too large to enumerate, or a
    canary longer than one context window (it would be cut before its secret)."""
    if cfg.dataset.name not in CANARY_DATASETS:
        raise ConfigError(f"Expected dataset.name={cfg.dataset.name!r} to be one of "
                          f"{list(CANARY_DATASETS)} with audit=exposure (canaries go into a "
                          "private training split).")
    if CANARIES_OPTION in cfg.dataset.options:
        raise ConfigError(f"Expected dataset.options.{CANARIES_OPTION} to be unset with "
                          "audit=exposure (the audit's own audit.* keys decide the canaries).")
    if cfg.dp.enabled and cfg.audit.delta is not None and cfg.audit.delta != cfg.dp.delta:
        raise ConfigError(f"Expected audit.delta={cfg.audit.delta!r} to be null or "
                          f"dp.delta={cfg.dp.delta!r} with audit=exposure (the claim is the "
                          "run's epsilon at dp.delta).")
    if cfg.audit.exposure_method == "enumerate" and canaries.space_size > MAX_ENUMERATED:
        raise ConfigError(f"Expected audit.secret_length={cfg.audit.secret_length!r} to give "
                          f"at most {MAX_ENUMERATED:.0e} candidates with "
                          "audit.exposure_method='enumerate' (use 'extrapolate').")
    width = context_length(dict(cfg.dataset.options)) + 1
    longest = max(canaries.inserted + canaries.fresh, key=lambda c: len(encode(c.text)))
    if len(encode(longest.text)) > width:
        raise ConfigError(f"Expected every canary to fit in one context window of "
                          f"dataset.options.context_length + 1 = {width} tokens; "
                          f"{longest.text!r} has {len(encode(longest.text))} with BOS and EOS.")


def epsilon_lower_bound(exposures: list[float], *, space_size: int, num_canaries: int,
                        delta: float, confidence: float) -> float:
    """A lower bound on the epsilon of a per-record (epsilon, delta)-DP run, from the exact
    exposures of canaries inserted once each; it holds with probability ``confidence``.

    Each secret is uniform on the ``space_size`` candidates given the other canaries'
    (distinct draws: on ``space_size - num_canaries + 1`` of them). Without the canary's
    record the model is independent of its secret, so ``P[exposure >= t] <= c 2^-t`` with
    ``c = space_size / (space_size - num_canaries + 1)``; with it, (epsilon, delta)-DP
    gives ``P[exposure >= t] <= e^epsilon c 2^-t + delta``. For one canary, rejecting
    every epsilon with ``e^epsilon c 2^-T + delta <= beta`` errs with probability at
    most ``beta``; over ``m`` canaries (union bound) ``beta = (1 - confidence) / m``:

        epsilon_lower = max(0, max_i T_i ln 2 + ln((beta - delta) / c)).

    0 when ``beta <= delta`` or there is no canary.
    """
    m = len(exposures)
    beta = (1 - confidence) / m if m else 0.0
    if m == 0 or beta <= delta:
        return 0.0
    c = space_size / (space_size - num_canaries + 1)
    return max(0.0, max(exposures) * math.log(2) + math.log((beta - delta) / c))


def uniform_rank_range(space_size: int, coverage: float = 0.95) -> tuple[float, float]:
    """The central ``coverage`` range of the exposure of a uniformly random rank on
    ``1..space_size`` (a model that knows nothing about the secret)."""
    tail = (1 - coverage) / 2
    low_rank, high_rank = (max(1, math.ceil(q * space_size)) for q in (tail, 1 - tail))
    log_space = math.log2(space_size)
    return log_space - math.log2(high_rank), log_space - math.log2(low_rank)


def _run_config(cfg, canaries: dict[str, Any]) -> RunConfig:
    """The training run of the audit: ``cfg``'s run sections with the canaries inserted."""
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(RunConfig)}
    options = {**dict(cfg.dataset.options), CANARIES_OPTION: canaries}
    fields["dataset"] = dataclasses.replace(cfg.dataset, options=options)
    return RunConfig(**fields)


def _start_and_final_params(run_cfg: RunConfig, run_dir: Path):
    """The model of the finished run, and its full parameters (trainable + frozen) before
    the first step and after the last."""
    trained, _, _ = checkpoint.read_params(run_dir / checkpoint.CHECKPOINT_DIR)
    fields = build_lm_fields(run_cfg)
    setup = fields["lm"]
    return setup, setup.full_params(fields["params"]), setup.full_params(trained)


def run_exposure_audit(cfg, out_dir: Path) -> dict[str, Any]:
    """Trains the configured run with canaries, measures their exposure, and returns
    ``audit.json``'s fields (see the module docstring)."""
    a = cfg.audit
    spec = canary_spec(cfg)
    try:
        canaries = make_canaries(**spec)
    except ValueError as err:
        raise ConfigError(f"Expected audit.repetitions, canaries_per_repetition, num_fresh "
                          f"and secret_length to give a valid set of canaries: {err}") from err
    check_config(cfg, canaries)
    delta = a.delta if a.delta is not None else cfg.dp.delta
    run_cfg = _run_config(cfg, spec)
    run_dir = Path(out_dir) / RUN_DIR
    summary = run_training(run_cfg, run_dir)
    setup, start, params = _start_and_final_params(run_cfg, run_dir)
    report = measure_exposure(setup.model, params, setup.canaries, method=a.exposure_method,
                              num_references=a.num_references, seed=a.seed)
    # The same canaries under the starting model: a pre-trained start can rank a secret
    # high before seeing it (e.g. a round number); memorization is the change.
    before = measure_exposure(setup.model, start,
                              dataclasses.replace(setup.canaries, fresh=()),
                              method=a.exposure_method, num_references=a.num_references,
                              seed=a.seed)

    exposure = {str(r): [float(v) for v in values]
                for r, values in sorted(report.by_repetitions.items())}
    once = list(report.by_repetitions.get(1, ()))
    exact = a.exposure_method == "enumerate"
    total = len(canaries.inserted) + len(canaries.fresh)
    lower = epsilon_lower_bound(once if exact else [], space_size=report.space_size,
                                num_canaries=total, delta=delta, confidence=a.confidence)
    claimed = float(summary["epsilon"]) if summary.get("epsilon") is not None else math.inf
    fresh = np.asarray(report.fresh, np.float64)
    uniform_mean, uniform_std = uniform_rank_exposure_moments(report.space_size)
    return {
        "method": "exposure",
        "exposure_method": a.exposure_method,
        "epsilon_claimed": claimed,
        "epsilon_lower_bound": float(lower),
        "delta": float(delta),
        "consistent": bool(lower <= claimed),
        "confidence": a.confidence,
        "note": ("Exposure measures memorization (Carlini et al. 2019). epsilon_lower_bound uses "
                 "only the canaries inserted once (one record each: what the per-record "
                 "guarantee covers) and only exact ranks (exposure_method=enumerate; 0 with "
                 "extrapolation); a canary repeated r times is a group of r records, which "
                 "the per-record guarantee does not cover."),
        "exposure": exposure,
        "exposure_mean": {r: float(np.mean(v)) for r, v in exposure.items()},
        "exposure_at_start": {str(r): [float(v) for v in values]
                              for r, values in sorted(before.by_repetitions.items())},
        "null": {
            "exposures": [float(v) for v in fresh],
            "mean": float(fresh.mean()),
            "range_95": [float(np.quantile(fresh, 0.025)), float(np.quantile(fresh, 0.975))],
            "uniform_rank_mean": uniform_mean,
            "uniform_rank_std": uniform_std,
            "uniform_rank_range_95": list(uniform_rank_range(report.space_size)),
        },
        "secret_space": report.space_size,
        "max_exposure": report.max_exposure,
        "num_canaries": len(canaries.inserted),
        "canaries_per_repetition": a.canaries_per_repetition,
        "num_fresh": len(canaries.fresh),
        "run": {k: summary.get(k) for k in ("epsilon", "noise_multiplier", "steps", "dp_enabled",
                                           "test_bits_per_byte", "test_accuracy", "trainable",
                                           "init_from")},
        "run_dir": str(run_dir),
    }


def audit_from_config(cfg, out_dir) -> dict[str, Any]:
    """``dpjax-audit audit=exposure``: :func:`run_exposure_audit` on the configured run."""
    return run_exposure_audit(cfg, Path(out_dir))
