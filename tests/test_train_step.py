import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dpjax
from dpjax.sampling import PoissonSampler
from dpjax.train import init_state, make_dp_step, make_nonprivate_step, noise_key


def _flat(tree):
    return np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(tree)])


class CompileCounter:
    """Counts XLA backend compilations through jax.monitoring."""

    def __init__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1


COUNTER = CompileCounter()


def _data(n=300, seed=0):
    rng = np.random.RandomState(seed)
    return rng.randn(n, 6, 6, 1).astype(np.float32), rng.randint(0, 10, n).astype(np.int32)


def test_dp_step_is_the_clipped_sum_plus_noise_from_a_fold_in_key_over_expected_batch(
    mlp_problem,
):
    loss_fn, params, batch = mlp_problem
    sigma, c, b_exp, lr = 0.8, 0.5, 10.0, 0.1
    opt = optax.sgd(lr)
    state = init_state(params, opt, seed=3)
    key = noise_key(state)
    mask = jnp.ones(batch[0].shape[0]).at[0].set(0.0)
    summed, _ = dpjax.clipped_grad(loss_fn, l2_clip_norm=c)(params, batch, mask)
    noisy = dpjax.privatize(summed, key, noise_multiplier=sigma, l2_clip_norm=c,
                            expected_batch_size=b_exp)
    expected = jax.tree_util.tree_map(lambda p, g: p - lr * g, params, noisy)
    step = make_dp_step(loss_fn, opt, noise_multiplier=sigma, l2_clip_norm=c,
                        expected_batch_size=b_exp)
    new_state, stats = step.step(state, batch, mask)
    np.testing.assert_allclose(_flat(new_state.params), _flat(expected), rtol=1e-6, atol=1e-7)
    assert int(new_state.step) == 1 and int(stats.batch_size) == 11


def test_noise_keys_are_fresh_every_step():
    state = init_state({"w": jnp.zeros(2)}, optax.sgd(1.0), seed=0)
    keys = {tuple(np.asarray(noise_key(state.replace(step=jnp.int32(t))))) for t in range(1000)}
    assert len(keys) == 1000
    assert tuple(np.asarray(state.key)) not in keys


def test_split_chunks_equal_one_big_chunk_with_noise_drawn_once(mlp_problem):
    loss_fn, params, (x, y) = mlp_problem
    opt = optax.adam(1e-2)  # DP-Adam
    step = make_dp_step(loss_fn, opt, noise_multiplier=1.0, l2_clip_norm=0.5,
                        expected_batch_size=12.0)
    mask = jnp.ones(12).at[7].set(0.0)
    whole, _ = step.step(init_state(params, opt, 0), (x, y), mask)
    chunks = [((x[:6], y[:6]), mask[:6]), ((x[6:], y[6:]), mask[6:])]
    split, stats = step.run(init_state(params, opt, 0), chunks)
    np.testing.assert_allclose(_flat(split.params), _flat(whole.params), rtol=1e-5, atol=1e-7)
    assert int(stats.batch_size) == 11


def test_each_chunk_call_takes_the_previous_running_sum(mlp_problem):
    # The running sum goes through every chunk call (added in place), and
    # apply() receives the last one: no chunk is dropped or counted twice.
    import dataclasses

    loss_fn, params, (x, y) = mlp_problem
    opt = optax.sgd(0.1)
    step = make_dp_step(loss_fn, opt, noise_multiplier=1.0, l2_clip_norm=0.5,
                        expected_batch_size=12.0)
    calls = []

    def record(name, fn):
        def wrapped(*args):
            out = fn(*args)
            calls.append((name, args, out))
            return out
        return wrapped

    traced = dataclasses.replace(step, clipped_sum=record("clipped_sum", step.clipped_sum),
                                 accumulate=record("accumulate", step.accumulate),
                                 apply=record("apply", step.apply))
    mask = jnp.ones(4)
    chunks = [((x[i:i + 4], y[i:i + 4]), mask) for i in (0, 4, 8)]
    traced.run(init_state(params, opt, 0), chunks)
    assert [name for name, _, _ in calls] == ["clipped_sum", "accumulate", "accumulate", "apply"]
    for (_, _, previous), (_, args, _) in zip(calls[:-2], calls[1:-1], strict=True):
        assert args[1] is previous[0] and args[2] is previous[1]  # (summed, stats) passed on
    assert calls[-1][1][1] is calls[-2][2][0]


def test_the_jitted_step_compiles_once_across_fifty_poisson_steps(mlp_problem):
    loss_fn, params, _ = mlp_problem
    x, y = _data()
    opt = optax.sgd(0.1)
    sampler = PoissonSampler(len(x), 0.1, physical_batch_size=48, seed=0)
    step = make_dp_step(loss_fn, opt, noise_multiplier=1.0, l2_clip_norm=1.0,
                        expected_batch_size=sampler.expected_batch_size)
    state = init_state(params, opt, 0)

    def chunks(t):
        return [((x[c.indices], y[c.indices]), c.mask) for c in sampler.sample(t)]

    state, _ = step.run(state, chunks(0))
    jax.block_until_ready(state)
    before = COUNTER.count
    sizes = set()
    for t in range(1, 51):
        cs = chunks(t)
        sizes.add(int(sum(m.sum() for _, m in cs)))
        state, _ = step.run(state, cs)
    jax.block_until_ready(state)
    assert len(sizes) > 5
    assert COUNTER.count == before, f"{COUNTER.count - before} recompilations"


def test_nonprivate_step_is_plain_sgd_on_the_mean_loss(mlp_problem):
    loss_fn, params, batch = mlp_problem
    opt = optax.sgd(0.1)
    grads = jax.grad(lambda p: jnp.mean(loss_fn(p, batch)))(params)
    new, _ = make_nonprivate_step(loss_fn, opt).step(init_state(params, opt, 0), batch,
                                                     jnp.ones(12))
    expected = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, grads)
    np.testing.assert_allclose(_flat(new.params), _flat(expected), rtol=1e-5, atol=1e-7)


def test_dp_training_reduces_the_loss(mlp_problem):
    loss_fn, params, _ = mlp_problem
    x, y = _data(600, seed=1)
    y = (x.reshape(600, -1)[:, :10].argmax(1)).astype(np.int32)  # a learnable task
    opt = optax.adam(1e-2)
    sampler = PoissonSampler(len(x), 0.2, seed=0)
    step = make_dp_step(loss_fn, opt, noise_multiplier=0.5, l2_clip_norm=1.0,
                        expected_batch_size=sampler.expected_batch_size)
    state = init_state(params, opt, 0)
    loss0 = float(jnp.mean(loss_fn(state.params, (x, y))))
    for t in range(60):
        state, _ = step.run(state, [((x[c.indices], y[c.indices]), c.mask)
                                    for c in sampler.sample(t)])
    assert float(jnp.mean(loss_fn(state.params, (x, y)))) < 0.7 * loss0


def test_bad_step_arguments_raise(mlp_problem):
    loss_fn, _, _ = mlp_problem
    with pytest.raises(ValueError, match="noise_multiplier=-1"):
        make_dp_step(loss_fn, optax.sgd(1.0), noise_multiplier=-1, l2_clip_norm=1.0,
                     expected_batch_size=1.0)
    with pytest.raises(ValueError, match="expected_batch_size=0"):
        make_dp_step(loss_fn, optax.sgd(1.0), noise_multiplier=1, l2_clip_norm=1.0,
                     expected_batch_size=0)
