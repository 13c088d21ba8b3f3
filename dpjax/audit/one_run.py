"""The one-run training audit (``audit=one_run``): one whole training run, m canaries.

Steinke, Nasr, Jagielski (NeurIPS 2023, arXiv:2305.08846): each of m canaries is
included in the training set independently with probability 1/2; after one run
the auditor ranks the canaries by a score, guesses "in" for the highest and "out"
for the lowest, and the number of right guesses bounds epsilon from below
(:func:`dpjax.audit.stats.one_run_epsilon_lower_bound`). The audit, as data flows:

    canaries  = m Dirac rows, or m mislabeled training rows set aside      canaries.py
    included  = one fair coin per canary (stream AUDIT of the audit's secret)
    task      = the other training rows + the included canaries           normal data path
    parts     = assemble_parts(cfg, task)      the mechanism of the dataset really trained on
    for t < planned steps:
        state     = step.run(state, sampler(secret).sample(t))           real step, optimizer
        residual  = privatized sum_t - q * sum_{other rows} clip(grad l_i(theta_t))
        white[c] += LLR(<residual, direction of c at theta_t> / S)     per step, claimed q, sigma
        ledger    = mechanism.record(ledger)
    black[c]  = loss_c(theta_0) - loss_c(theta_T)                          the final model only
    bound     = max(one_run(white), one_run(black)), each at (1 - confidence) / 2

The claim is the run's own ledger at ``audit.delta or dp.delta``, for the steps it
took. Both statistics are valid for any mechanism whose claim holds (the coins are
fair and independent of everything else the run draws); see ``docs/audit.md``,
"One-run audit", for the choice of canaries and scores.
"""

from __future__ import annotations

import dataclasses
import functools
import math
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
from dpjax.assembly import Parts, assemble_parts, step_of
from dpjax.audit.config import validate_audit
from dpjax.clip_math import per_example_grads
from dpjax.clipping import clipped_grad
from dpjax.config import RunConfig, perf
from dpjax.plan import plan_run
from dpjax.task import Task, build_optimizer, build_task
from dpjax.train import init_state

PyTree = Any
KINDS = {"input": "mislabeled", "dirac": "dirac"}  # audit.canary -> the canaries planted
INCLUSION_STREAM = 1  # index of the inclusion coins in the secret's AUDIT stream
PROJECTION_BLOCK = 128  # rows per vmapped block of per-example gradients
REFERENCE_BATCHES = 1  # reference rows per step, in physical batches (all when at most twice)


@dataclasses.dataclass(frozen=True)
class OneRunAudit:
    """The result of a one-run audit (the fields of ``audit.json``)."""

    method: str
    epsilon_claimed: float
    epsilon_lower_bound: float
    delta: float
    consistent: bool
    num_canaries: int
    num_included: int
    canary: str
    canary_seed: int  # which rows (and labels, or coordinates) became canaries
    inclusion_seed: int | None  # None: the coins came from a fresh secret (secure mode)
    confidence: float
    epsilon_lower_bound_white_box: float
    epsilon_lower_bound_black_box: float
    steps: int
    num_train: int  # the training rows the run really trained on (canaries included)
    noise_multiplier: float
    sample_rate: float
    accountant: str
    reference_rows: int  # other rows whose expected clipped sum each step's score subtracts

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Planted:
    """The canaries, their coins, and the task whose training split holds the included ones."""

    canaries: canaries.CanarySet
    included: np.ndarray  # bool [m]
    task: Task
    loss_fn: Any  # the loss of every training row, canary rows included


def inclusion_coins(secret: randomness.Secret, num_canaries: int) -> np.ndarray:
    """One fair coin per canary: the low bit of each word of the stream
    ``(AUDIT, INCLUSION_STREAM)`` of ``secret`` (ChaCha20), independent of the streams the
    run's noise and batches come from."""
    key = randomness.stream_key(secret, randomness.Stream.AUDIT, INCLUSION_STREAM)
    return (randomness.host_words(key, num_canaries) & 1).astype(bool)


def plant(task: Task, kind: str, num_canaries: int, seed: int,
          secret: randomness.Secret) -> Planted:
    """``num_canaries`` canaries of ``kind`` (``"input"`` or ``"dirac"``, chosen with
    ``seed``), each appended to the training split iff its coin from ``secret`` is 1.
    The test and holdout splits are left as they are."""
    if kind not in KINDS:
        raise ValueError(f"Expected audit.canary={kind!r} to be one of {list(KINDS)}.")
    if kind == "dirac":
        chosen = canaries.dirac_canaries(task.x_train, task.y_train, task.num_classes,
                                         task.params, num_canaries, seed)
        loss_fn = canaries.dirac_rows_loss(task.loss_fn, task.num_classes, chosen.coordinates)
    else:
        chosen = canaries.mislabeled_canaries(task.x_train, task.y_train, task.num_classes,
                                              num_canaries, seed)
        loss_fn = task.loss_fn
    included = inclusion_coins(secret, num_canaries)
    x = np.concatenate([task.x_train[chosen.rest], chosen.x[included]])
    y = np.concatenate([task.y_train[chosen.rest], chosen.y[included]])
    return Planted(chosen, included, dataclasses.replace(task, x_train=x, y_train=y), loss_fn)


def recording(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """``optimizer`` whose state also holds the last update it was given: the step's
    privatized gradient. The parameters it produces are ``optimizer``'s, bit for bit."""

    def init(params):
        return optimizer.init(params), jax.tree_util.tree_map(jnp.zeros_like, params)

    def update(updates, state, params=None):
        new, inner = optimizer.update(updates, state[0], params)
        return new, (inner, updates)

    return optax.GradientTransformation(init, update)


def _flat(tree) -> jax.Array:
    return jnp.concatenate([jnp.ravel(a).astype(jnp.float32)
                            for a in jax.tree_util.tree_leaves(tree)])


def _blocks(a: np.ndarray, size: int, fill=None) -> jax.Array:
    """``a`` padded (with its first row, or ``fill``) to a multiple of ``size`` rows and
    reshaped to ``[blocks, size, ...]``."""
    blocks = max(1, -(-len(a) // size))
    pad = blocks * size - len(a)
    extra = a[:1].repeat(pad, 0) if fill is None else np.full((pad,) + a.shape[1:], fill, a.dtype)
    return jnp.asarray(np.concatenate([a, extra]).reshape((blocks, size) + a.shape[1:]))


@dataclasses.dataclass(frozen=True)
class Reference:
    """The other (non-canary) training rows, whose expected clipped sum each step's score
    subtracts: all of them, or a fresh uniform sample of ``rows_per_step`` each step
    (drawn with ``seed``, independent of the coins) scaled up to all of them."""

    x: np.ndarray
    y: np.ndarray
    rows_per_step: int
    seed: int

    def rows(self, step: int):
        """``(x, y, mask)`` blocks of step ``step``'s reference rows and their weight
        ``len(x) / rows`` (1 when all rows are used)."""
        n = len(self.x)
        if self.rows_per_step >= n:
            index = np.arange(n)
        else:
            rng = np.random.default_rng(np.random.SeedSequence(self.seed,
                                                               spawn_key=(0x4EF, step)))
            index = rng.choice(n, size=self.rows_per_step, replace=False)
        size = PROJECTION_BLOCK
        blocks = (_blocks(self.x[index], size), _blocks(self.y[index], size),
                  _blocks(np.ones(len(index), np.float32), size, fill=0.0))
        return blocks, n / len(index)


def step_llr(projections: jax.Array, noise_multiplier: float, sample_rate: float) -> jax.Array:
    """The per-step log-likelihood ratio of "in" against "out" of a canary whose projection
    (in units of the sensitivity) is ``p``, for the claimed mechanism: the canary is in
    the batch with probability q and then adds 1 to a N(0, sigma^2) projection, so the
    ratio is ``log(1 - q + q exp((p - 1/2) / sigma^2))`` (linear in p when q = 1)."""
    var = max(float(noise_multiplier), 1e-6) ** 2
    stay = math.log1p(-sample_rate) if sample_rate < 1 else -math.inf
    return jnp.logaddexp(stay, math.log(sample_rate) + (projections - 0.5) / var)


def _scorer(planted: Planted, mechanism, task_loss_fn, clipping_method: str):
    """``f(scores, params_t, privatized_t, reference blocks, weight) -> scores`` adding the
    step's log-likelihood ratio (:func:`step_llr`) of each canary's projection: the
    privatized sum minus the other rows' expected clipped sum
    ``q * sum_i clip(grad l_i(params_t))``, projected on the canary's direction at
    ``params_t`` (its coordinate for a Dirac canary, its unit gradient for an input
    canary, vmapped in blocks) and divided by the sensitivity. The expected sum depends on
    the public iterate and on rows whose membership is fixed, so the score depends on the
    coins only through the run's output."""
    chosen, m, loss_fn = planted.canaries, len(planted.canaries.y), planted.loss_fn
    scale = 1.0 / mechanism.sensitivity()
    # the other rows are real rows: the task's own loss, by the run's clipping path
    clip_sum = clipped_grad(task_loss_fn, l2_clip_norm=mechanism.clipped.l2_clip_norm,
                            method=clipping_method)
    cx, cy = _blocks(chosen.x, PROJECTION_BLOCK), _blocks(chosen.y, PROJECTION_BLOCK)

    def residual(params, noisy, reference, weight):
        def add(total, block):
            x, y, mask = block
            return jax.tree_util.tree_map(jnp.add, total, clip_sum(params, (x, y), mask)[0]), None

        zero = jax.tree_util.tree_map(jnp.zeros_like, params)
        others = jax.lax.scan(add, zero, reference)[0]
        return (_flat(noisy) * mechanism.expected_batch_size
                - mechanism.sample_rate * weight * _flat(others))

    def project(params, r):
        if chosen.coordinates is not None:
            return r[jnp.asarray(chosen.coordinates)]

        def block(canary_rows):
            grads = per_example_grads(loss_fn, params, canary_rows)
            flat = jnp.concatenate([g.reshape(g.shape[0], -1).astype(jnp.float32)
                                    for g in jax.tree_util.tree_leaves(grads)], axis=1)
            return flat @ r / jnp.maximum(jnp.linalg.norm(flat, axis=1), 1e-30)

        return jax.lax.map(block, (cx, cy)).reshape(-1)[:m]

    @functools.partial(jax.jit, donate_argnums=0)
    def update(scores, params, noisy, reference, weight):
        p = project(params, residual(params, noisy, reference, weight)) * scale
        return scores + step_llr(p, mechanism.noise_multiplier, mechanism.sample_rate)

    return update


def train_and_score(cfg: RunConfig, parts: Parts, planted: Planted, secret: randomness.Secret,
                    reference: Reference):
    """Trains ``parts`` with the run's optimizer and real step for its planned steps (fewer
    if ``dp.max_epsilon`` stops it), the batches and noise from ``secret``. Returns the
    final parameters, each canary's white-box score (summed on device, see
    :func:`_scorer`) and the ledger of the steps taken."""
    mechanism, task = parts.mechanism, parts.task
    optimizer = recording(build_optimizer(cfg.optimizer))
    step = step_of(cfg, parts, optimizer, loss_fn=planted.loss_fn)
    state = init_state(task.params, optimizer, secret=secret, privatizer=mechanism.privatizer())
    if parts.mesh is not None:
        state = distributed.replicate(state, parts.mesh)
    local = distributed.local_copy if parts.mesh is not None else (lambda tree: tree)
    update = _scorer(planted, mechanism, task.loss_fn, perf(cfg).clipping)
    sampler = mechanism.sampler(secret)
    ledger = accounting.Ledger()
    scores = jnp.zeros(len(planted.canaries.y), jnp.float32)
    fixed = reference.rows(0) if reference.rows_per_step >= len(reference.x) else None
    for t in range(plan_run(cfg, parts.steps, mechanism).to_run):
        chunks = distributed.place_chunks(sampler.sample(t), task.x_train, task.y_train,
                                          parts.mesh)
        params_t = local(jax.tree_util.tree_map(jnp.copy, state.params))  # the step donates
        state, _ = step.run(state, chunks)
        rows, weight = fixed or reference.rows(t)
        scores = update(scores, params_t, local(state.opt_state[1]), rows, weight)
        ledger = mechanism.record(ledger)
    return local(state.params), np.asarray(scores, np.float64), ledger


def canary_losses(loss_fn, params: PyTree, chosen: canaries.CanarySet) -> np.ndarray:
    """Each canary row's loss under ``params``."""
    return np.asarray(jax.jit(loss_fn)(params, (jnp.asarray(chosen.x), jnp.asarray(chosen.y))),
                      np.float64)


def run_one_run_audit(cfg: RunConfig, *, num_canaries: int, seed: int, canary: str,
                      delta: float, confidence: float, task: Task | None = None,
                      reference_rows: int | None = None) -> OneRunAudit:
    """Audits the configured training run with ``num_canaries`` canaries (module docstring).

    ``reference_rows``: how many of the other rows each step's white-box score takes the
    expected clipped sum from (default: ``REFERENCE_BATCHES`` physical batches, or all of
    them when they are at most twice that).

    Guarantee: if the run is (epsilon_claimed, delta)-DP, the returned
    ``epsilon_lower_bound`` exceeds epsilon_claimed with probability at most
    ``1 - confidence`` over the coins and the run's randomness.
    """
    if not cfg.dp.enabled:
        raise ValueError("Expected dp.enabled=true: the one-run audit tests a DP mechanism.")
    if canary not in KINDS:
        raise ValueError(f"Expected audit.canary={canary!r} to be one of {list(KINDS)}.")
    if isinstance(num_canaries, bool) or not isinstance(num_canaries, int) or num_canaries < 1:
        raise ValueError(f"Expected num_canaries={num_canaries!r} to be an integer >= 1.")
    if not (0 < delta < 1 and 0 < confidence < 1):
        raise ValueError(f"Expected delta={delta!r} and confidence={confidence!r} in (0, 1).")
    if cfg.dp.sampling != "poisson":
        raise ValueError(f"Expected dp.sampling={cfg.dp.sampling!r} to be 'poisson' for the "
                         "one-run audit: a fixed-size run claims replace-one privacy, and "
                         "including or leaving out a canary is an add/remove change.")
    task = task or build_task(cfg)
    secret = randomness.run_secret(cfg.dp.randomness, seed)
    planted = plant(task, canary, num_canaries, seed, secret)
    parts = assemble_parts(cfg, task=planted.task)
    mechanism = parts.mechanism
    rest = planted.canaries.rest
    rows = reference_rows or REFERENCE_BATCHES * parts.physical_batch_size
    if reference_rows is None and len(rest) <= 2 * rows:
        rows = len(rest)
    reference = Reference(task.x_train[rest], task.y_train[rest], rows, seed)
    final, white, ledger = train_and_score(cfg, parts, planted, secret, reference)
    epsilon_claimed = ledger.epsilon(delta, cfg.dp.accountant)
    black = (canary_losses(planted.loss_fn, task.params, planted.canaries)
             - canary_losses(planted.loss_fn, final, planted.canaries))
    each = 1 - (1 - confidence) / 2  # two statistics, Bonferroni
    bounds = [stats.one_run_epsilon_lower_bound(s, planted.included, delta=delta,
                                                confidence=each) for s in (white, black)]
    lower = max(bounds)
    return OneRunAudit(
        method="one_run", epsilon_claimed=float(epsilon_claimed), epsilon_lower_bound=lower,
        delta=delta, consistent=bool(lower <= epsilon_claimed), num_canaries=num_canaries,
        num_included=int(planted.included.sum()), canary=planted.canaries.kind,
        canary_seed=seed, inclusion_seed=seed if cfg.dp.randomness == "seeded" else None,
        confidence=confidence, epsilon_lower_bound_white_box=bounds[0],
        epsilon_lower_bound_black_box=bounds[1], steps=ledger.steps,
        num_train=len(planted.task.x_train), noise_multiplier=mechanism.noise_multiplier,
        sample_rate=mechanism.sample_rate, accountant=cfg.dp.accountant,
        reference_rows=min(reference.rows_per_step, len(rest)))


def audit_from_config(cfg, out_dir) -> dict[str, Any]:
    """``audit=one_run`` of ``dpjax-audit``: the configured training run, audited."""
    del out_dir
    a = cfg.audit
    task = build_task(cfg)
    validate_audit(cfg, num_train=len(task.x_train))
    result = run_one_run_audit(cfg, num_canaries=a.num_canaries, seed=a.seed, canary=a.canary,
                               delta=a.delta or cfg.dp.delta, confidence=a.confidence, task=task)
    return result.to_dict()
