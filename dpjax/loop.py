"""The training loop: data, model, sampler, DP step, accounting, evaluation, outputs.

``run_training(cfg, out_dir)`` is the whole job behind ``dpjax-train``; it takes
plain dataclasses (``dpjax.config.RunConfig``), no Hydra objects. It writes
``metrics.jsonl`` (one JSON object per logged step) and ``summary.json`` into
``out_dir``.

Note: the training loss and realized batch size logged to ``metrics.jsonl``
are computed from private data without noise. They are for debugging; only
the model parameters carry the reported (epsilon, delta) guarantee.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpjax import accounting
from dpjax.clipping import per_layer_clip_norms
from dpjax.config import RunConfig, check_against_dataset, validate
from dpjax.models import MODELS, check_no_batch_mixing, get_model
from dpjax.sampling import FixedSizeSampler, PoissonSampler, default_physical_batch_size
from dpjax.train import (
    TrainState,
    cross_entropy_loss,
    init_state,
    make_dp_step,
    make_nonprivate_step,
)

log = logging.getLogger("dpjax")


def build_optimizer(cfg) -> optax.GradientTransformation:
    """SGD, SGD with momentum, or Adam(W); the DP step privatizes what they consume."""
    if cfg.name == "sgd":
        opt = optax.sgd(cfg.learning_rate)
    elif cfg.name == "momentum":
        opt = optax.sgd(cfg.learning_rate, momentum=cfg.momentum, nesterov=cfg.nesterov)
    else:
        opt = optax.adam(cfg.learning_rate, b1=cfg.b1, b2=cfg.b2)
    if cfg.weight_decay:
        # decay acts on the parameters only: post-processing of the private gradient
        opt = optax.chain(optax.add_decayed_weights(cfg.weight_decay), opt)
    return opt


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the run will do, fixed before the first step."""

    num_train: int
    sample_rate: float
    expected_batch_size: float
    steps: int
    noise_multiplier: float | None
    budget_steps: int | None  # steps allowed by dp.max_epsilon, if set


def plan_run(cfg: RunConfig, num_train: int) -> Plan:
    """Sample rate, step count, calibrated sigma and the budget's step limit."""
    check_against_dataset(cfg, num_train)
    t, d = cfg.train, cfg.dp
    q = t.batch_size / num_train
    steps = t.steps if t.steps is not None else math.ceil(t.epochs / q)
    sigma, budget_steps = None, None
    if d.enabled:
        accounting.check_delta(d.delta, num_train)
        n_kw = {"num_examples": num_train} if d.sampling == "fixed_size" else {}
        sigma = d.noise_multiplier
        if d.target_epsilon is not None:
            sigma = accounting.calibrate_noise_multiplier(
                d.target_epsilon, d.delta, q, steps, d.accountant, d.sampling, **n_kw
            )
        if d.max_epsilon is not None:
            budget_steps = accounting.max_steps(
                accounting.Ledger(), sigma, q, d.max_epsilon, d.delta, d.accountant,
                d.sampling, n_kw.get("num_examples"), limit=steps + 1,
            )
    return Plan(num_train, q, float(t.batch_size), steps, sigma, budget_steps)


def make_evaluator(apply_fn, batch_size: int):
    """Accuracy and mean loss over a whole split, in padded batches of one shape."""

    @jax.jit
    def batch_stats(params, x, y, mask):
        logits = apply_fn({"params": params}, x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
        return jnp.sum(correct * mask), jnp.sum(loss * mask)

    def evaluate(params, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        n = len(x)
        b = min(batch_size, n)
        correct = total_loss = 0.0
        for start in range(0, n, b):
            idx = np.arange(start, start + b)
            mask = (idx < n).astype(np.float32)
            idx = np.minimum(idx, n - 1)
            c, lsum = batch_stats(params, x[idx], y[idx], mask)
            correct += float(c)
            total_loss += float(lsum)
        return {"accuracy": correct / n, "loss": total_loss / n}

    return evaluate


class Progress:
    """A one-line progress bar on a terminal; plain log lines otherwise."""

    def __init__(self, total: int, every: int, stream=None):
        self.total, self.every = total, every
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()

    def update(self, step: int, fields: dict[str, Any]) -> None:
        text = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in fields.items())
        if self.tty:
            width = 24
            done = int(width * step / max(self.total, 1))
            bar = "#" * done + "." * (width - done)
            elapsed = time.perf_counter() - self.start
            self.stream.write(f"\r[{bar}] {step}/{self.total} {text} ({elapsed:.0f}s)\x1b[K")
            self.stream.flush()
        elif step % self.every == 0 or step == self.total:
            log.info("step %d/%d %s", step, self.total, text)

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _split_validation(ds, fraction: float, seed: int):
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xDA7A]))
    perm = rng.permutation(len(ds.x_train))
    n_val = max(1, int(round(fraction * len(perm))))
    val, train = perm[:n_val], perm[n_val:]
    return (ds.x_train[train], ds.y_train[train]), (ds.x_train[val], ds.y_train[val])


def load_data(cfg: RunConfig):
    from dpjax.data import load_dataset  # noqa: PLC0415  (keeps `import dpjax` light)

    options = dict(cfg.dataset.options)
    if cfg.dataset.data_dir is not None:
        options["data_dir"] = cfg.dataset.data_dir
    return load_dataset(cfg.dataset.name, **options)


def run_training(cfg: RunConfig, out_dir: str | Path) -> dict[str, Any]:
    """Trains as configured; writes ``metrics.jsonl`` and ``summary.json``; returns the summary."""
    from dpjax.data import DATASETS  # noqa: PLC0415

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    validate(cfg, datasets=DATASETS, models=MODELS)
    wall_start = time.perf_counter()

    ds = load_data(cfg)
    (x_train, y_train), holdout = (ds.x_train, ds.y_train), (ds.x_test, ds.y_test)
    if cfg.train.eval_split == "validation":
        (x_train, y_train), holdout = _split_validation(ds, cfg.train.validation_fraction,
                                                        cfg.train.seed)
    plan = plan_run(cfg, len(x_train))

    model = get_model(cfg.model.name, ds.num_classes, **cfg.model.options)
    check_no_batch_mixing(model, jnp.asarray(x_train[:1]))
    params = model.init(jax.random.PRNGKey(cfg.train.seed), jnp.asarray(x_train[:1]))["params"]
    optimizer = build_optimizer(cfg.optimizer)
    loss_fn = cross_entropy_loss(model.apply)
    d = cfg.dp
    physical = d.physical_batch_size
    if physical is None and d.aggregation == "secagg":
        physical = default_physical_batch_size(plan.num_train, plan.sample_rate,
                                               multiple=math.lcm(8, d.num_parties))
    if d.enabled:
        sampler = (
            PoissonSampler(plan.num_train, plan.sample_rate, physical, seed=cfg.train.seed)
            if d.sampling == "poisson"
            else FixedSizeSampler(plan.num_train, cfg.train.batch_size, seed=cfg.train.seed)
        )
        step_fn = _dp_step(cfg, loss_fn, optimizer, plan, params, sampler.physical_batch_size)
    else:
        sampler = PoissonSampler(plan.num_train, plan.sample_rate, d.physical_batch_size,
                                 seed=cfg.train.seed)
        step_fn = make_nonprivate_step(loss_fn, optimizer)
    state = init_state(params, optimizer, cfg.train.seed)
    evaluate = make_evaluator(model.apply, cfg.train.eval_batch_size)

    to_run = plan.steps if plan.budget_steps is None else min(plan.steps, plan.budget_steps)
    stopped_reason = "completed" if to_run == plan.steps else "budget"
    ledger = accounting.Ledger()
    num_nonfinite = 0
    progress = Progress(to_run, cfg.train.log_every)
    metrics_path = out_dir / "metrics.jsonl"
    last_eval: dict[str, float] = {}
    with metrics_path.open("w") as metrics:
        state, ledger, num_nonfinite, last_eval = _train_steps(
            cfg, plan, sampler, step_fn, state, to_run, x_train, y_train, holdout, evaluate,
            loss_fn, ledger, metrics, progress,
        )
    progress.close()

    test = evaluate(state.params, ds.x_test, ds.y_test)
    steps_taken = int(state.step)
    eps = ledger.epsilon(d.delta, d.accountant) if d.enabled else None
    summary = {
        "dataset": cfg.dataset.name,
        "model": cfg.model.name,
        "optimizer": cfg.optimizer.name,
        "learning_rate": cfg.optimizer.learning_rate,
        "dp_enabled": d.enabled,
        "epsilon": eps,
        "delta": d.delta if d.enabled else None,
        "noise_multiplier": plan.noise_multiplier,
        "target_epsilon": d.target_epsilon if d.enabled else None,
        "max_epsilon": d.max_epsilon if d.enabled else None,
        "l2_clip_norm": d.l2_clip_norm if d.enabled else None,
        "sample_rate": plan.sample_rate,
        "expected_batch_size": plan.expected_batch_size,
        "num_train": plan.num_train,
        "steps": steps_taken,
        "planned_steps": plan.steps,
        "accountant": d.accountant if d.enabled else None,
        "sampling": d.sampling if d.enabled else "poisson",
        "clipping": d.clipping if d.enabled else None,
        "aggregation": d.aggregation,
        "num_parties": d.num_parties if d.aggregation == "secagg" else None,
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "eval_split": cfg.train.eval_split,
        "final_eval": last_eval,
        "num_nonfinite": num_nonfinite,
        "stopped_reason": stopped_reason,
        "seed": cfg.train.seed,
        "wall_time_s": time.perf_counter() - wall_start,
        "status": "completed",
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _dp_step(cfg: RunConfig, loss_fn, optimizer, plan: Plan, params, physical: int):
    d = cfg.dp
    clip = d.l2_clip_norm
    if d.per_layer_clipping:
        # one bound per layer, C / sqrt(layers) each: the total sensitivity stays C
        clip = per_layer_clip_norms(params, d.l2_clip_norm, depth=1)
    if d.aggregation == "secagg":
        from dpjax.secagg.training import SecAggSettings, make_secagg_dp_step  # noqa: PLC0415

        settings = SecAggSettings(d.num_parties, d.secagg_threshold, d.secagg_neighbours,
                                  d.secagg_mode, seed=cfg.train.seed)
        return make_secagg_dp_step(
            loss_fn, optimizer, noise_multiplier=plan.noise_multiplier, l2_clip_norm=clip,
            expected_batch_size=plan.expected_batch_size, physical_batch_size=physical,
            settings=settings, microbatch_size=d.microbatch_size, clipping_method=d.clipping,
        )
    return make_dp_step(
        loss_fn, optimizer,
        noise_multiplier=plan.noise_multiplier,
        l2_clip_norm=clip,
        expected_batch_size=plan.expected_batch_size,
        microbatch_size=d.microbatch_size,
        clipping_method=d.clipping,
    )


def _train_steps(cfg, plan, sampler, step_fn, state: TrainState, to_run, x_train, y_train,
                 holdout, evaluate, loss_fn, ledger, metrics, progress):
    d, t = cfg.dp, cfg.train
    n_kw = {"num_examples": plan.num_train} if d.sampling == "fixed_size" else {}
    eval_x, eval_y = holdout
    batch_loss = jax.jit(lambda p, b, m: jnp.sum(loss_fn(p, b) * m) / jnp.maximum(jnp.sum(m), 1))
    nonfinite = jnp.zeros((), jnp.int32)  # summed on device: no host sync per step
    last_eval: dict[str, float] = {}
    for step in range(int(state.step), to_run):
        chunks = [((x_train[c.indices], y_train[c.indices]), c.mask)
                  for c in sampler.sample(step)]
        state, stats = step_fn.run(state, chunks)
        nonfinite = nonfinite + stats.num_nonfinite
        if d.enabled:
            ledger = ledger.record(plan.noise_multiplier, plan.sample_rate, 1, d.sampling,
                                   n_kw.get("num_examples"))
        done = step + 1
        if done % t.log_every == 0 or done == to_run or done % t.eval_every == 0:
            record = {"step": done,
                      "loss": float(batch_loss(state.params, *chunks[0])),
                      "batch_size": int(stats.batch_size),
                      "num_nonfinite": int(stats.num_nonfinite)}
            is_eval = done % t.eval_every == 0 or done == to_run
            if d.enabled and (d.accountant == "rdp" or is_eval):  # PLD is slow: eval steps only
                record["epsilon"] = ledger.epsilon(d.delta, d.accountant)
            if d.enabled:
                record["clipped_fraction"] = float(stats.clipped_fraction)
                record["mean_grad_norm"] = float(stats.mean_grad_norm)
            if is_eval:
                last_eval = evaluate(state.params, eval_x, eval_y)
                record[f"{t.eval_split}_accuracy"] = last_eval["accuracy"]
                record[f"{t.eval_split}_loss"] = last_eval["loss"]
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            shown = {k: v for k, v in record.items() if k in
                     ("loss", "epsilon", f"{t.eval_split}_accuracy")}
            progress.update(done, shown)
    return state, ledger, int(nonfinite), last_eval
