"""Local training: a user's padded rows add no steps (not even momentum), the contribution is
server minus local parameters, and the local settings are validated."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import data, initial_params, numpy_grad, softmax_regression_loss

from dpjax.federated.local import LocalTraining, clipped_user_sum, local_optimizer, local_update


def _momentum_reference(w, b, x, y, lr, momentum, epochs, batch):
    """Local SGD with momentum (v = g + m v) over the real examples only, by hand."""
    vw, vb = np.zeros_like(w), np.zeros_like(b)
    for _ in range(epochs):
        for start in range(0, len(y), batch):
            gw, gb = numpy_grad(w, b, x[start:start + batch], y[start:start + batch])
            vw, vb = gw + momentum * vw, gb + momentum * vb
            w, b = w - lr * vw, b - lr * vb
    return w, b


def test_padding_batches_take_no_step_not_even_a_momentum_step():
    """4 real examples in 9 rows, batches of 3: two real batches ([3], [1]) per epoch, the
    third (padding only) changes nothing; two epochs."""
    x, y = data(4)
    local = LocalTraining(optax.sgd(0.4, momentum=0.9), epochs=2, batch_size=3, max_examples=9)
    assert local.rows_per_slot == 9 and local.steps_per_epoch == 3
    xs = jnp.zeros((9, x.shape[1])).at[:4].set(x)
    ys = jnp.zeros(9, jnp.int32).at[:4].set(y)
    mask = jnp.zeros(9).at[:4].set(1.0)
    params = initial_params()
    trained = jax.jit(local_update(softmax_regression_loss, local))(params, (xs, ys), mask)
    w, b = _momentum_reference(np.asarray(params["w"], np.float64),
                               np.asarray(params["b"], np.float64), x, y, 0.4, 0.9, 2, 3)
    np.testing.assert_allclose(np.asarray(trained["w"]), w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(trained["b"]), b, rtol=1e-5, atol=1e-6)


def test_the_contribution_is_the_sum_of_server_minus_local_parameters():
    x, y = data(8)
    local = LocalTraining(optax.sgd(0.2), epochs=1, batch_size=4, max_examples=4)
    slots = ((jnp.asarray(x.reshape(2, 4, -1)), jnp.asarray(y.reshape(2, 4))), jnp.ones((2, 4)))
    params = initial_params()
    total, norms = clipped_user_sum(softmax_regression_loss, local, 1e6)(params, slots,
                                                                         jnp.ones(2))
    w, b = (np.asarray(params[k], np.float64) for k in ("w", "b"))
    expected_w, expected_b, expected_norms = 0.0, 0.0, []
    for u in range(2):  # one full-batch SGD step per user: server - local = lr * grad
        gw, gb = numpy_grad(w, b, x[4 * u:4 * u + 4], y[4 * u:4 * u + 4])
        expected_w, expected_b = expected_w + 0.2 * gw, expected_b + 0.2 * gb
        expected_norms.append(0.2 * np.sqrt(np.sum(gw**2) + np.sum(gb**2)))
    np.testing.assert_allclose(np.asarray(total["w"]), expected_w, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(total["b"]), expected_b, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(norms), expected_norms, rtol=1e-5)


def test_local_settings_are_validated_before_any_compute():
    with pytest.raises(ValueError, match="local_optimizer='adam'"):
        local_optimizer("adam", 0.1)
    with pytest.raises(ValueError, match="local_momentum=1.0"):
        local_optimizer("momentum", 0.1, momentum=1.0)
    with pytest.raises(ValueError, match="local_learning_rate=0"):
        local_optimizer("sgd", 0)
    with pytest.raises(ValueError, match="local_batch_size=0"):
        LocalTraining(optax.sgd(0.1), batch_size=0)
    assert LocalTraining(optax.sgd(0.1), batch_size=32, max_examples=100).rows_per_slot == 128
    with pytest.raises(ValueError, match="l2_clip_norm"):
        clipped_user_sum(softmax_regression_loss, LocalTraining(optax.sgd(0.1)), 0.0)
