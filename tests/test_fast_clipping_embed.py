"""The embedding rule of the fast path on lookups other than Flax's ``nn.Embed``: Equinox's
``weight[(id,)]`` (a gather with a second, column start index), dropping gathers, and ids
of narrow integer dtypes. Each against the vmap path (``test_fast_clipping.py`` helpers).
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_fast_clipping import _assert_close, _both, _ce, _eqx

from dpjax.fast_clipping import describe


class EqxEmbed(eqx.Module):
    table: eqx.nn.Embedding
    out: eqx.nn.Linear

    def __init__(self, key, vocab=40):
        k1, k2 = jax.random.split(key)
        self.table, self.out = eqx.nn.Embedding(vocab, 4, key=k1), eqx.nn.Linear(4, 3, key=k2)

    def __call__(self, ids):  # one example [T]
        return self.out(jnp.sum(jax.vmap(self.table)(ids), axis=0))


def test_equinox_embedding_takes_the_embedding_rule_and_a_dropping_gather_does_not():
    # eqx.nn.Embedding gathers weight[(id,)] with a second, column start index (always
    # clamped to 0: the slice is the whole row). Before, it fell to per-example gradients
    # [B, V, D]. Ids outside [0, V) are clamped by both paths.
    ids = jnp.array([[1, 1, 1, 2], [3, 39, 0, 3], [0, 1, 2, 45], [-2, 5, 5, 5]])
    for vocab in (4, 40):  # 2 * 4^2 = 32 >= 4 * 4: direct; < 40 * 4: ghost
        loss_fn, params, batch = _eqx(functools.partial(EqxEmbed, vocab=vocab), ids, 3)
        branch = describe(loss_fn, params, batch)[".table.weight"]
        assert branch == ("embed: direct" if vocab == 4 else "embed: ghost")
        _assert_close(*_both(loss_fn, params, batch, jnp.array([1.0, 1.0, 0.0, 1.0]), 0.5))
    # The same lookup with FILL_OR_DROP: a nonzero column start would drop the row, so its
    # value matters and the rule does not apply (per-example gradients instead).
    table = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((40, 4)), jnp.float32)}
    dn = jax.lax.GatherDimensionNumbers(offset_dims=(2, 3), collapsed_slice_dims=(),
                                        start_index_map=(0, 1))

    def dropping(p, batch):
        ids, y = batch
        starts = jnp.concatenate([ids[..., None], jnp.where(ids == 3, 1, 0)[..., None]], axis=-1)
        h = jax.lax.gather(p["w"], starts, dn, (1, 4), mode="fill", fill_value=0.0)
        return _ce(jnp.sum(h, axis=(1, 2))[:, :3], y)

    batch = (ids, jnp.arange(4) % 3)
    assert describe(dropping, table, batch)["['w']"] == "per-example: gather"
    _assert_close(*_both(dropping, table, batch, jnp.ones(4), 0.5))


@pytest.mark.parametrize("mode", ["clip", "fill"])
def test_embedding_ids_of_a_narrow_dtype_address_the_rows_they_name(mode):
    # uint8 ids into 300 rows: the rule's clamp to V - 1 = 299 wrapped to 43 in uint8
    # (found by review, 2026-11-30): the sum went to the wrong rows, and dropped ids
    # lowered the norms. int8 ids (with negatives) raised OverflowError.
    rng = np.random.default_rng(0)
    table = {"w": jnp.asarray(rng.standard_normal((300, 4)), jnp.float32)}
    dn = jax.lax.GatherDimensionNumbers(offset_dims=(2,), collapsed_slice_dims=(0,),
                                        start_index_map=(0,))

    def loss_fn(p, batch):
        ids, y = batch
        h = jax.lax.gather(p["w"], ids[..., None], dn, (1, 4), mode=mode, fill_value=0.0)
        return _ce(jnp.sum(h, axis=1)[:, :3], y)

    for ids in (jnp.array([[200, 250, 3], [7, 255, 0], [1, 2, 3]], jnp.uint8),
                jnp.array([[-3, 127, 3], [7, -128, 0], [1, 2, 100]], jnp.int8)):
        batch = (ids, jnp.arange(3) % 3)
        assert describe(loss_fn, table, batch)["['w']"].startswith("embed")
        _assert_close(*_both(loss_fn, table, batch, jnp.ones(3), 1e3))
