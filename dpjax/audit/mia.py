"""Membership inference (``audit=mia``): the loss-threshold attack and offline LiRA.

    models   = ONE Hydra multirun of dpjax-train: the configured run, K + 1 times, each
               on train.subset_fraction=1/2 of the pool with its own public subset seed
               (from audit.seed); job 0 is the target, jobs 1..K the shadows
    per model, per pool example x: logits -> loss(x), phi(x) = log(p_y / (1 - p_y))
    loss threshold  score(x) = -loss_target(x)                       Yeom et al. 2018
    offline LiRA    score(x) = -log P[Z >= phi_target(x)],           Carlini et al. 2022
                    Z ~ N(mean, var) of phi over the shadows that did NOT train on x
    target members vs non-members -> AUC, TPR at 0.1% and 1% FPR per attack
    epsilon lower bound: one run (Steinke, Nasr, Jagielski 2023), every pool example a
                    canary, the best attack's (both paid for by Bonferroni)

The pool is the run's training split (before any subset). A subset keeps each
example independently with probability 1/2 (:func:`dpjax.task.subset_mask`), so
the target's members are exactly the setting of the one-run theorem: m canaries,
each included independently with probability 1/2, and a guess made from the
target's output and public information only (the subset seeds, and shadows
trained independently of the target's coins). A two-world Clopper-Pearson bound
would instead need independent trials, which the examples of one model are not.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
from omegaconf import OmegaConf
from scipy import special

import dpjax.audit.stats as stats
from dpjax.audit.config import validate_audit
from dpjax.checkpoint import CHECKPOINT_DIR
from dpjax.config import RunConfig
from dpjax.task import build_task, subset_mask

SUBSET_FRACTION = 0.5
FPRS = (0.001, 0.01)
ATTACKS = ("loss_threshold", "lira_offline")
VARIANCES = ("global", "per_example")
MODELS_DIR = "models"  # the multirun's sweep dir, under the audit's output dir
MODELS_CONFIG = "mia_models"  # the run config the multirun composes, written there too
SCORES_FILE = "mia_scores.npz"


# ------------------------------------------------------------------ scores


def logit_confidence(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Returns ``phi = log(p_y / (1 - p_y))`` of each row's softmax (float64), shape [N].

    Computed as ``z_y - logsumexp(z_j, j != y)``, exact where ``p_y`` rounds to 1
    (Carlini et al. 2022, Section IV: the logit scaling makes the confidences of
    a fixed example across models close to Gaussian).
    """
    z = np.asarray(logits, np.float64)
    y = np.asarray(labels)
    true = np.take_along_axis(z, y[:, None], -1)[:, 0]
    others = z.copy()
    np.put_along_axis(others, y[:, None], -np.inf, -1)
    return true - special.logsumexp(others, axis=-1)


def example_losses(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Returns each row's cross-entropy ``-log p_y`` (float64), shape [N].

    As ``log(1 + exp(-phi))`` of :func:`logit_confidence`: ``logsumexp(z) - z_y``
    rounds every loss below ~1e-16 to 0, and the ties would blur exactly the
    well-fitted examples a loss threshold tells apart.
    """
    return np.logaddexp(0.0, -logit_confidence(logits, labels))


def lira_offline_scores(
    target_confidence: np.ndarray,
    shadow_confidence: np.ndarray,
    shadow_members: np.ndarray,
    *,
    variance: str = "global",
) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(scores, scored)``: offline LiRA's score of each example, and which have one.

    ``target_confidence`` [N] and ``shadow_confidence`` [K, N] are logit-scaled
    confidences (:func:`logit_confidence`); ``shadow_members`` [K, N] says which
    shadow trained on which example. Per example x, a Gaussian is fitted to the
    confidences of the shadows that did NOT train on x (mean: their average;
    variance: ``"per_example"``, their unbiased sample variance, or ``"global"``,
    the within-example variance pooled over all examples, which Carlini et al.
    (2022, Section VI) recommend below 64 shadows). The score is the one-sided
    test of their offline attack, ``-log P[Z >= phi_target(x)]`` with
    ``Z ~ N(mean_x, var_x)``: larger when the target is more confident on x than
    models that never saw it. ``scored`` is False (and the score NaN) where x has
    no such shadow (``"per_example"``: fewer than 2); it depends on the shadows'
    subsets only, never on the target.
    """
    target = np.asarray(target_confidence, np.float64)
    conf = np.asarray(shadow_confidence, np.float64)
    out = ~np.asarray(shadow_members, bool)
    if target.ndim != 1 or conf.shape != (conf.shape[0], target.size) or out.shape != conf.shape:
        raise ValueError(
            f"Expected target_confidence [N], shadow_confidence and shadow_members [K, N]; got "
            f"shapes {target.shape}, {conf.shape}, {out.shape}.")
    if variance not in VARIANCES:
        raise ValueError(f"Expected variance={variance!r} to be one of {list(VARIANCES)}.")
    n_out = out.sum(0)
    scored = n_out >= (2 if variance == "per_example" else 1)
    mean = np.where(scored, (conf * out).sum(0) / np.maximum(n_out, 1), np.nan)
    squares = (np.where(out, conf - mean, 0.0) ** 2).sum(0)
    if variance == "per_example":
        var = np.where(scored, squares / np.maximum(n_out - 1, 1), np.nan)
    else:
        dof = int(n_out[scored].sum() - scored.sum())
        if dof < 1:
            raise ValueError("Expected some example to be out of at least 2 shadow models "
                             "(too few shadows to estimate a variance).")
        var = np.full(target.shape, squares[scored].sum() / dof)
    # a zero variance (identical shadows) would make the score infinite; 1e-30 keeps it finite
    z = (target - mean) / np.sqrt(np.maximum(var, 1e-30))
    scores = np.where(scored, -special.log_ndtr(-np.where(scored, z, 0.0)), np.nan)
    return scores, scored


def attack_metrics(scores: np.ndarray, members: np.ndarray) -> dict[str, Any]:
    """``{"auc": ..., "tpr_at_fpr": {"0.001": ..., "0.01": ...}}`` of members vs non-members
    (summaries of the sample, no confidence)."""
    in_scores, out_scores = scores[members], scores[~members]
    return {"auc": stats.auc(in_scores, out_scores),
            "tpr_at_fpr": {str(f): stats.tpr_at_fpr(in_scores, out_scores, f) for f in FPRS}}


def membership_epsilon(
    attacks: dict[str, tuple[np.ndarray, np.ndarray]], *, delta: float, confidence: float
) -> tuple[float, str, dict[str, float]]:
    """Returns ``(epsilon, attack, per_attack)``: the largest one-run lower bound over the
    attacks, the attack that gave it, and every attack's bound.

    ``attacks[name] = (scores, members)`` over the canaries of one model, each
    included independently with probability 1/2. Each bound is
    :func:`dpjax.audit.stats.epsilon_lower_bound` with ``method="one_run"`` (its
    default grid of guess counts, paid for) at level ``(1 - confidence) /
    len(attacks)``, so the maximum holds with probability ``confidence``.
    """
    level = 1 - (1 - confidence) / len(attacks)
    per_attack = {
        name: stats.epsilon_lower_bound(scores[members], scores[~members], delta=delta,
                                        method="one_run", confidence=level)
        for name, (scores, members) in attacks.items()}
    best = max(per_attack, key=per_attack.get)
    return per_attack[best], best, per_attack


# ------------------------------------------------------------------ models


def subset_seeds(audit_seed: int, count: int) -> list[int]:
    """``count`` distinct subset seeds from ``audit.seed``: the target's first, then the
    shadows'."""
    state = np.random.SeedSequence([audit_seed, 0x4D1A]).generate_state(2 * count, np.uint32)
    seeds = list(dict.fromkeys(int(s) for s in state))[:count]
    if len(seeds) < count:
        raise ValueError(f"Expected {count} distinct subset seeds from audit.seed={audit_seed}.")
    return seeds


def models_config(cfg: RunConfig, sweep_dir: Path) -> dict[str, Any]:
    """The primary config of the models' multirun: ``cfg``'s run sections as plain values
    (so every job trains exactly the audited config), the sweep dir, and no output
    directory change."""
    run = {f.name: dataclasses.asdict(getattr(cfg, f.name)) if dataclasses.is_dataclass(
        getattr(cfg, f.name)) else getattr(cfg, f.name) for f in dataclasses.fields(RunConfig)}
    return {"defaults": ["run_schema", "_self_"], **run,
            "hydra": {"sweep": {"dir": str(sweep_dir), "subdir": "${hydra.job.num}"},
                      "job": {"chdir": False}}}


def models_command(config_dir: Path, seeds: list[int], launcher: str | None,
                   launcher_overrides: list[str]) -> list[str]:
    """The ``dpjax-train -m`` command line that trains one model per subset seed."""
    cmd = [sys.executable, "-m", "dpjax.cli", "--config-dir", str(config_dir),
           "--config-name", MODELS_CONFIG, "-m", f"train.subset_fraction={SUBSET_FRACTION}",
           "train.subset_seed=" + ",".join(str(s) for s in seeds)]
    if launcher is not None:
        cmd.append(f"hydra/launcher={launcher}")
    return cmd + list(launcher_overrides)


def train_models(cfg, out_dir: Path, seeds: list[int]) -> Path:
    """Trains the target and the shadows as one multirun in a subprocess; returns its sweep
    dir (``<out_dir>/models``, job i trained on subset seed ``seeds[i]``).

    A fixed sweep dir: an audit started again in the same ``out_dir`` resumes every
    model from its checkpoint (a finished one only re-evaluates). Unless set, the
    subprocess gets a persistent JAX compilation cache under ``out_dir``: the models
    share their compiled programs, which changes no result.
    """
    sweep_dir = (out_dir / MODELS_DIR).absolute()
    config_path = out_dir.absolute() / f"{MODELS_CONFIG}.yaml"
    config_path.write_text(OmegaConf.to_yaml(OmegaConf.create(models_config(cfg, sweep_dir))))
    env = dict(os.environ)
    if "JAX_COMPILATION_CACHE_DIR" not in env:
        env["JAX_COMPILATION_CACHE_DIR"] = str(out_dir.absolute() / "jax_cache")
        env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    a = cfg.audit
    cmd = models_command(config_path.parent, seeds, a.launcher, list(a.launcher_overrides))
    log_path = out_dir / "models.log"
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"Expected the models' multirun to succeed; it exited with "
                           f"{proc.returncode} (log: {log_path}):\n{tail}")
    return sweep_dir


def load_model(job_dir: Path, subset_seed: int) -> tuple[Any, dict[str, Any]]:
    """``(params, summary)`` of one finished job, checked to have trained on
    ``subset_seed``'s half for the steps its summary reports."""
    import orbax.checkpoint as ocp  # noqa: PLC0415  (keeps the scoring functions light)

    summary_path = job_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    if summary.get("status") != "completed":
        raise RuntimeError(f"Expected a completed run in {job_dir}; found "
                           f"{summary.get('status', 'no summary.json')}: {summary.get('error')}")
    manager = ocp.CheckpointManager((job_dir / CHECKPOINT_DIR).absolute())
    try:
        step = manager.latest_step()
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    finally:
        manager.close()
    fingerprint = restored.meta["fingerprint"]
    trained_on = (fingerprint["train.subset_fraction"], fingerprint["train.subset_seed"])
    if trained_on != (SUBSET_FRACTION, subset_seed) or step != summary["steps"]:
        raise RuntimeError(
            f"Expected {job_dir} to hold subset (fraction, seed) {(SUBSET_FRACTION, subset_seed)} "
            f"after {summary['steps']} steps; its checkpoint has {trained_on} at step {step}.")
    return restored.state["params"], summary


def pool_logits(logits_of, params, x: np.ndarray, batch_size: int) -> np.ndarray:
    """``logits_of(params, rows)`` on every row of ``x``, in padded batches of one shape."""
    b = min(batch_size, len(x))
    pad = -len(x) % b
    padded = np.concatenate([x, np.repeat(x[:1], pad, axis=0)]) if pad else x
    parts = [np.asarray(logits_of(params, padded[i:i + b])) for i in range(0, len(padded), b)]
    return np.concatenate(parts)[:len(x)]


# ------------------------------------------------------------------ the audit


def run_mia(cfg, out_dir: Path) -> dict[str, Any]:
    """Trains the models, scores every pool example with both attacks, and returns
    ``audit.json``'s fields (see the module docstring)."""
    validate_audit(cfg)
    a = cfg.audit
    delta = a.delta if a.delta is not None else cfg.dp.delta
    seeds = subset_seeds(a.seed, a.shadow_models + 1)
    sweep_dir = train_models(cfg, out_dir, seeds)

    pool_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train,
                                                                  subset_fraction=None))
    task = build_task(pool_cfg)
    x, y = task.x_train, task.y_train
    members = np.stack([subset_mask(len(x), SUBSET_FRACTION, s) for s in seeds])
    logits_of = jax.jit(lambda p, rows: task.apply_fn({"params": p}, rows))
    losses, confidences, summaries = [], [], []
    for job, seed in enumerate(seeds):
        params, summary = load_model(sweep_dir / str(job), seed)
        logits = pool_logits(logits_of, params, x, cfg.train.eval_batch_size)
        losses.append(example_losses(logits, y))
        confidences.append(logit_confidence(logits, y))
        summaries.append(summary)
    confidences = np.stack(confidences)
    lira, scored = lira_offline_scores(confidences[0], confidences[1:], members[1:])
    target_members = members[0]
    attacks = {"loss_threshold": (-losses[0], target_members),
               "lira_offline": (lira[scored], target_members[scored])}
    np.savez(out_dir / SCORES_FILE, members=target_members, loss_threshold=-losses[0],
             lira_offline=lira, lira_scored=scored)

    epsilon, best, per_attack = membership_epsilon(attacks, delta=delta,
                                                   confidence=a.confidence)
    metrics = {name: attack_metrics(*attacks[name]) for name in ATTACKS}
    target = summaries[0]
    claimed = float(target["epsilon"]) if target.get("epsilon") is not None else float("inf")
    return {
        "method": best,
        "statistic": "one_run",
        "epsilon_claimed": claimed,
        "epsilon_lower_bound": float(epsilon),
        "delta": float(delta),
        "consistent": bool(epsilon <= claimed),
        "confidence": a.confidence,
        "auc": {name: m["auc"] for name, m in metrics.items()},
        "tpr_at_fpr": {name: m["tpr_at_fpr"] for name, m in metrics.items()},
        "epsilon_lower_bound_per_attack": per_attack,
        "shadow_models": a.shadow_models,
        "num_examples": int(len(x)),
        "num_members": int(target_members.sum()),
        "lira_scored_examples": int(scored.sum()),
        "subset_seeds": {"target": seeds[0], "shadows": seeds[1:]},
        "target": {k: target.get(k) for k in ("test_accuracy", "test_loss", "steps",
                                              "noise_multiplier", "num_train", "dp_enabled")},
        "models_dir": str(sweep_dir),
    }


def audit_from_config(cfg, out_dir) -> dict[str, Any]:
    """``dpjax-audit audit=mia``: :func:`run_mia` on the configured run."""
    return run_mia(cfg, Path(out_dir))
