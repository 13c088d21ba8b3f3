"""One DP-SGD mechanism: everything its guarantee depends on, in one object.

A :class:`Mechanism` is built from the ``dp`` config (:meth:`Mechanism.from_config`)
or directly from Python, and owns the parts that must agree for the reported
epsilon to hold. The whole step, in the terms of its parts:

    rows      = mechanism.sampler(secret).sample(t)         Poisson / fixed-size, from the secret
    partial   = clipped.aggregation.local(clipped_grad)     each party's sum of rows clipped to C
    total     = clipped.aggregation.finish(partial, round)  plain sum, or one SecAgg round
    noisy     = privatizer.update(total, state, key_t)      + N(0, (sigma * S)^2), / q N
    params    = optimizer(noisy)                            post-processing
    ledger   += mechanism.segment(1)                        the same sampler, relation, sigma

``S = clipped.sensitivity(relation)`` is computed in one place
(:meth:`ClippedSum.sensitivity`): one row's clip bound (plus SecAgg's rounding
slack), times the rows a neighbour changes under the sampler's relation. The
accountant's event comes from the same sampler settings that draw the batches
(:meth:`Mechanism.segment`), so the two cannot disagree.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax

import dpjax._validate as _validate
import dpjax.accounting as accounting
from dpjax.aggregation import Aggregator, PlainSum, SecAggSettings, SecAggSum
from dpjax.choices import (
    Accountant,
    Noise,
    Relation,
    Sampling,
    Unit,
    contributions_changed,
    relation_of,
)
from dpjax.clip_math import sensitivity
from dpjax.clipping import per_layer_clip_norms
from dpjax.config import secagg_mode
from dpjax.noise import Privatizer, gaussian_privatizer
from dpjax.randomness import Secret
from dpjax.sampling import FixedSizeSampler, PoissonSampler

PyTree = Any


@dataclasses.dataclass(frozen=True)
class ClippedSum:
    """What bounds one row's contribution: the clip bound(s) and the aggregation.

    Guarantee: one row changes the aggregated sum by at most
    ``sensitivity(ADD_OR_REMOVE_ONE)`` in L2; a replace-one neighbour by twice that.
    """

    l2_clip_norm: float | PyTree
    aggregation: Aggregator = dataclasses.field(default_factory=PlainSum)

    @property
    def row_bound(self) -> float:
        """The L2 bound of one row's clipped gradient: C, or sqrt(sum C_g^2) per layer."""
        return sensitivity(self.l2_clip_norm)

    def sensitivity(self, relation: Relation | str = Relation.ADD_OR_REMOVE_ONE,
                    num_params: int | None = None) -> float:
        """L2 sensitivity of the aggregated sum under ``relation``.

        One row: its clip bound plus what the aggregation's rounding can add
        (``sqrt(d) / scale`` for SecAgg, needs ``num_params = d``; 0 for a plain sum).
        """
        slack = 0.0
        if isinstance(self.aggregation, SecAggSum):
            if num_params is None:
                raise ValueError("Expected num_params (the parameter count d) for the "
                                 "sensitivity of a securely aggregated sum.")
            slack = self.aggregation.rounding_slack(num_params)
        return contributions_changed(relation) * (self.row_bound + slack)


@dataclasses.dataclass(frozen=True)
class Mechanism:
    """A DP-SGD mechanism: sampler, clipped sum, privatizer and accounting, together.

    ``noise_multiplier`` is the noise standard deviation over the add/remove
    sensitivity of the aggregated sum (``sigma``: the std is ``sigma * S``).
    """

    sampling: Sampling
    num_examples: int
    sample_rate: float
    expected_batch_size: float
    physical_batch_size: int
    clipped: ClippedSum
    noise_multiplier: float
    num_params: int
    noise: Noise = Noise.GAUSSIAN
    unit: Unit = Unit.EXAMPLE

    def __post_init__(self):
        object.__setattr__(self, "sampling", Sampling(self.sampling))
        _validate.positive_int("num_examples", self.num_examples)
        _validate.sample_rate("sample_rate", self.sample_rate)
        _validate.positive("expected_batch_size", self.expected_batch_size)
        _validate.positive_int("physical_batch_size", self.physical_batch_size)
        _validate.non_negative("noise_multiplier", self.noise_multiplier)
        _validate.positive_int("num_params", self.num_params)

    @property
    def relation(self) -> Relation:
        """The neighbouring relation the sampler's accounting event is defined for."""
        return relation_of(self.sampling)

    @property
    def noise_std(self) -> float:
        """The standard deviation of the noise on the aggregated sum."""
        return self.noise_multiplier * self.sensitivity(Relation.ADD_OR_REMOVE_ONE)

    def sensitivity(self, relation: Relation | str | None = None) -> float:
        """The aggregated sum's L2 sensitivity under ``relation`` (default: the sampler's)."""
        return self.clipped.sensitivity(relation or self.relation, self.num_params)

    def sampler(self, secret: Secret) -> PoissonSampler | FixedSizeSampler:
        """The batches of every step, drawn from ``secret``."""
        if self.sampling is Sampling.FIXED_SIZE:
            return FixedSizeSampler(self.num_examples, self.physical_batch_size, seed=None,
                                    secret=secret)
        return PoissonSampler(self.num_examples, self.sample_rate, self.physical_batch_size,
                              seed=None, secret=secret)

    def privatizer(self) -> Privatizer:
        """Independent Gaussian noise of std ``noise_std`` per step, over ``q N``."""
        return gaussian_privatizer(
            noise_multiplier=self.noise_multiplier,
            sensitivity=self.sensitivity(Relation.ADD_OR_REMOVE_ONE),
            expected_batch_size=self.expected_batch_size,
        )

    def segment(self, steps: int = 1) -> accounting.Segment:
        """What the accountant records for ``steps`` steps of this mechanism."""
        fixed = self.sampling is Sampling.FIXED_SIZE
        return accounting.Segment(float(self.noise_multiplier), float(self.sample_rate), steps,
                                  str(self.sampling), self.num_examples if fixed else None)

    def record(self, ledger: accounting.Ledger, steps: int = 1) -> accounting.Ledger:
        s = self.segment(steps)
        return ledger.record(s.noise_multiplier, s.sample_rate, s.steps, s.sampling,
                             s.num_examples)

    def dp_event(self, steps: int):
        """The ``dp_accounting`` event of ``steps`` steps (sampler, relation and noise of
        this mechanism)."""
        return self.record(accounting.Ledger(), steps).dp_event()

    def epsilon(self, steps: int, delta: float, accountant: Accountant | str) -> float:
        return self.record(accounting.Ledger(), steps).epsilon(delta, str(accountant))

    def fingerprint(self) -> dict[str, Any]:
        """The resolved values a resumed run must share (with the config's dp section)."""
        return {"noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
                "num_train": self.num_examples, "noise_std": self.noise_std,
                **self.clipped.aggregation.fingerprint()}

    @classmethod
    def from_config(cls, d, *, num_examples: int, batch_size: int, steps: int,
                    physical_batch_size: int, params: PyTree, seed: int) -> Mechanism:
        """The mechanism of a ``dp`` config section (a :class:`dpjax.config.DPConfig`).

        ``batch_size`` is the expected batch size ``q N`` (Poisson) or the batch size
        (fixed-size); a ``target_epsilon`` calibrates sigma for ``steps`` steps here.
        ``seed`` seeds SecAgg's masks in simulation mode only.
        """
        sampling = Sampling(d.sampling)
        q = batch_size / num_examples
        clip = d.l2_clip_norm
        if d.per_layer_clipping:
            # one bound per layer, C / sqrt(layers) each: the total sensitivity stays C
            clip = per_layer_clip_norms(params, d.l2_clip_norm, depth=1)
        aggregation: Aggregator = PlainSum()
        if d.aggregation == "secagg":
            settings = SecAggSettings(d.num_parties, d.secagg_threshold, d.secagg_neighbours,
                                      secagg_mode(d), seed=seed)
            aggregation = SecAggSum(settings, physical_batch_size // d.num_parties,
                                    sensitivity(clip))
        sigma = d.noise_multiplier
        n_kw = {"num_examples": num_examples} if sampling is Sampling.FIXED_SIZE else {}
        if d.target_epsilon is not None:
            sigma = accounting.calibrate_noise_multiplier(
                d.target_epsilon, d.delta, q, steps, d.accountant, d.sampling, **n_kw)
        num_params = sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(params))
        return cls(sampling=sampling, num_examples=num_examples, sample_rate=q,
                   expected_batch_size=float(batch_size), physical_batch_size=physical_batch_size,
                   clipped=ClippedSum(clip, aggregation), noise_multiplier=float(sigma),
                   num_params=num_params)
