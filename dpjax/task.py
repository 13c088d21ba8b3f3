"""The learning task of a run: data, model, loss, optimizer and evaluation.

Nothing here decides a privacy guarantee (that is :mod:`dpjax.mechanism`); it
takes plain config dataclasses, no Hydra objects.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpjax.config import ConfigError, RunConfig
from dpjax.lm_task import LMSetup, build_lm_fields, is_language_task
from dpjax.models import check_no_batch_mixing, get_model
from dpjax.train import cross_entropy_loss

PyTree = Any


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


def split_validation(ds, fraction: float, seed: int):
    """``(train, validation)`` from the training split: a permutation of ``seed``.

    ``train.seed`` is public: the split is reproducible, and the validation
    examples get no protection (their metrics go to the non-private diagnostics).
    """
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0xDA7A,)))
    perm = rng.permutation(len(ds.x_train))
    n_val = max(1, int(round(fraction * len(perm))))
    val, train = perm[:n_val], perm[n_val:]
    return (ds.x_train[train], ds.y_train[train]), (ds.x_train[val], ds.y_train[val])


_SUBSET_SALT = 0x5B5E7  # keeps subset_seed's stream apart from every other use of an integer


def subset_mask(num_examples: int, fraction: float, seed: int) -> np.ndarray:
    """Which rows of the training split ``train.subset_fraction`` keeps: a boolean mask of
    length ``num_examples``, each row kept independently with probability ``fraction``.

    A function of ``seed`` and the row count only, never of the data: the subset is
    public, as ``train.subset_seed`` is. It decides which examples are members, and the
    run's guarantee covers exactly the kept rows (its dataset); the rows left out
    (``~mask``) are never read. Independent inclusion makes each kept row one
    add/remove neighbour away from the run without it, the relation the accountant
    assumes, which membership inference audits rely on (:mod:`dpjax.audit.mia`).
    """
    if isinstance(num_examples, bool) or not isinstance(num_examples, int | np.integer) \
            or num_examples < 0:
        raise ValueError(f"Expected num_examples={num_examples!r} to be an integer >= 0.")
    if isinstance(fraction, bool) or not isinstance(fraction, int | float | np.floating) \
            or not 0 < fraction < 1:
        raise ValueError(f"Expected fraction={fraction!r} in (0, 1).")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"Expected seed={seed!r} to be an integer >= 0.")
    rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(_SUBSET_SALT,)))
    return rng.random(int(num_examples)) < fraction


def take_subset(cfg: RunConfig, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` restricted to ``train.subset_fraction``'s subset (unchanged when unset)."""
    t = cfg.train
    if t.subset_fraction is None:
        return x, y
    keep = subset_mask(len(x), t.subset_fraction, t.subset_seed)
    if not keep.any():
        raise ConfigError(
            f"Expected train.subset_fraction={t.subset_fraction!r} with "
            f"train.subset_seed={t.subset_seed!r} to keep at least one of the {len(x)} "
            "training examples; it keeps none.")
    return x[keep], y[keep]


def load_data(cfg: RunConfig):
    from dpjax.data import load_dataset  # noqa: PLC0415  (keeps `import dpjax` light)

    options = dict(cfg.dataset.options)
    if cfg.dataset.data_dir is not None:
        options["data_dir"] = cfg.dataset.data_dir
    return load_dataset(cfg.dataset.name, **options)


@dataclasses.dataclass(frozen=True)
class Task:
    """The data splits, the model's loss and initial parameters, and the evaluator."""

    x_train: np.ndarray
    y_train: np.ndarray
    holdout: tuple[np.ndarray, np.ndarray]  # evaluated during training (test or validation)
    test_split: tuple[np.ndarray, np.ndarray]
    loss_fn: Callable[[PyTree, PyTree], jax.Array]
    params: PyTree
    evaluate: Callable[..., dict[str, float]]
    num_classes: int
    apply_fn: Callable[..., jax.Array]
    lm: LMSetup | None = None  # language models: the model, frozen leaves, corpus, source


def training_pool(cfg: RunConfig, ds) -> tuple[tuple[np.ndarray, np.ndarray], tuple]:
    """``((x, y), holdout)``: the training split before any ``train.subset_fraction`` (the
    pool a subset is drawn from) and the split evaluated during training."""
    if cfg.train.eval_split == "validation":
        return split_validation(ds, cfg.train.validation_fraction, cfg.train.seed)
    return (ds.x_train, ds.y_train), (ds.x_test, ds.y_test)


def build_task(cfg: RunConfig) -> Task:
    """Loads the data and builds the model (refusing one that mixes examples).

    The training split is the pool of :func:`training_pool` restricted to
    ``train.subset_fraction``'s public subset when that is set.
    """
    if is_language_task(cfg):
        if cfg.train.subset_fraction is not None:
            raise ConfigError(
                f"Expected train.subset_fraction={cfg.train.subset_fraction!r} to be null "
                "with a text dataset (a subset of records is not implemented for language "
                "models; use audit=exposure to measure their memorization).")
        return Task(**build_lm_fields(cfg))
    ds = load_data(cfg)
    (x_train, y_train), holdout = training_pool(cfg, ds)
    x_train, y_train = take_subset(cfg, x_train, y_train)
    model = get_model(cfg.model.name, ds.num_classes, **cfg.model.options)
    check_no_batch_mixing(model, jnp.asarray(x_train[:2]))  # two rows: the jvp check
    params = model.init(jax.random.PRNGKey(cfg.train.seed), jnp.asarray(x_train[:1]))["params"]
    return Task(x_train, y_train, holdout, (ds.x_test, ds.y_test),
                cross_entropy_loss(model.apply), params,
                make_evaluator(model.apply, cfg.train.eval_batch_size), ds.num_classes,
                model.apply)
