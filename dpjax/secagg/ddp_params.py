"""Distributed-DP parameters chosen for the user: scale ``gamma``, per-party noise, sensitivities.

Given the central noise multiplier ``sigma`` the accountant is told, the
parties per round ``n``, the honest survivors ``h`` whose noise alone must
carry the claim, the dimension, ``bits``, the clip norm ``C`` and the
per-party L2 bound ``c_p`` (``m C`` for a party of ``m`` rows at example
level, ``C`` at user level), :func:`choose_parameters` picks the largest
``gamma`` (integer units per 1.0) such that

- the total noise of ``h`` honest parties has standard deviation
  ``sigma * l2_sensitivity`` in integer units, where ``l2_sensitivity``
  already includes the rounding's inflation (below): per party variance
  ``(sigma * l2_sensitivity)^2 / h`` (Skellam ``mu``, or DG ``sigma_p^2``);
- the probability that any coordinate of the decoded sum wraps is at most
  ``wrap_probability`` (:mod:`dpjax.secagg.wrap`, for up to ``n`` arriving
  parties);
- the samplers stay exact (per-party noise std ``<= 2^19``) and the scaled
  vectors fit int32 (``gamma c_p < 2^30``).

Sensitivities, in integer units, for the add/remove (zero-out) relation of
one unit of privacy (double both for replace-one):

- ``unit="user"`` (a party is a user): the party's whole rounded vector.
  Conditional rounding guarantees ``||v||_2 <= B`` with
  ``B = conditional_rounding_bound(gamma C', D, beta_r)`` and ``C'`` the
  bound ``C`` inflated by the float32 rotation error; a party that fails
  ``max_rounding_tries`` sends the zero vector (noise only), still ``<= B``.
  ``l2 = B``, ``l1 = min(B^2, sqrt(D) B)`` (``||v||_1 <= ||v||_2^2`` for
  integer vectors).
- ``unit="example"`` (a party holds a block of rows): one example changes
  its party's scaled, rotated vector by ``delta`` with ``||delta|| <= gamma C``.
  Plain randomized rounding is ``v = ceil(y - U)`` for uniforms ``U`` drawn
  independently of the data, so for the same ``U`` each coordinate moves by
  at most ``ceil(|delta_i|) <= |delta_i| + 1``: ``l2 = gamma C + sqrt(D)``
  (plus the float32 rotation error of both vectors), ``l1 = min(l2^2,
  sqrt(D) l2)``. The guarantee holds for every fixed ``U``, hence for the
  mixture (Renyi divergence is jointly quasi-convex). Conditional rounding
  is *not* used at example level: (1) its retries decouple ``x`` and ``x'``
  (they may accept on different tries), so only the support bound
  ``|v_i - v'_i| <= ceil(|delta_i|) + 1`` survives (``l2 = gamma C + 2 sqrt(D)``),
  and (2) its failure fallback is data dependent: ``x`` may fail where
  ``x'`` succeeds, moving the party's message by its whole vector (up to
  ``B ~ gamma m C``), an event whose probability would have to be charged
  as a ``delta`` outside the RDP accounting. Plain rounding is bounded
  anyway (``||v|| <= ||y|| + sqrt(D)``), which is all the wrap bound needs.

What the accountant needs (:meth:`DDPParams.accountant_args`): the L2 and
L1 sensitivities in integer units, the per-party noise parameter and the
number of honest parties ``h`` (Skellam: the total ``mu = h mu_p``; DG:
``sigma_p`` and ``num_parties = h``, plus ``dim = D`` for the ``tau`` term).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any

import dpjax._validate as _validate
import dpjax.secagg.rotation as rotation_lib
from dpjax.secagg.discrete import MAX_NOISE_STD
from dpjax.secagg.modular import check_bits
from dpjax.secagg.rounding import ROUNDING_BIAS, conditional_rounding_bound
from dpjax.secagg.wrap import wrap_probability_bound

INT32_SAFE = 2.0**30


class NoRoomForNoise(ValueError):
    """No scale ``gamma`` keeps the wrap-around probability within its target at these
    ``bits``: the noise (with the signal) does not fit the modulus. More noise never fits
    better, so a calibration can search below the noise that raised it."""


class Noise(enum.StrEnum):
    """Per-party discrete noise; decides the accountant's event."""

    SKELLAM = "skellam"
    DDGAUSS = "ddgauss"


class Unit(enum.StrEnum):
    """Unit of privacy: what one neighbouring dataset changes."""

    EXAMPLE = "example"
    USER = "user"


@dataclasses.dataclass(frozen=True)
class DDPParams:
    """Everything one distributed-DP round needs, chosen by :func:`choose_parameters`.

    Integer units throughout, except ``l2_clip_norm`` / ``party_l2_bound``
    (float units of the update) and ``gamma`` (integer units per 1.0).
    """

    noise: Noise
    unit: Unit
    rotation: rotation_lib.Rotation
    bits: int
    dim: int
    padded_dim: int
    num_parties: int
    min_honest_survivors: int
    noise_multiplier: float
    l2_clip_norm: float
    party_l2_bound: float
    gamma: float
    gamma_limited_by: str  # "wrap", "noise_sampler_range" or "int32_range"
    l2_sensitivity: float
    l1_sensitivity: float
    party_noise_variance: float  # Skellam mu_p, or the DG's sigma_p^2
    rounding_l2_bound: float | None  # user level: conditional rounding's B (= l2_sensitivity)
    rounding_beta: float | None
    max_rounding_tries: int
    wrap_probability_target: float
    wrap_probability_bound: float
    # user level: the bound for a round whose parties hold up to max_units_per_party users
    # each (more sampled users than slots, ~0.1% of rounds; utility, not privacy)
    max_units_per_party: int = 1
    wrap_probability_bound_overflow: float | None = None

    @property
    def skellam_mu(self) -> float | None:
        """Per-party Skellam parameter ``mu_p`` (its variance), or None."""
        return self.party_noise_variance if self.noise is Noise.SKELLAM else None

    @property
    def ddg_sigma(self) -> float | None:
        """Per-party discrete Gaussian ``sigma_p``, or None."""
        return math.sqrt(self.party_noise_variance) if self.noise is Noise.DDGAUSS else None

    @property
    def noise_inflation(self) -> float:
        """``l2_sensitivity / (gamma C)``: noise std relative to the float-domain mechanism's."""
        return self.l2_sensitivity / (self.gamma * self.l2_clip_norm)

    @property
    def rotation_shift(self) -> float:
        """Bound on one party's per-coordinate float32 rotation error (integer units)."""
        scaled = self.gamma * self.party_l2_bound
        return rotation_lib.float_error_bound(self.dim, self.rotation) * scaled

    def accountant_args(self) -> dict[str, Any]:
        """Keyword arguments for the RDP accountant of this noise (``dpjax.rdp``)."""
        h = self.min_honest_survivors
        common = dict(l1_sensitivity=self.l1_sensitivity, l2_sensitivity=self.l2_sensitivity)
        if self.noise is Noise.SKELLAM:
            return dict(mu=h * self.party_noise_variance, **common)
        return dict(sigma=math.sqrt(self.party_noise_variance), num_parties=h,
                    dim=self.padded_dim, **common)  # fmt: skip

    def summary(self) -> dict[str, Any]:
        """JSON-ready values for ``summary.json``."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out.update(noise=str(self.noise), unit=str(self.unit), rotation=str(self.rotation),
                   noise_inflation=self.noise_inflation)  # fmt: skip
        return out


def _sensitivities(gamma, *, unit, clip, party_bound, size, rel_float, rounding_beta):
    """``(l2, l1, B)`` in integer units at this ``gamma`` (see the module docstring)."""
    if unit is Unit.USER:
        c = gamma * party_bound * (1 + rel_float) + math.sqrt(size) * ROUNDING_BIAS
        bound = conditional_rounding_bound(c, size, rounding_beta)
        l2 = bound
    else:
        bound = None
        l2 = gamma * clip + math.sqrt(size) + 2 * rel_float * gamma * party_bound
    return l2, l2 * min(l2, math.sqrt(size)), bound


def _gamma_guess(sigma, clip, party_bound, size, n, h, bits) -> float:
    """Where the Gaussian approximation puts 6 standard deviations of the sum at ``2^(bits-1)``."""
    per_gamma = math.sqrt(n * sigma**2 * clip**2 / h + n**2 * party_bound**2 / size)
    return max(2.0 ** (bits - 1) / 6 - sigma * math.sqrt(n * size / h), 1.0) / per_gamma


def _bracket(feasible, tiny: float, guess: float) -> tuple[float, float]:
    """``(low, high)`` with ``feasible(low)`` and not ``feasible(high)`` (``feasible(tiny)``)."""
    if feasible(guess):
        low = guess
        while feasible(low * 2):
            low *= 2
        return low, low * 2
    high = guess
    while high / 2 > tiny and not feasible(high / 2):
        high /= 2
    return max(high / 2, tiny), high


def choose_parameters(
    *,
    noise_multiplier: float,
    l2_clip_norm: float,
    party_l2_bound: float,
    dim: int,
    num_parties: int,
    min_honest_survivors: int,
    bits: int,
    unit: Unit | str,
    noise: Noise | str,
    wrap_probability: float = 1e-4,
    rotation: rotation_lib.Rotation | str = rotation_lib.Rotation.HADAMARD,
    rounding_beta: float = 1e-4,
    max_rounding_tries: int = 4,
    max_units_per_party: int = 1,
) -> DDPParams:
    """The largest ``gamma`` meeting the claim and the wrap target at ``bits``, with its noise.

    Args:
      noise_multiplier: central ``sigma``: the honest parties' total noise has
        std ``sigma * l2_sensitivity`` in integer units.
      l2_clip_norm: ``C``, the per-example (or per-user) clip norm.
      party_l2_bound: bound on one party's float vector (``m C`` or ``C``).
      dim: ``d``, coordinates of the update.
      num_parties: ``n``, parties per round (all may arrive).
      min_honest_survivors: ``h <= n``; only their noise counts for privacy.
      bits: modulus ``2^bits``, 8..32.
      unit: ``"example"`` or ``"user"`` (sets sensitivities and rounding).
      noise: ``"skellam"`` or ``"ddgauss"``.
      wrap_probability: target ``beta`` for ``P(any coordinate wraps)`` per round.
      rotation: ``"hadamard"`` or ``"dft"``.
      rounding_beta, max_rounding_tries: conditional rounding (user level).
      max_units_per_party: user level: the most users a party (slot) can hold in a round
        with more sampled users than slots (each rounded on its own). ``gamma`` meets
        the wrap target for one user per party; the bound for this many is reported as
        ``wrap_probability_bound_overflow``.

    Raises:
      ValueError: bad arguments, or no ``gamma`` meets the target at ``bits``
        (the message names the smallest ``bits`` that would).
    """
    _validate.positive("noise_multiplier", noise_multiplier)
    _validate.positive("l2_clip_norm", l2_clip_norm)
    _validate.positive("party_l2_bound", party_l2_bound)
    _validate.positive_int("dim", dim)
    _validate.positive_int("num_parties", num_parties)
    _validate.positive_int("min_honest_survivors", min_honest_survivors)
    _validate.positive_int("max_rounding_tries", max_rounding_tries)
    _validate.positive_int("max_units_per_party", max_units_per_party)
    check_bits(bits)
    if min_honest_survivors > num_parties:
        raise ValueError(f"Expected min_honest_survivors={min_honest_survivors} <= "
                         f"num_parties={num_parties}.")  # fmt: skip
    if party_l2_bound < l2_clip_norm:
        raise ValueError(f"Expected party_l2_bound={party_l2_bound} >= l2_clip_norm="
                         f"{l2_clip_norm}: a party holds at least one unit.")  # fmt: skip
    if not 0 < wrap_probability < 1:
        raise ValueError(f"Expected wrap_probability={wrap_probability} in (0, 1).")
    if not 0 < rounding_beta < 1:
        raise ValueError(f"Expected rounding_beta={rounding_beta} in (0, 1).")
    _validate.one_of("unit", unit, tuple(Unit))
    _validate.one_of("noise", noise, tuple(Noise))
    _validate.one_of("rotation", rotation, tuple(rotation_lib.Rotation))
    unit, noise, rotation = Unit(unit), Noise(noise), rotation_lib.Rotation(rotation)
    size = rotation_lib.padded_dim(dim, rotation)
    rel_float = rotation_lib.float_error_bound(dim, rotation)
    conditional = unit is Unit.USER
    beta_r = rounding_beta if conditional else None
    tries = max_rounding_tries if conditional else 1

    def evaluate(gamma: float, at_bits: int) -> tuple[str | None, tuple]:
        l2, l1, bound = _sensitivities(
            gamma, unit=unit, clip=l2_clip_norm, party_bound=party_l2_bound, size=size,
            rel_float=rel_float, rounding_beta=rounding_beta,
        )  # fmt: skip
        variance = (noise_multiplier * l2) ** 2 / min_honest_survivors
        sampler_std = math.sqrt(variance / 2) if noise is Noise.SKELLAM else math.sqrt(variance)
        if sampler_std > MAX_NOISE_STD:
            return "noise_sampler_range", ()
        if gamma * party_l2_bound * (1 + rel_float) + 1 >= INT32_SAFE:
            return "int32_range", ()
        wrap = wrap_at(gamma, at_bits, variance, 1)
        if wrap > wrap_probability:
            return "wrap", ()
        return None, (l2, l1, bound, variance, wrap)

    def wrap_at(gamma: float, at_bits: int, variance: float, units: int) -> float:
        party_noise = variance if noise is Noise.SKELLAM else math.sqrt(variance)
        return wrap_probability_bound(
            bits=at_bits, padded_dim=size, num_parties=num_parties,
            party_signal_norm=gamma * party_l2_bound * (1 + rel_float),
            flatness=rotation_lib.flatness(rotation), noise=str(noise), party_noise=party_noise,
            shift_per_party=rel_float * gamma * party_l2_bound, rounding_beta=beta_r,
            max_rounding_tries=tries, units_per_party=units,
        )  # fmt: skip

    tiny = 1e-9 / party_l2_bound
    if evaluate(tiny, bits)[0] is not None:
        working = next((b for b in range(bits + 1, 33) if evaluate(tiny, b)[0] is None), None)
        hint = (
            f"the smallest bits that would is {working}"
            if working is not None
            else "no bits <= 32 would: lower the noise, dim or the parties per round"
        )
        raise NoRoomForNoise(
            f"Expected bits={bits} to leave room for the noise: no gamma keeps the wrap-around "
            f"probability <= {wrap_probability} (d={dim}, n={num_parties}, noise_multiplier="
            f"{noise_multiplier}); {hint}."
        )
    low, high = _bracket(lambda g: evaluate(g, bits)[0] is None, tiny, _gamma_guess(
        noise_multiplier, l2_clip_norm, party_l2_bound, size, num_parties,
        min_honest_survivors, bits,
    ))  # fmt: skip
    while high / low > 1 + 1e-4:  # bisection in log scale
        mid = math.sqrt(low * high)
        low, high = (mid, high) if evaluate(mid, bits)[0] is None else (low, mid)
    limited_by = evaluate(high, bits)[0]
    l2, l1, bound, variance, wrap = evaluate(low, bits)[1]
    return DDPParams(
        noise=noise, unit=unit, rotation=rotation, bits=bits, dim=dim, padded_dim=size,
        num_parties=num_parties, min_honest_survivors=min_honest_survivors,
        noise_multiplier=float(noise_multiplier), l2_clip_norm=float(l2_clip_norm),
        party_l2_bound=float(party_l2_bound), gamma=low, gamma_limited_by=limited_by,
        l2_sensitivity=l2, l1_sensitivity=l1, party_noise_variance=variance,
        rounding_l2_bound=bound, rounding_beta=beta_r, max_rounding_tries=tries,
        wrap_probability_target=float(wrap_probability), wrap_probability_bound=wrap,
        max_units_per_party=max_units_per_party,
        wrap_probability_bound_overflow=(wrap_at(low, bits, variance, max_units_per_party)
                                         if max_units_per_party > 1 else None),
    )  # fmt: skip
