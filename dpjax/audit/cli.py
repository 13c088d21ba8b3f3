"""``dpjax-audit``: the Hydra app around :func:`dpjax.audit.run.run_audit`.

The same config groups as ``dpjax-train`` plus ``audit=step|one_run|mia|exposure``
(``configs/audit_config.yaml``; schema :class:`dpjax.audit.config.AuditRunConfig`).
Writes ``audit.json`` into its Hydra output directory. Exit code 0 when the
audit is consistent with the claimed epsilon, 3 when it refutes it (after
writing ``audit.json``), 1 on an error.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from dpjax.audit.config import AuditRunConfig
from dpjax.audit.run import AUDIT_FILE, run_audit, verdict
from dpjax.cli import CONFIG_DIR
from dpjax.config import check_known_keys

log = logging.getLogger("dpjax")
INCONSISTENT_EXIT = 3

ConfigStore.instance().store(name="audit_schema", node=AuditRunConfig)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="audit_config")
def main(cfg: DictConfig) -> float:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        check_known_keys(OmegaConf.to_container(cfg), AuditRunConfig)
        result = run_audit(OmegaConf.to_object(cfg), out_dir)
    except Exception as err:
        failure = {"status": "failed", "error": f"{type(err).__name__}: {err}",
                   "overrides": list(HydraConfig.get().overrides.task)}
        (out_dir / AUDIT_FILE).write_text(json.dumps(failure, indent=2) + "\n")
        (out_dir / "error.txt").write_text(traceback.format_exc())
        raise
    line = verdict(result)
    log.info("%s (outputs in %s)", line, out_dir)
    print(line, flush=True)
    if not result["consistent"]:
        print(line, file=sys.stderr, flush=True)
        sys.exit(INCONSISTENT_EXIT)
    return result["epsilon_lower_bound"]


if __name__ == "__main__":
    main()
