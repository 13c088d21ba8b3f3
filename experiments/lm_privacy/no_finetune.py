"""Bits per byte of the pre-trained model on the private test split, without fine-tuning.

    python experiments/lm_privacy/no_finetune.py PRETRAIN_DIR OUT_JSON [model overrides...]

Builds the task of ``experiment=lm_nonprivate_finetune model.init_from=PRETRAIN_DIR`` (the
start of every fine-tune) and evaluates its parameters on the test split, as a run's
``summary.json`` would (``test_bits_per_byte``, next-token ``test_accuracy``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import dpjax.cli  # noqa: F401  (registers the schema)
from dpjax.task import build_task

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def main(source: str, out: str, overrides: list[str]) -> None:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("config", overrides=[
            "experiment=lm_nonprivate_finetune", f"model.init_from={source}", *overrides]))
    task = build_task(cfg)
    metrics = task.evaluate(task.params, *task.test_split)
    result = {"condition": "no fine-tuning", "init_from": source,
              "test_bits_per_byte": metrics["bits_per_byte"],
              "test_accuracy": metrics["accuracy"], "test_loss": metrics["loss"]}
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
