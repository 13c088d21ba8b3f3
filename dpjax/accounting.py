"""Privacy accounting with Google's ``dp-accounting``.

DP-SGD with Poisson sampling (rate ``q``) and Gaussian noise (multiplier
``sigma``) for ``T`` steps is the event
``SelfComposed(PoissonSampled(q, Gaussian(sigma)), T)`` under the add/remove
neighbouring relation.

Fixed-size batches (``B`` of ``N`` drawn uniformly without replacement, fresh
each step) are accounted under the replace-one relation, the only one for which
dp-accounting defines ``SampledWithoutReplacementDpEvent``. Replacing one
example moves a sum of rows clipped to ``C`` by up to ``2C``, so the Gaussian
event gets noise multiplier ``sigma / 2``. dp-accounting's PLD accountant does
not implement sampling without replacement; asking for it raises an error.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence

import dp_accounting
from dp_accounting import pld, rdp

import dpjax._validate as _validate
from dpjax.choices import Accountant, Relation, Sampling, contributions_changed, relation_of, values

ACCOUNTANTS = values(Accountant)
SAMPLINGS = values(Sampling)
MAX_NOISE_MULTIPLIER = 1e4
PLD_VALUE_DISCRETIZATION = 1e-4


def _check(noise_multiplier, sample_rate, steps, accountant, sampling, num_examples):
    _validate.non_negative("noise_multiplier", noise_multiplier)
    _validate.sample_rate("sample_rate", sample_rate)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"Expected steps={steps!r} to be an integer >= 0.")
    _validate.one_of("accountant", accountant, ACCOUNTANTS)
    _validate.one_of("sampling", sampling, SAMPLINGS)
    if Sampling(sampling) is Sampling.FIXED_SIZE:
        if num_examples is None:
            raise ValueError(
                "Expected num_examples (the dataset size N) with sampling='fixed_size': "
                "the batch size is sample_rate * N."
            )
        _validate.positive_int("num_examples", num_examples)
        if Accountant(accountant) is Accountant.PLD:
            raise ValueError(
                "Expected accountant='rdp' with sampling='fixed_size': dp-accounting's PLD "
                "accountant does not implement sampling without replacement."
            )
    elif num_examples is not None:
        _validate.positive_int("num_examples", num_examples)


def _step_event(noise_multiplier, sample_rate, sampling, num_examples) -> dp_accounting.DpEvent:
    """One step's event. ``noise_multiplier`` is the noise std over one row's sensitivity;
    the Gaussian event's multiplier is the std over the sensitivity under the sampler's
    relation (replace-one changes two rows)."""
    sampling = Sampling(sampling)
    gaussian = dp_accounting.GaussianDpEvent(
        noise_multiplier / contributions_changed(relation_of(sampling)))
    if sampling is Sampling.POISSON:
        return dp_accounting.PoissonSampledDpEvent(sample_rate, gaussian)
    batch_size = round(sample_rate * num_examples)
    return dp_accounting.SampledWithoutReplacementDpEvent(num_examples, batch_size, gaussian)


_RELATIONS = {
    Relation.ADD_OR_REMOVE_ONE: dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    Relation.REPLACE_ONE: dp_accounting.NeighboringRelation.REPLACE_ONE,
}


def _accountant(accountant: str, sampling: str) -> dp_accounting.PrivacyAccountant:
    if Accountant(accountant) is Accountant.PLD:
        return pld.PLDAccountant(value_discretization_interval=PLD_VALUE_DISCRETIZATION)
    return rdp.RdpAccountant(neighboring_relation=_RELATIONS[relation_of(sampling)])


def _warn_delta(delta, num_examples):
    if num_examples is not None and delta >= 1 / num_examples:
        warnings.warn(
            f"delta={delta} >= 1/N = {1 / num_examples:.3g}: such a delta allows a mechanism "
            "that publishes a whole example; use delta well below 1/N.",
            stacklevel=3,
        )


def epsilon(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
    sampling: str = "poisson",
    *,
    num_examples: int | None = None,
) -> float:
    """Epsilon of ``steps`` DP-SGD steps at ``delta``, from dp-accounting.

    ``accountant`` is ``"rdp"`` or ``"pld"``; ``sampling`` is ``"poisson"`` (rate
    ``sample_rate``) or ``"fixed_size"`` (batches of ``sample_rate * num_examples``,
    replace-one relation). ``noise_multiplier=0`` gives ``inf``.
    """
    _validate.delta("delta", delta)
    _validate.positive_int("steps", steps)
    return Ledger().record(noise_multiplier, sample_rate, steps, sampling, num_examples).epsilon(
        delta, accountant
    )


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    sampling: str = "poisson",
    *,
    num_examples: int | None = None,
    rtol: float = 1e-3,
) -> float:
    """The smallest noise multiplier (to ``rtol`` relative) whose epsilon <= target.

    Raises ``ValueError`` if even ``noise_multiplier = 1e4`` does not reach the
    target.
    """
    _validate.positive("target_epsilon", target_epsilon)
    _validate.delta("delta", delta)
    _validate.positive("rtol", rtol)
    _check(1.0, sample_rate, steps, accountant, sampling, num_examples)
    _validate.positive_int("steps", steps)

    def eps(sigma):
        return epsilon(
            sigma, sample_rate, steps, delta, accountant, sampling, num_examples=num_examples
        )

    hi = 1.0
    while eps(hi) > target_epsilon:
        if hi >= MAX_NOISE_MULTIPLIER:
            raise ValueError(
                f"Expected target_epsilon={target_epsilon} to be reachable: even "
                f"noise_multiplier={MAX_NOISE_MULTIPLIER:g} gives epsilon={eps(hi):.4g} at "
                f"delta={delta}, sample_rate={sample_rate}, steps={steps}."
            )
        hi = min(2 * hi, MAX_NOISE_MULTIPLIER)
    lo = hi / 2
    while eps(lo) <= target_epsilon and lo > 1e-6:
        hi, lo = lo, lo / 2
    while hi / lo - 1 > rtol:
        mid = math.sqrt(lo * hi)
        if eps(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi


@dataclasses.dataclass(frozen=True)
class Segment:
    """``steps`` DP-SGD steps with one noise multiplier, sample rate and sampler.

    ``discrete`` describes distributed discrete noise (each SecAgg party adds Skellam or
    discrete Gaussian noise; :mod:`dpjax.rdp`): ``noise``, ``party_noise``,
    ``num_parties`` (honest survivors), ``l1_sensitivity``, ``l2_sensitivity``, ``dim``,
    in integer units. ``None``: the Gaussian mechanism with ``noise_multiplier``.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    sampling: str = "poisson"
    num_examples: int | None = None
    discrete: dict | None = None


@dataclasses.dataclass(frozen=True)
class Ledger:
    """The steps a run took, as plain numbers: composes heterogeneous segments.

    Immutable: :meth:`record` returns a new ledger. :meth:`to_dict` /
    :meth:`from_dict` round-trip it through JSON for checkpoints.
    """

    segments: tuple[Segment, ...] = ()

    def record(
        self,
        noise_multiplier: float,
        sample_rate: float,
        steps: int = 1,
        sampling: str = "poisson",
        num_examples: int | None = None,
        *,
        discrete: dict | None = None,
    ) -> Ledger:
        _check(noise_multiplier, sample_rate, steps, "rdp", sampling, num_examples)
        seg = Segment(float(noise_multiplier), float(sample_rate), 0, sampling, num_examples,
                      discrete)
        if self.segments and dataclasses.replace(self.segments[-1], steps=0) == seg:
            last = self.segments[-1]
            merged = dataclasses.replace(last, steps=last.steps + steps)
            return Ledger(self.segments[:-1] + (merged,))
        return Ledger(self.segments + (dataclasses.replace(seg, steps=steps),))

    @property
    def steps(self) -> int:
        return sum(s.steps for s in self.segments)

    def dp_event(self) -> dp_accounting.DpEvent:
        return dp_accounting.ComposedDpEvent(
            [
                dp_accounting.SelfComposedDpEvent(
                    _step_event(s.noise_multiplier, s.sample_rate, s.sampling, s.num_examples),
                    s.steps,
                )
                for s in self.segments
                if s.steps > 0
            ]
        )

    def epsilon(self, delta: float, accountant: str = "rdp") -> float:
        """Epsilon of every recorded step at ``delta`` (0 before the first step)."""
        _validate.delta("delta", delta)
        _validate.one_of("accountant", accountant, ACCOUNTANTS)
        samplings = {s.sampling for s in self.segments if s.steps > 0}
        if len(samplings) > 1:
            raise ValueError(
                f"Expected one sampling scheme per ledger; got {sorted(samplings)} "
                "(their neighbouring relations differ)."
            )
        for s in self.segments:
            _check(s.noise_multiplier, s.sample_rate, s.steps, accountant, s.sampling,
                   s.num_examples)
            _warn_delta(delta, s.num_examples)
        if self.steps == 0:
            return 0.0
        kinds = {s.discrete is not None for s in self.segments if s.steps > 0}
        if len(kinds) > 1:
            raise ValueError("Expected a ledger of Gaussian or of distributed discrete noise "
                             "steps, not both.")
        if kinds == {True}:
            return self._discrete_epsilon(delta, accountant)
        if any(s.noise_multiplier == 0 for s in self.segments if s.steps > 0):
            return math.inf
        acc = _accountant(accountant, samplings.pop())
        acc.compose(self.dp_event())
        return float(acc.get_epsilon(delta))

    def _discrete_epsilon(self, delta: float, accountant: str) -> float:
        """RDP of the discrete-noise steps (Skellam / distributed discrete Gaussian, with a
        Poisson subsampling bound for symmetric noise: ``dpjax.rdp.step_rdp``), composed and
        converted at ``delta``."""
        import dpjax.rdp as rdp  # noqa: PLC0415  (scipy, only for these runs)

        if Accountant(accountant) is not Accountant.RDP:
            raise ValueError(f"Expected accountant='rdp' for distributed discrete noise; got "
                             f"{accountant!r} (no PLD of these mechanisms is implemented).")
        curve = sum(s.steps * rdp.step_rdp(s.discrete["party_noise"], s.sample_rate,
                                           noise=s.discrete["noise"],
                                           num_parties=s.discrete["num_parties"],
                                           l1_sensitivity=s.discrete["l1_sensitivity"],
                                           l2_sensitivity=s.discrete["l2_sensitivity"],
                                           dim=s.discrete["dim"])
                    for s in self.segments if s.steps > 0)
        return float(rdp.rdp_to_epsilon(rdp.DEFAULT_ORDERS, curve, delta))

    def to_dict(self) -> dict:
        return {"segments": [dataclasses.asdict(s) for s in self.segments]}

    @classmethod
    def from_dict(cls, d: dict) -> Ledger:
        return cls(tuple(Segment(**s) for s in d["segments"]))


def max_steps(
    ledger: Ledger,
    noise_multiplier: float,
    sample_rate: float,
    max_epsilon: float,
    delta: float,
    accountant: str = "rdp",
    sampling: str = "poisson",
    num_examples: int | None = None,
    limit: int = 10**7,
) -> int:
    """How many more steps of this kind keep the ledger's epsilon <= ``max_epsilon``.

    Used to stop training *before* the step that would cross a budget.
    """
    _validate.positive("max_epsilon", max_epsilon)

    def eps(k):
        if k == 0:
            return ledger.epsilon(delta, accountant)
        return ledger.record(noise_multiplier, sample_rate, k, sampling, num_examples).epsilon(
            delta, accountant
        )

    if eps(0) > max_epsilon:
        return 0
    lo, hi = 0, 1
    while hi < limit and eps(hi) <= max_epsilon:
        lo, hi = hi, min(2 * hi, limit)
    if eps(hi) <= max_epsilon:
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if eps(mid) <= max_epsilon:
            lo = mid
        else:
            hi = mid
    return lo


def check_delta(delta: float, num_examples: int | None = None) -> None:
    """Validates ``delta`` in (0, 1) and warns when it is not well below 1/N."""
    _validate.delta("delta", delta)
    _warn_delta(delta, num_examples)


__all__: Sequence[str] = (
    "ACCOUNTANTS",
    "SAMPLINGS",
    "Ledger",
    "Segment",
    "calibrate_noise_multiplier",
    "check_delta",
    "epsilon",
    "max_steps",
)
