import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from dpjax.models import (
    LANGUAGE_MODELS,
    MODELS,
    BatchMixingError,
    check_no_batch_mixing,
    get_model,
)

INPUTS = {"mlp": (28, 28, 1), "dp_cnn": (28, 28, 1), "cnn1d": (40, 1), "wide_resnet": (32, 32, 3)}
SMALL = {"wide_resnet": {"depth": 10, "width": 1, "groups": 4}}


@pytest.mark.parametrize("name", [m for m in MODELS if m not in LANGUAGE_MODELS])
def test_every_model_maps_a_batch_to_logits_without_mixing_examples(name):
    model = get_model(name, 7, **SMALL.get(name, {}))
    x = jax.random.normal(jax.random.PRNGKey(0), (3, *INPUTS[name]))
    check_no_batch_mixing(model, x)
    params = jax.jit(model.init)(jax.random.PRNGKey(1), x)
    assert set(params) == {"params"}
    apply = jax.jit(model.apply)
    logits = apply(params, x)
    assert logits.shape == (3, 7)
    # no example mixing: each row's output depends only on that row
    alone = apply(params, x[1:2])
    assert jnp.allclose(alone[0], logits[1], rtol=1e-5, atol=1e-5)


def test_the_dp_cnn_has_the_literature_parameter_count():
    params = get_model("dp_cnn", 10).init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
    assert sum(a.size for a in jax.tree_util.tree_leaves(params)) == 26_010


class _WithBatchNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(4)(x.reshape((x.shape[0], -1)))
        return nn.BatchNorm(use_running_average=False)(x)


def test_batchnorm_is_refused_with_the_reason_and_the_alternative():
    with pytest.raises(BatchMixingError, match=r"BatchNorm.*GroupNorm or LayerNorm"):
        check_no_batch_mixing(_WithBatchNorm(), jnp.zeros((2, 5)))


class _CentersOverTheBatch(nn.Module):
    """A custom layer that mixes examples without being any known mixing layer."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(4)(x.reshape((x.shape[0], -1)))
        return h - jnp.mean(h, axis=0)


class _Nested(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Sequential([nn.Dense(3), nn.BatchNorm(use_running_average=False)])(x)


def test_nested_batchnorm_and_unnamed_mixing_are_refused():
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 5))
    with pytest.raises(BatchMixingError, match="BatchNorm at"):
        check_no_batch_mixing(_Nested(), x)
    with pytest.raises(BatchMixingError, match="other examples change when only example 0"):
        check_no_batch_mixing(_CentersOverTheBatch(), x)
    check_no_batch_mixing(_CentersOverTheBatch(), x[:1])  # one row: nothing to compare


def test_unknown_model_and_option_are_named():
    with pytest.raises(ValueError, match=r"model='vit'.*'cnn1d'"):
        get_model("vit", 10)
    with pytest.raises(ValueError, match=r"\['widht'\].*'width'"):
        get_model("wide_resnet", 10, widht=2)
