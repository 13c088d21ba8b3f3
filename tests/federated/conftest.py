"""A tiny federated problem: softmax regression on Gaussian features, with a NumPy
reference of its loss gradient (independent of JAX)."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

NUM_FEATURES, NUM_CLASSES = 5, 3


def softmax_regression_loss(params, batch):
    """Per-example cross-entropy of ``x @ w + b`` (dpjax's loss convention)."""
    x, y = batch
    logits = x @ params["w"] + params["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def numpy_grad(w, b, x, y):
    """The gradient of the mean cross-entropy over the rows of ``x`` (float64, by hand)."""
    logits = x @ w + b
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    return x.T @ p / len(y), p.mean(axis=0)


def initial_params(seed=0):
    rng = np.random.default_rng(seed)
    return {"w": jnp.asarray(0.1 * rng.standard_normal((NUM_FEATURES, NUM_CLASSES)),
                             jnp.float32),
            "b": jnp.zeros(NUM_CLASSES, jnp.float32)}


def data(num_examples, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, NUM_CLASSES, num_examples).astype(np.int32)
    centers = rng.standard_normal((NUM_CLASSES, NUM_FEATURES))
    x = (centers[y] + rng.standard_normal((num_examples, NUM_FEATURES))).astype(np.float32)
    return x, y


@pytest.fixture
def problem():
    """``(loss_fn, params, x [120, 5], y [120])``."""
    x, y = data(120)
    return softmax_regression_loss, initial_params(), x, y
