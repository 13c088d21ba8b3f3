"""What a resumed run carries over besides the TrainState, and the checks on it.

:class:`Progressed` is the host-side part of a checkpoint (JSON in its
``meta`` item): the accountant's ledger, so that epsilon counts every step
exactly once across restarts, and the loop's counters.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TextIO

import dpjax.accounting as accounting
from dpjax.checkpoint import DATA_FINGERPRINT, CheckpointError, Restored


@dataclasses.dataclass
class Progressed:
    """The host-side counters that a checkpoint carries next to the TrainState."""

    ledger: accounting.Ledger
    num_nonfinite: int = 0
    last_eval: dict[str, float] = dataclasses.field(default_factory=dict)
    wall_time_s: float = 0.0  # of the processes before this one
    resumed_from: list[int] = dataclasses.field(default_factory=list)

    def to_meta(self) -> dict[str, Any]:
        return {"ledger": self.ledger.to_dict(), "num_nonfinite": self.num_nonfinite,
                "last_eval": self.last_eval, "wall_time_s": self.wall_time_s,
                "resumed_from": self.resumed_from}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Progressed:
        try:
            return cls(accounting.Ledger.from_dict(meta["ledger"]), int(meta["num_nonfinite"]),
                       dict(meta["last_eval"]), float(meta["wall_time_s"]),
                       list(meta["resumed_from"]))
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(
                f"Expected checkpoint metadata with a ledger and the loop's counters; reading "
                f"them failed with {type(err).__name__}: {err}. The run was not started fresh."
            ) from err


def check_restored(restored: Restored, progressed: Progressed, dp_enabled: bool) -> None:
    """The checkpoint's step, its state's step and (with DP) its ledger's step count agree,
    so the resumed run's epsilon counts every step it took exactly once."""
    where = f"checkpoint step {restored.step}"
    if int(restored.state.step) != restored.step:
        raise CheckpointError(
            f"Expected the state in {where} to be at step {restored.step}; "
            f"it is at step {int(restored.state.step)}. The run was not started fresh."
        )
    if dp_enabled and progressed.ledger.steps != restored.step:
        raise CheckpointError(
            f"Expected the ledger in {where} to count {restored.step} steps; it counts "
            f"{progressed.ledger.steps}. The run was not started fresh."
        )


def check_data(restored: Restored, fingerprint: str) -> None:
    """The checkpoint was written for this training data (compared under the run's secret),
    so the resumed steps never reuse a step's noise on other data."""
    if restored.meta.get(DATA_FINGERPRINT) != fingerprint:
        raise CheckpointError(
            f"Expected checkpoint step {restored.step} to have been written for this training "
            "data; its data fingerprint differs (other files, options or preprocessing). "
            "Resuming would reuse its noise on other data. The run was not started fresh: "
            "point hydra.run.dir at a new directory to start one."
        )


def open_metrics(path: Path, step: int, resumed: bool) -> TextIO:
    """A JSON-lines output for appending; on a resume, records after ``step`` (written
    before the interruption, and about to be written again) and a final-totals record
    are dropped first."""
    if not resumed or not path.exists():
        return path.open("w")
    records = [(line, json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line, r in records if r["step"] <= step and not r.get("final")]
    path.write_text("".join(line + "\n" for line in kept))
    return path.open("a")
