"""What a run will do, fixed before its first step: the step count and the budget.

Everything here is a function of the configuration and of the training-set size N
(public), so a plan is public too.
"""

from __future__ import annotations

import dataclasses
import math

import dpjax.accounting as accounting
from dpjax.choices import Sampling
from dpjax.config import RunConfig, check_against_dataset
from dpjax.mechanism import Mechanism


def planned_steps(cfg: RunConfig, num_train: int) -> int:
    """``train.steps``, or ``train.epochs`` over the sample rate; checks the batch size
    and delta against N first."""
    check_against_dataset(cfg, num_train)
    if cfg.dp.enabled:
        accounting.check_delta(cfg.dp.delta, num_train)
    t = cfg.train
    return t.steps if t.steps is not None else math.ceil(t.epochs / (t.batch_size / num_train))


@dataclasses.dataclass(frozen=True)
class Plan:
    """The planned steps, the steps this run may take (``dp.max_epsilon``) and why it stops."""

    steps: int
    to_run: int

    @property
    def stopped_reason(self) -> str:
        return "completed" if self.to_run == self.steps else "budget"


def plan_run(cfg: RunConfig, steps: int, mechanism: Mechanism | None) -> Plan:
    """The steps to take: all planned ones, or fewer if the budget would be crossed
    (training stops before the step that would cross it)."""
    d = cfg.dp
    if mechanism is None or d.max_epsilon is None:
        return Plan(steps, steps)
    fixed = mechanism.sampling is Sampling.FIXED_SIZE
    budget = accounting.max_steps(
        accounting.Ledger(), mechanism.noise_multiplier, mechanism.sample_rate, d.max_epsilon,
        d.delta, d.accountant, str(mechanism.sampling),
        mechanism.num_examples if fixed else None, limit=steps + 1,
    )
    return Plan(steps, min(steps, budget))
