"""The schema and validation of ``dpjax-audit``'s ``audit`` section.

:class:`AuditRunConfig` is a run's config (:class:`dpjax.config.RunConfig`) plus
:class:`AuditConfig`; :func:`validate_audit` checks the audit's ranges before any
compute (the run's are :func:`dpjax.config.validate`'s), naming the key, the value
and what is accepted.
"""

from __future__ import annotations

import dataclasses
import re

from dpjax.config import RunConfig, check_choice, check_positive, fail, finite

AUDIT_KINDS = ("step", "one_run", "mia", "exposure")
CANARY_KINDS = ("input", "dirac")
EXPOSURE_METHODS = ("enumerate", "extrapolate")


@dataclasses.dataclass
class AuditConfig:
    """What ``dpjax-audit`` runs (``audit=step|one_run|mia|exposure``) and its sizes."""

    kind: str = "step"
    trials: int = 20_000  # releases per world (step audit)
    num_canaries: int = 1000  # one-run audit
    shadow_models: int = 16  # LiRA
    seed: int = 0  # canary choice and trial noise (a secret drawn from it in seeded mode)
    canary: str = "input"  # input | dirac (replace-one mechanisms always use dirac)
    chunks: int = 1  # step audit: the physical batch split into this many chunks
    confidence: float = 0.95
    delta: float | None = None  # default: dp.delta
    # mia: the hydra/launcher of the models' multirun (null: Hydra's basic launcher, the
    # models in turn in one process; local: joblib; slurm; ...) and its hydra.launcher.* keys
    launcher: str | None = None
    launcher_overrides: list[str] = dataclasses.field(default_factory=list)
    # exposure audit: canaries inserted into the private training split
    repetitions: list[int] = dataclasses.field(default_factory=lambda: [1, 4, 16])
    canaries_per_repetition: int = 1
    num_fresh: int = 16  # never-inserted canaries: the null distribution
    secret_length: int = 6  # digits: a candidate space of 10 ** secret_length
    exposure_method: str = "enumerate"  # enumerate (exact ranks) | extrapolate (estimate)
    num_references: int = 4096  # extrapolate: sampled candidates per canary


@dataclasses.dataclass
class AuditRunConfig(RunConfig):
    """The schema of ``dpjax-audit``: a run's config plus the audit's."""

    audit: AuditConfig = dataclasses.field(default_factory=AuditConfig)


def validate_audit(cfg: AuditRunConfig, num_train: int | None = None) -> None:
    """The audit section's ranges (the run's are :func:`validate`'s)."""
    a = cfg.audit
    check_choice("audit.kind", a.kind, AUDIT_KINDS)
    check_choice("audit.canary", a.canary, CANARY_KINDS)
    check_positive("audit.trials", a.trials, integer=True)
    check_positive("audit.num_canaries", a.num_canaries, integer=True)
    check_positive("audit.shadow_models", a.shadow_models, integer=True)
    check_positive("audit.chunks", a.chunks, integer=True)
    if isinstance(a.seed, bool) or not isinstance(a.seed, int) or a.seed < 0:
        fail("audit.seed", a.seed, "to be an integer >= 0")
    if not (finite(a.confidence) and 0 < a.confidence < 1):
        fail("audit.confidence", a.confidence, "in (0, 1)")
    if a.delta is not None and not (finite(a.delta) and 0 < a.delta < 1):
        fail("audit.delta", a.delta, "in (0, 1)")
    if a.kind == "one_run" and num_train is not None and 2 * a.num_canaries > num_train:
        fail("audit.num_canaries", a.num_canaries,
              f"to be at most half the training set ({num_train // 2})")
    if a.kind == "mia":
        if a.shadow_models < 2:
            fail("audit.shadow_models", a.shadow_models, "to be >= 2 for audit=mia (LiRA fits "
                  "a Gaussian to the shadows that did not train on each example)")
        if cfg.train.subset_fraction is not None:
            fail("train.subset_fraction", cfg.train.subset_fraction, "to be null with "
                  "audit=mia (the audit trains every model on a random half of the pool)")
        if cfg.dp.enabled and a.delta is not None and a.delta != cfg.dp.delta:
            fail("audit.delta", a.delta, f"to be null or dp.delta={cfg.dp.delta!r} with "
                  "audit=mia (the claim is the target run's epsilon at dp.delta)")
        if a.launcher is not None and not re.fullmatch(r"[A-Za-z0-9_]+", str(a.launcher)):
            fail("audit.launcher", a.launcher, "to be null or a hydra/launcher config name "
                  "(local, local_submitit, slurm, ...)")
        for item in a.launcher_overrides:
            if not (isinstance(item, str) and item.startswith("hydra.launcher.") and "=" in item):
                fail("audit.launcher_overrides", item, "to hold 'hydra.launcher.<key>=<value>' "
                      "overrides only (anything else could make the models differ from the run)")
    if a.kind == "exposure":
        _validate_exposure(a)
    if a.kind in ("step", "one_run") and not cfg.dp.enabled:
        fail("dp.enabled", cfg.dp.enabled, f"to be true for audit={a.kind} (it tests a DP "
              "mechanism)")


def _validate_exposure(a: AuditConfig) -> None:
    reps = list(a.repetitions) if isinstance(a.repetitions, list | tuple) else None
    if not reps or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in reps):
        fail("audit.repetitions", a.repetitions, "to be a non-empty list of integers >= 1")
    check_positive("audit.canaries_per_repetition", a.canaries_per_repetition, integer=True)
    if isinstance(a.num_fresh, bool) or not isinstance(a.num_fresh, int) or a.num_fresh < 2:
        fail("audit.num_fresh", a.num_fresh, "to be an integer >= 2 (the null distribution)")
    check_positive("audit.secret_length", a.secret_length, integer=True)
    check_choice("audit.exposure_method", a.exposure_method, EXPOSURE_METHODS)
    if isinstance(a.num_references, bool) or not isinstance(a.num_references, int) or (
            a.num_references < 3):
        fail("audit.num_references", a.num_references, "to be an integer >= 3")
