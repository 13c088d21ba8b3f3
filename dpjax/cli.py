"""``dpjax-train``: the Hydra app around :func:`dpjax.loop.run_training`.

The config schema is :class:`dpjax.config.RunConfig`, registered in Hydra's
ConfigStore as ``run_schema``; YAML groups live in the repository's
``configs/`` (or ``$DPJAX_CONFIG_DIR``). Outputs go to Hydra's run or sweep
directory. A run that fails still leaves a ``summary.json`` with
``status: "failed"`` and the error, so a sweep's other runs and its report
are not lost.

A run started in an output directory that holds a checkpoint resumes from it
(see ``docs/cluster.md``). On SIGTERM or SIGUSR2 the run saves a checkpoint at
the next step boundary and exits with code 128 + the signal number (143 for
SIGTERM, 140 for SIGUSR2) without writing a summary.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from dpjax.config import RunConfig, check_known_keys
from dpjax.loop import run_training
from dpjax.preemption import Preempted

log = logging.getLogger("dpjax")
logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # "no TPU" notices
logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save INFO lines

CONFIG_DIR = os.environ.get(
    "DPJAX_CONFIG_DIR", str(Path(__file__).resolve().parent.parent / "configs")
)

ConfigStore.instance().store(name="run_schema", node=RunConfig)


def one_line_summary(s: dict, wall_time_s: float) -> str:
    """The last line a run prints. The wall time depends on realized batch sizes (the
    number of chunks per step), so it is labelled non-private."""
    acc = f"test accuracy {100 * s['test_accuracy']:.2f}%"
    if s.get("test_bits_per_byte") is not None:  # language models: next-token accuracy
        acc += f", {s['test_bits_per_byte']:.4f} bits per byte"
    if s["dp_enabled"]:
        privacy = (f"epsilon {s['epsilon']:.3f}, delta {s['delta']:g} ({s['accountant']}), "
                   f"sigma {s['noise_multiplier']:.4g}")
    else:
        privacy = "non-private"
    return (f"{acc} | {privacy} | {s['steps']} steps ({s['stopped_reason']}) | "
            f"{wall_time_s:.0f} s (wall time, non-private)")


def _record_failure(out_dir: Path, cfg: DictConfig, err: BaseException) -> None:
    failure = {
        "status": "failed",
        "error": f"{type(err).__name__}: {err}",
        "overrides": list(HydraConfig.get().overrides.task),
        "dataset": OmegaConf.select(cfg, "dataset.name"),
        "model": OmegaConf.select(cfg, "model.name"),
        "noise_multiplier": OmegaConf.select(cfg, "dp.noise_multiplier"),
    }
    (out_dir / "summary.json").write_text(json.dumps(failure, indent=2) + "\n")
    (out_dir / "error.txt").write_text(traceback.format_exc())


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        check_known_keys(OmegaConf.to_container(cfg))
        run_cfg: RunConfig = OmegaConf.to_object(cfg)
        start = time.perf_counter()
        summary = run_training(run_cfg, out_dir)
    except Preempted as stop:
        # not a failure: no failed summary.json, so the resumed run writes the only one
        log.warning("%s", stop)
        print(stop, file=sys.stderr, flush=True)
        sys.exit(stop.exit_code)
    except Exception as err:
        _record_failure(out_dir, cfg, err)
        raise
    line = one_line_summary(summary, time.perf_counter() - start)
    log.info("%s (outputs in %s)", line, out_dir)
    print(line, flush=True)
    return summary["test_accuracy"]


if __name__ == "__main__":
    main()
