"""``dpjax-audit``'s job: run the configured audit and write ``audit.json``.

Every audit writes at least ``kind``, ``method``, ``epsilon_claimed``,
``epsilon_lower_bound``, ``delta``, ``consistent`` (lower bound <= claim) and its
size (``trials`` or ``num_canaries``); membership inference adds ``auc`` and
``tpr_at_fpr``, the exposure audit ``exposure``. An inconsistent audit is a
refuted privacy claim: :func:`run_audit` still writes ``audit.json``, and the
command line then exits non-zero saying which claim failed and by how much.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from dpjax.audit.config import AuditRunConfig, validate_audit
from dpjax.config import validate

AUDIT_FILE = "audit.json"
# kind -> "module:function(cfg, out_dir) -> dict"
RUNNERS = {
    "step": "dpjax.audit.step:audit_from_config",
    "one_run": "dpjax.audit.one_run:audit_from_config",
    "mia": "dpjax.audit.mia:audit_from_config",
    "exposure": "dpjax.audit.exposure_audit:audit_from_config",
}
REQUIRED = ("kind", "method", "epsilon_claimed", "epsilon_lower_bound", "delta", "consistent")


class AuditInconsistent(Exception):  # noqa: N818  (a refuted claim, reported as such)
    """The lower bound exceeds the claim: the mechanism does not do what it says."""


def run_audit(cfg: AuditRunConfig, out_dir: str | Path) -> dict[str, Any]:
    """Runs ``cfg.audit.kind`` and writes ``audit.json``; returns its content."""
    from dpjax.data import DATASETS  # noqa: PLC0415
    from dpjax.models import MODELS  # noqa: PLC0415

    validate(cfg, datasets=DATASETS, models=MODELS)
    validate_audit(cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    module, function = RUNNERS[cfg.audit.kind].split(":")
    result = {"kind": cfg.audit.kind, "status": "completed",
              **getattr(importlib.import_module(module), function)(cfg, out_dir)}
    missing = [k for k in REQUIRED if k not in result]
    if missing:
        raise KeyError(f"Expected the {cfg.audit.kind} audit to report {missing}.")
    result.update(dataset=cfg.dataset.name, model=cfg.model.name, randomness=cfg.dp.randomness,
                  seed=cfg.audit.seed)
    (out_dir / AUDIT_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return result


def verdict(result: dict[str, Any]) -> str:
    """One line: the claim, the lower bound and whether the claim survived."""
    claim, lower = result["epsilon_claimed"], result["epsilon_lower_bound"]
    text = (f"audit={result['kind']} ({result['method']}): epsilon lower bound {lower:.4g} vs "
            f"claimed {claim:.4g} at delta {result['delta']:g}")
    if result["consistent"]:
        return text + " | consistent"
    text += (f" | INCONSISTENT: the claim epsilon={claim:.4g} is refuted; the lower "
             f"bound exceeds it by {lower - claim:.4g} ({100 * (lower / claim - 1):.1f}%)")
    if "confidence" in result:
        alpha = 1 - result["confidence"]
        text += (f" (a correct mechanism does this with probability at most {alpha:.3g}; "
                 f"on a second audit.seed as well, at most {alpha**2:.2g})")
    return text
