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
from dpjax.aggregation import (
    Aggregator,
    DistributedNoiseSum,
    PlainSum,
    SecAggSettings,
    SecAggSum,
)
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
from dpjax.noise import Privatizer, gaussian_privatizer, scale_privatizer
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
        if isinstance(self.aggregation, DistributedNoiseSum):
            # the integer sensitivity (scaling, rotation, rounding) back in float units
            p = self.aggregation.params
            return contributions_changed(relation) * p.l2_sensitivity / p.gamma
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
    def distributed(self) -> bool:
        """Whether each SecAgg party adds the (discrete) noise itself."""
        return isinstance(self.clipped.aggregation, DistributedNoiseSum)

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

    @property
    def example_parties(self) -> int:
        """The parties whose blocks of rows the Poisson sampler fills from fixed shards: the
        aggregation's parties at example level, else 1 (one party, or user level, whose
        slots the user sampler fills)."""
        return self.clipped.aggregation.num_parties if self.unit is Unit.EXAMPLE else 1

    def sampler(self, secret: Secret) -> PoissonSampler | FixedSizeSampler:
        """The batches of every step, drawn from ``secret``.

        Poisson sampling with several example-level parties assigns example ``i`` to party
        ``i mod n`` (fixed shards), so one added or removed example changes one party's sum
        only, as the sensitivity of a rounded SecAgg or distributed-noise sum assumes.
        Fixed-size batches keep index order: a replace-one neighbour shifts no row.
        """
        if self.sampling is Sampling.FIXED_SIZE:
            return FixedSizeSampler(self.num_examples, self.physical_batch_size, seed=None,
                                    secret=secret)
        return PoissonSampler(self.num_examples, self.sample_rate, self.physical_batch_size,
                              seed=None, secret=secret, num_parties=self.example_parties)

    def privatizer(self) -> Privatizer:
        """Independent Gaussian noise of std ``noise_std`` per step, over ``q N`` (with
        distributed noise the parties add it: only the division is left)."""
        if self.distributed:
            return scale_privatizer(expected_batch_size=self.expected_batch_size)
        return gaussian_privatizer(
            noise_multiplier=self.noise_multiplier,
            sensitivity=self.sensitivity(Relation.ADD_OR_REMOVE_ONE),
            expected_batch_size=self.expected_batch_size,
        )

    def segment(self, steps: int = 1) -> accounting.Segment:
        """What the accountant records for ``steps`` steps of this mechanism."""
        fixed = self.sampling is Sampling.FIXED_SIZE
        return accounting.Segment(float(self.noise_multiplier), float(self.sample_rate), steps,
                                  str(self.sampling), self.num_examples if fixed else None,
                                  self._discrete())

    def _discrete(self) -> dict | None:
        if not self.distributed:
            return None
        p = self.clipped.aggregation.params
        return {"noise": str(p.noise), "party_noise": float(
                    p.party_noise_variance if p.skellam_mu is not None else p.ddg_sigma),
                "num_parties": p.min_honest_survivors, "l1_sensitivity": p.l1_sensitivity,
                "l2_sensitivity": p.l2_sensitivity, "dim": p.padded_dim}

    def record(self, ledger: accounting.Ledger, steps: int = 1) -> accounting.Ledger:
        s = self.segment(steps)
        return ledger.record(s.noise_multiplier, s.sample_rate, s.steps, s.sampling,
                             s.num_examples, discrete=s.discrete)

    def dp_event(self, steps: int):
        """The ``dp_accounting`` event of ``steps`` steps (sampler, relation and noise of
        this mechanism). Distributed discrete noise has no ``dp_accounting`` event: its
        RDP curve (:mod:`dpjax.rdp`) is accounted by :meth:`epsilon`."""
        if self.distributed:
            raise ValueError("Expected a Gaussian mechanism for a dp_accounting event; "
                             "distributed discrete noise is accounted by dpjax.rdp "
                             "(Mechanism.epsilon).")
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
        num_params = sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(params))
        common = dict(sampling=sampling, num_examples=num_examples, sample_rate=q,
                      expected_batch_size=float(batch_size),
                      physical_batch_size=physical_batch_size, num_params=num_params,
                      noise=Noise(d.noise))
        if Noise(d.noise) is not Noise.GAUSSIAN:
            return distributed_mechanism(cls, d, common, clip, steps, seed)
        aggregation: Aggregator = PlainSum()
        if d.aggregation == "secagg":
            settings = SecAggSettings(d.num_parties, d.secagg_threshold, d.secagg_neighbours,
                                      secagg_mode(d), seed=seed)
            aggregation = SecAggSum(settings, physical_batch_size // d.num_parties,
                                    sensitivity(clip), d.secagg_bits)
        sigma = d.noise_multiplier
        n_kw = {"num_examples": num_examples} if sampling is Sampling.FIXED_SIZE else {}
        if d.target_epsilon is not None:
            sigma = accounting.calibrate_noise_multiplier(
                d.target_epsilon, d.delta, q, steps, d.accountant, d.sampling, **n_kw)
        return cls(clipped=ClippedSum(clip, aggregation), noise_multiplier=float(sigma),
                   **common)


def distributed_aggregation(d, *, sigma: float, clip, rows_per_party: int, num_params: int,
                            seed: int, num_parties: int | None = None,
                            unit: Unit = Unit.EXAMPLE) -> DistributedNoiseSum:
    """The distributed-noise aggregation of a ``dp`` section at central multiplier ``sigma``:
    gamma and each party's noise chosen (:func:`dpjax.secagg.ddp_params.choose_parameters`)
    so that the noise of the honest survivors alone is ``sigma`` times the integer
    sensitivity and no coordinate wraps but with probability ``dp.wrap_probability``.

    ``unit=example``: a party holds ``rows_per_party`` rows per chunk (its vector is
    bounded by ``max_chunks * rows * C``; randomized rounding). ``unit=user``: a party is
    one user's slot (``num_parties`` slots; its vector is bounded by ``C`` and conditional
    rounding keeps the rounded vector within the sensitivity)."""
    from dpjax.secagg.ddp_params import choose_parameters  # noqa: PLC0415

    n = num_parties or d.num_parties
    survivors = n if d.min_survivors is None else d.min_survivors
    row_bound = sensitivity(clip)
    settings = SecAggSettings(n, d.secagg_threshold, d.secagg_neighbours, secagg_mode(d),
                              seed=seed)
    party = (DistributedNoiseSum.max_chunks * rows_per_party * row_bound
             if Unit(unit) is Unit.EXAMPLE else row_bound)
    params = choose_parameters(
        noise_multiplier=sigma, l2_clip_norm=row_bound, party_l2_bound=party,
        dim=num_params, num_parties=n, min_honest_survivors=survivors - d.max_colluders,
        bits=d.secagg_bits, unit=str(unit), noise=d.noise,
        wrap_probability=d.wrap_probability,
        max_units_per_party=1 if Unit(unit) is Unit.EXAMPLE else DistributedNoiseSum.max_chunks)
    return DistributedNoiseSum(settings, rows_per_party, row_bound, params, survivors,
                               d.simulated_dropouts)


def distributed_mechanism(cls, d, common: dict, clip, steps: int, seed: int) -> Mechanism:
    """A distributed-noise mechanism; a target epsilon calibrates the central multiplier
    with the discrete accountant (each evaluation chooses gamma and the party noise).
    With ``common["unit"] == user`` every slot (``physical_batch_size`` of them) is a party."""
    user = Unit(common.get("unit", Unit.EXAMPLE)) is Unit.USER
    parties = common["physical_batch_size"] if user else d.num_parties
    rows = 1 if user else common["physical_batch_size"] // d.num_parties

    def build(sigma: float) -> Mechanism:
        agg = distributed_aggregation(d, sigma=sigma, clip=clip, rows_per_party=rows,
                                      num_params=common["num_params"], seed=seed,
                                      num_parties=parties, unit=common.get("unit", Unit.EXAMPLE))
        return cls(clipped=ClippedSum(clip, agg), noise_multiplier=float(sigma), **common)

    if d.target_epsilon is None:
        return build(d.noise_multiplier)
    from dpjax.secagg.ddp_params import NoRoomForNoise  # noqa: PLC0415

    def epsilon(sigma: float) -> float | None:
        """sigma's epsilon, or None when that much noise does not fit ``2^secagg_bits``."""
        try:
            return build(sigma).epsilon(steps, d.delta, d.accountant)
        except NoRoomForNoise:
            return None

    lo, hi = 0.05, 1.0
    eps = epsilon(hi)
    while eps is not None and eps > d.target_epsilon:
        lo, hi = hi, 2 * hi
        if hi > 1e4:
            raise ValueError(f"Expected dp.target_epsilon={d.target_epsilon} to be reachable "
                             "with distributed noise at these settings.")
        eps = epsilon(hi)
    if eps is None:
        # The noise stops fitting the modulus between lo and hi (more noise never fits
        # better): the target is reachable only below that limit. Probing powers of two
        # must not refuse a target whose sigma fits (issue 13: 12 bits at epsilon 2).
        fits, over, at_limit = lo, hi, epsilon(lo)
        if at_limit is None:
            build(lo)  # raises NoRoomForNoise with the smallest bits that would fit
        while over / fits - 1 > 1e-3:
            mid = math.sqrt(fits * over)
            eps = epsilon(mid)
            if eps is None:
                over = mid
            else:
                fits, at_limit = mid, eps
        if at_limit > d.target_epsilon:
            raise NoRoomForNoise(
                f"Expected dp.target_epsilon={d.target_epsilon} to be reachable at "
                f"dp.secagg_bits={d.secagg_bits}: the most noise that fits (central "
                f"noise_multiplier {fits:.4g}) gives epsilon {at_limit:.4g}. Raise "
                "dp.secagg_bits, or lower the parties per round or the model's dimension.")
        hi = fits
    while hi / lo - 1 > 1e-3:
        mid = math.sqrt(lo * hi)
        eps = epsilon(mid)
        if eps is not None and eps <= d.target_epsilon:
            hi = mid
        else:
            lo = mid
    return build(hi)
