"""Shared fixtures: tiny models and batches with fixed seeds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax.models import DPCNN, MLP
from dpjax.train import cross_entropy_loss


def _problem(model, input_shape, batch_size, seed=0):
    rng = np.random.RandomState(seed)
    x = jnp.asarray(rng.randn(batch_size, *input_shape), jnp.float32)
    y = jnp.asarray(rng.randint(0, 10, batch_size), jnp.int32)
    params = model.init(jax.random.PRNGKey(seed), x[:1])["params"]
    return cross_entropy_loss(model.apply), params, (x, y)


@pytest.fixture
def mlp_problem():
    """A small MLP on 6x6x1 inputs, batch 12."""
    return _problem(MLP(num_classes=10, hidden=(16, 8)), (6, 6, 1), 12)


@pytest.fixture
def cnn_problem():
    """The DP CNN on 16x16x1 inputs, batch 8."""
    return _problem(DPCNN(num_classes=10), (16, 16, 1), 8)
