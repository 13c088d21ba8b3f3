"""The mechanism audit (``audit=step``): one step of the real mechanism, many times.

For the configured run (model, data, clipping path, aggregation, devices), the
audit builds the same step a training run would -- the same mechanism parts, the
same clipped-sum code, SecAgg round and privatizer -- with SGD at learning rate 1
as the optimizer (the optimizer is post-processing; the audit looks at the
privatized gradient itself, the strongest view a white-box auditor can have).
Two neighbouring physical batches differ in one canary row (the last):

- add/remove-one (Poisson sampling): the canary row is present (``in``) or masked out;
- replace-one (fixed-size batches): a Dirac canary ``+e_j`` (``in``) or its
  anti-canary ``-e_j`` (``out``).

Each world's clipped sum is computed once by the step's own code (it is
deterministic); the aggregation round and the privatizer then run ``R`` times
per world as one vmapped program over the step index (each trial is a fresh step
of the same state: fresh noise and rounding). Each release is scored white-box:
its projection, after subtracting the clipped sum of the other rows (known to
the auditor), on the direction of the canary's clipped gradient. The scores give
an epsilon lower bound (:mod:`dpjax.audit.stats`) next to the mechanism's exact
one-step claim without subsampling: the Gaussian mechanism with
``mu = sensitivity / noise_std`` converted to epsilon at delta by the GDP formula
(not an RDP bound, which is looser and would hide an error of several percent).

``gdp`` decides whether the claim holds: every privatizer today adds Gaussian
noise, so the projected releases are Gaussian (SecAgg's stochastic rounding
moves the projection by at most ``sqrt(d) / scale``, negligible against the
noise and covered by the claim's sensitivity). ``clopper_pearson``, valid for any
mechanism but far weaker at this R, is reported beside it; paths with integer
noise make it the deciding statistic.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import dpjax.accounting as accounting
import dpjax.audit.canaries as canaries
import dpjax.audit.stats as stats
import dpjax.distributed as distributed
import dpjax.randomness as randomness
from dpjax.assembly import Parts, step_of
from dpjax.audit.gdp import gdp_epsilon
from dpjax.choices import Relation
from dpjax.clipping import clipped_grad
from dpjax.config import RunConfig
from dpjax.train import DPStep, init_state

PyTree = Any
TRIAL_BLOCK = 250  # trials per vmapped block: bounds memory to this many parameter copies
SHARPNESS_NOISE_RATIO = 1.15  # the audit should catch a noise this much too small


@dataclasses.dataclass(frozen=True)
class StepAudit:
    """The result of a step audit (the fields of ``audit.json``)."""

    method: str  # the statistic that decided ``consistent``
    epsilon_claimed: float
    epsilon_lower_bound: float
    delta: float
    trials: int
    consistent: bool
    mu_claimed: float
    epsilon_lower_bound_gdp: float
    epsilon_lower_bound_clopper_pearson: float
    canary: dict[str, Any]
    relation: str
    confidence: float  # a correct mechanism exceeds its claim with probability <= 1 - this
    # Could this audit have caught a noise 15% too small? The claim the same mechanism would
    # make with 1.15x the noise (exact for Gaussian noise; for distributed noise its RDP
    # claim at 1.15x the noise), and whether the lower bound exceeds it.
    epsilon_claimed_at_1_15_noise: float
    sharp: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _flat(tree) -> jax.Array:
    return jnp.concatenate([jnp.ravel(a).astype(jnp.float32)
                            for a in jax.tree_util.tree_leaves(tree)])


@dataclasses.dataclass(frozen=True)
class Worlds:
    """The neighbouring batches, the canary's clipped direction and how it was made."""

    loss_fn: Any
    batch_in: PyTree
    batch_out: PyTree
    mask_in: np.ndarray
    mask_out: np.ndarray
    mask_others: np.ndarray  # the canary row masked: the rows the auditor knows
    direction: jax.Array  # unit vector of the canary's clipped gradient
    canary: dict[str, Any]


def make_worlds(parts: Parts, kind: str, seed: int) -> Worlds:
    """Real training rows (the first ``physical - 1``) plus the canary row last.

    The rows are fixed, not sampled: the canary's presence flips only its own mask, in the
    last party's block (SecAgg, distributed noise), and moves no other row, which is the
    shard layout's guarantee (:class:`~dpjax.sampling.PoissonSampler` with parties)."""
    task, mechanism = parts.task, parts.mechanism
    rows = parts.physical_batch_size - 1
    if not 1 <= rows <= len(task.x_train):
        raise ValueError(f"Expected a physical batch of 2 to {len(task.x_train) + 1} rows for "
                         f"the step audit; got {parts.physical_batch_size}.")
    x, y = task.x_train[:rows], task.y_train[:rows]
    mask_in = np.ones(rows + 1, np.float32)
    mask_others = mask_in.copy()
    mask_others[-1] = 0.0
    replace = mechanism.relation is Relation.REPLACE_ONE
    if kind == "dirac" or replace:
        loss, direction = canaries.dirac_loss(task.loss_fn, task.params)
        xs, ys = np.concatenate([x, x[:1]]), np.concatenate([y, y[:1]])
        sign_in, sign_out = np.zeros(rows + 1, np.float32), np.zeros(rows + 1, np.float32)
        sign_in[-1], sign_out[-1] = 1.0, (-1.0 if replace else 0.0)
        return Worlds(loss, (xs, ys, sign_in), (xs, ys, sign_out), mask_in,
                      mask_in if replace else mask_others, mask_others, _flat(direction),
                      {"kind": "dirac", "magnitude": canaries.DIRAC_MAGNITUDE})
    canary = canaries.input_canary(task.loss_fn, task.params, task.x_train, task.y_train,
                                   task.num_classes, seed,
                                   logits_fn=lambda p, v: task.apply_fn({"params": p}, v))
    batch = (np.concatenate([x, canary.x[None]]), np.concatenate([y, canary.y[None]]))
    clipped, _ = clipped_grad(task.loss_fn, l2_clip_norm=mechanism.clipped.l2_clip_norm)(
        task.params, (jnp.asarray(canary.x[None]), jnp.asarray(canary.y[None])), jnp.ones(1))
    g = _flat(clipped)
    info = {"kind": canary.kind, "source_index": canary.source_index,
            "grad_norm": canary.grad_norm, "clipped_norm": float(jnp.linalg.norm(g))}
    return Worlds(task.loss_fn, batch, batch, mask_in, mask_others, mask_others,
                  g / jnp.maximum(jnp.linalg.norm(g), 1e-30), info)


def _place(parts: Parts, batch, mask):
    if parts.mesh is None:
        return jax.tree_util.tree_map(jnp.asarray, batch), jnp.asarray(mask)
    return distributed.global_batch((batch, mask), parts.mesh, len(mask))


def _local(tree, parts: Parts):
    """On a mesh, the whole (gathered) array on the default device: the trials run there."""
    if parts.mesh is None:
        return tree
    return jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a)), tree)


def world_partial(step: DPStep, parts: Parts, params, batch, mask, num_chunks: int):
    """A world's partial by the step's own clipped-sum code, over ``num_chunks`` chunks
    (placed on the mesh when there is one)."""
    n = len(mask)
    if n % num_chunks:
        raise ValueError(f"Expected audit.chunks={num_chunks} to divide the physical batch "
                         f"of {n} rows.")
    size = n // num_chunks
    chunks = [_place(parts, jax.tree_util.tree_map(lambda a, i=i: a[i * size:(i + 1) * size],
                                                   batch), mask[i * size:(i + 1) * size])
              for i in range(num_chunks)]
    partial, stats_ = step.clipped_sum(params, *chunks[0])
    for b, m in chunks[1:]:
        partial, stats_ = step.accumulate(params, partial, stats_, b, m)
    return _local(partial, parts)


def _release_block(step: DPStep, num_chunks: int, expected_batch_size: float):
    """The jitted scorer of a block of trials. The state (with its noise secret), the
    partial and the round input are arguments, never closed over: the audit's secret is
    not baked into the compiled program (or the persistent compilation cache), and one
    compiled program serves every seed and both worlds."""

    def block(state, partial, round_input, others, direction, steps):
        params_flat = _flat(state.params)

        def one(t):
            s = state.replace(step=t)
            new = step.parts.apply(s, step.parts.aggregate(s, partial, round_input, num_chunks))
            release = (params_flat - _flat(new.params)) * expected_batch_size  # lr = 1
            return jnp.dot(release - others, direction)

        return jax.vmap(one)(steps)

    return jax.jit(block)


def _run_blocks(block, state, partial, round_input, offset: int, trials: int, others,
                direction) -> np.ndarray:
    return np.concatenate([
        np.asarray(block(state, partial, round_input, others, direction,
                         jnp.arange(offset + i, offset + min(i + TRIAL_BLOCK, trials),
                                    dtype=jnp.int32)))
        for i in range(0, trials, TRIAL_BLOCK)])


def release_scores(step: DPStep, state, partial, round_input, num_chunks: int, offset: int,
                   trials: int, others: jax.Array, direction: jax.Array,
                   expected_batch_size: float) -> np.ndarray:
    """Scores of ``trials`` releases of one world, at steps ``offset, offset + 1, ...``:
    each runs the step's aggregation round and privatized update afresh."""
    block = _release_block(step, num_chunks, expected_batch_size)
    return _run_blocks(block, state, partial, round_input, offset, trials, others, direction)


def one_step_claim(mechanism, delta: float, noise_scale: float = 1.0) -> float:
    """The mechanism's own claim for one step without subsampling, at ``delta``.

    Gaussian noise: exact, the GDP epsilon of ``mu = sensitivity / noise_std``.
    Distributed discrete noise: what its accountant claims for one step at sample
    rate 1 (the RDP of the Skellam / distributed discrete Gaussian mechanism,
    converted): an upper bound that is not exact, since no exact privacy profile of
    these mechanisms is implemented. ``noise_scale``: the claim the same mechanism
    would make with its noise standard deviation times ``noise_scale`` (same
    sensitivity; for sharpness).
    """
    if not mechanism.distributed:
        return gdp_epsilon(mechanism.sensitivity() / mechanism.noise_std / noise_scale, delta)
    segment = dataclasses.replace(mechanism, sample_rate=1.0).segment(1)
    discrete = dict(segment.discrete)
    # Skellam's party noise is a variance, the discrete Gaussian's a standard deviation
    discrete["party_noise"] *= noise_scale**2 if discrete["noise"] == "skellam" else noise_scale
    segment = dataclasses.replace(segment, discrete=discrete)
    return accounting.Ledger((segment,)).epsilon(delta, "rdp")


@dataclasses.dataclass(frozen=True)
class StepScores:
    """One seed's releases, scored: ``in`` / ``out`` world, and the canary used."""

    in_scores: np.ndarray
    out_scores: np.ndarray
    canary: dict[str, Any]


class StepAuditor:
    """The configured mechanism's step, built once, scored on any audit seed.

    One seed: a canary (chosen with the seed), a fresh noise secret
    (``randomness.run_secret(dp.randomness, seed)``) and ``trials`` releases per world.
    The jitted scorer takes the state and inputs as arguments, so every seed and
    both worlds run the same compiled program (a seed study pays compilation once).
    """

    def __init__(self, cfg: RunConfig, parts: Parts, *, canary: str, chunks: int = 1):
        if parts.mechanism is None:
            raise ValueError("Expected dp.enabled=true: the step audit tests a DP mechanism.")
        self.cfg, self.parts, self.canary_kind, self.chunks = cfg, parts, canary, chunks
        self.mechanism = parts.mechanism
        self.sgd = optax.sgd(1.0)
        # loss_fn -> (step, its jitted scorer); input canaries share one loss_fn, each Dirac
        # canary brings its own
        self._steps: dict[Any, tuple[DPStep, Any]] = {}

    def _step(self, loss_fn) -> tuple[DPStep, Any]:
        if loss_fn not in self._steps:
            step = step_of(self.cfg, self.parts, self.sgd, loss_fn=loss_fn)
            self._steps[loss_fn] = (step, _release_block(step, self.chunks,
                                                         self.mechanism.expected_batch_size))
        return self._steps[loss_fn]

    def scores(self, seed: int, trials: int) -> StepScores:
        """``trials`` scored releases per world at audit seed ``seed``."""
        parts, chunks = self.parts, self.chunks
        worlds = make_worlds(parts, self.canary_kind, seed)
        step, block = self._step(worlds.loss_fn)
        state = init_state(parts.task.params, self.sgd,
                           secret=randomness.run_secret(self.cfg.dp.randomness, seed),
                           privatizer=self.mechanism.privatizer())
        placed = distributed.replicate(state, parts.mesh) if parts.mesh is not None else state
        partial_others = world_partial(step, parts, placed.params, worlds.batch_out,
                                       worlds.mask_others, chunks)
        others = _flat(jax.tree_util.tree_map(
            lambda a: a.sum(0) if step.aggregation.partial_sharded else a, partial_others))
        round_input = step.prepare(state.step)
        scores = []
        for offset, batch, mask in ((0, worlds.batch_in, worlds.mask_in),
                                    (trials, worlds.batch_out, worlds.mask_out)):
            partial = world_partial(step, parts, placed.params, batch, mask, chunks)
            scores.append(_run_blocks(block, state, partial, round_input, offset, trials,
                                      others, worlds.direction))
        return StepScores(scores[0], scores[1], worlds.canary)

    def audit(self, seed: int, trials: int, *, delta: float, confidence: float) -> StepAudit:
        """The step audit at one seed (see the module docstring)."""
        return self.judge(self.scores(seed, trials), delta=delta, confidence=confidence)

    def judge(self, scored: StepScores, *, delta: float, confidence: float) -> StepAudit:
        """The bounds of scored releases against the mechanism's one-step claim."""
        trials = scored.in_scores.size
        mechanism = self.mechanism
        mu_claimed = mechanism.sensitivity() / mechanism.noise_std
        eps_claimed = one_step_claim(mechanism, delta)
        more_noise = float(one_step_claim(mechanism, delta, SHARPNESS_NOISE_RATIO))
        kw = dict(delta=delta, confidence=confidence)
        eps_gdp = stats.epsilon_lower_bound(scored.in_scores, scored.out_scores, method="gdp",
                                            **kw)
        eps_cp = stats.epsilon_lower_bound(scored.in_scores, scored.out_scores,
                                           method="clopper_pearson", **kw)
        return StepAudit(method="gdp", epsilon_claimed=float(eps_claimed),
                         epsilon_lower_bound=float(eps_gdp), delta=delta, trials=trials,
                         consistent=bool(eps_gdp <= eps_claimed), mu_claimed=float(mu_claimed),
                         epsilon_lower_bound_gdp=float(eps_gdp),
                         epsilon_lower_bound_clopper_pearson=float(eps_cp),
                         canary=scored.canary, relation=str(mechanism.relation),
                         confidence=confidence, epsilon_claimed_at_1_15_noise=more_noise,
                         sharp=bool(eps_gdp > more_noise))


def run_step_audit(cfg: RunConfig, parts: Parts, *, trials: int, seed: int, canary: str,
                   delta: float, confidence: float, chunks: int = 1) -> StepAudit:
    """Audits one step of ``parts.mechanism`` (see the module docstring)."""
    return StepAuditor(cfg, parts, canary=canary, chunks=chunks).audit(
        seed, trials, delta=delta, confidence=confidence)


def audit_from_config(cfg, out_dir) -> dict[str, Any]:
    """``audit=step`` of ``dpjax-audit``: the configured run's mechanism, audited."""
    from dpjax.assembly import assemble_parts  # noqa: PLC0415

    del out_dir
    a = cfg.audit
    result = run_step_audit(cfg, assemble_parts(cfg), trials=a.trials, seed=a.seed,
                            canary=a.canary, delta=a.delta or cfg.dp.delta,
                            confidence=a.confidence, chunks=a.chunks)
    return result.to_dict()
