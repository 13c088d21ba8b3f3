"""The models bench_clipping.py times, built in three frameworks (Flax Linen, Flax NNX,
Equinox): ``BUILDERS[framework](kind, x) -> (loss_fn, params)``
for ``kind`` in mlp, cnn, transformer. Kept apart so the benchmark script holds the timing
harness only."""

from __future__ import annotations

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dpjax.models.nets import DPCNN, MLP
from dpjax.train import cross_entropy_loss

# --- Flax Linen ------------------------------------------------------------------------------


class TransformerBlock(nn.Module):
    heads: int
    d: int

    @nn.compact
    def __call__(self, x):
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(nn.LayerNorm()(x))
        h = nn.gelu(nn.Dense(4 * self.d)(nn.LayerNorm()(x)))
        return x + nn.Dense(self.d)(h)


class Transformer(nn.Module):
    """Token + position embeddings, pre-LN blocks, mean-pooled classifier."""

    vocab: int = 256
    length: int = 64
    d: int = 128
    heads: int = 4
    layers: int = 2
    num_classes: int = 10

    @nn.compact
    def __call__(self, ids):
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)  # per example
        x = nn.Embed(self.vocab, self.d)(ids) + nn.Embed(self.length, self.d)(positions)
        for _ in range(self.layers):
            x = TransformerBlock(self.heads, self.d)(x)
        return nn.Dense(self.num_classes)(jnp.mean(nn.LayerNorm()(x), axis=1))


def _linen(kind: str, x):
    model = {"mlp": MLP(), "cnn": DPCNN(), "transformer": Transformer()}[kind]
    params = jax.jit(model.init)(jax.random.PRNGKey(1), x[:1])["params"]
    return cross_entropy_loss(model.apply), params


# --- Flax NNX --------------------------------------------------------------------------------


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([nnx.Linear(784, 512, rngs=rngs),
                                nnx.Linear(512, 512, rngs=rngs), nnx.Linear(512, 10, rngs=rngs)])

    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        for layer in self.layers[:-1]:
            x = jax.nn.relu(layer(x))
        return self.layers[-1](x)


class NnxDPCNN(nnx.Module):
    def __init__(self, rngs):
        self.c1 = nnx.Conv(1, 16, (8, 8), strides=2, padding="SAME", rngs=rngs)
        self.c2 = nnx.Conv(16, 32, (4, 4), strides=2, padding="VALID", rngs=rngs)
        self.l1 = nnx.Linear(32 * 4 * 4, 32, rngs=rngs)
        self.l2 = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        x = nn.max_pool(jnp.tanh(self.c1(x)), (2, 2), strides=(1, 1))
        x = nn.max_pool(jnp.tanh(self.c2(x)), (2, 2), strides=(1, 1))
        return self.l2(jnp.tanh(self.l1(x.reshape((x.shape[0], -1)))))


class NnxBlock(nnx.Module):
    def __init__(self, d, heads, rngs):
        self.ln1, self.ln2 = nnx.LayerNorm(d, rngs=rngs), nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=d, decode=False,
                                           rngs=rngs)
        self.up, self.down = nnx.Linear(d, 4 * d, rngs=rngs), nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.down(jax.nn.gelu(self.up(self.ln2(x))))


class NnxTransformer(nnx.Module):
    def __init__(self, rngs, vocab=256, length=64, d=128, heads=4, layers=2):
        self.tokens = nnx.Embed(vocab, d, rngs=rngs)
        self.positions = nnx.Embed(length, d, rngs=rngs)
        self.blocks = nnx.List([NnxBlock(d, heads, rngs) for _ in range(layers)])
        self.norm, self.head = nnx.LayerNorm(d, rngs=rngs), nnx.Linear(d, 10, rngs=rngs)

    def __call__(self, ids):
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
        x = self.tokens(ids) + self.positions(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(jnp.mean(self.norm(x), axis=1))


def _nnx(kind: str, x):
    cls = {"mlp": NnxMLP, "cnn": NnxDPCNN, "transformer": NnxTransformer}[kind]
    graphdef, state = nnx.split(nnx.jit(lambda: cls(nnx.Rngs(1)))(), nnx.Param)

    def loss_fn(state, batch):
        x, y = batch
        return optax.softmax_cross_entropy_with_integer_labels(nnx.merge(graphdef, state)(x), y)

    return loss_fn, state


# --- Equinox (models of one example, vmapped in the loss) ------------------------------------


class EqxDPCNN(eqx.Module):
    c1: eqx.nn.Conv2d
    c2: eqx.nn.Conv2d
    l1: eqx.nn.Linear
    l2: eqx.nn.Linear
    pool: eqx.nn.MaxPool2d

    def __init__(self, key):
        k = jax.random.split(key, 4)
        self.c1 = eqx.nn.Conv2d(1, 16, 8, stride=2, padding=3, key=k[0])
        self.c2 = eqx.nn.Conv2d(16, 32, 4, stride=2, key=k[1])
        self.l1, self.l2 = eqx.nn.Linear(512, 32, key=k[2]), eqx.nn.Linear(32, 10, key=k[3])
        self.pool = eqx.nn.MaxPool2d(2, 1)

    def __call__(self, x):  # [H, W, 1]
        x = self.pool(jnp.tanh(self.c1(jnp.moveaxis(x, -1, 0))))
        x = self.pool(jnp.tanh(self.c2(x)))
        return self.l2(jnp.tanh(self.l1(x.reshape(-1))))


class EqxBlock(eqx.Module):
    ln1: eqx.nn.LayerNorm
    ln2: eqx.nn.LayerNorm
    attn: eqx.nn.MultiheadAttention
    up: eqx.nn.Linear
    down: eqx.nn.Linear

    def __init__(self, d, heads, key):
        k = jax.random.split(key, 3)
        self.ln1, self.ln2 = eqx.nn.LayerNorm(d), eqx.nn.LayerNorm(d)
        self.attn = eqx.nn.MultiheadAttention(heads, d, key=k[0])
        self.up, self.down = eqx.nn.Linear(d, 4 * d, key=k[1]), eqx.nn.Linear(4 * d, d, key=k[2])

    def __call__(self, x):  # [T, d]
        h = jax.vmap(self.ln1)(x)
        x = x + self.attn(h, h, h)
        return x + jax.vmap(self.down)(jax.nn.gelu(jax.vmap(self.up)(jax.vmap(self.ln2)(x))))


class EqxTransformer(eqx.Module):
    tokens: eqx.nn.Embedding
    positions: eqx.nn.Embedding
    blocks: list
    norm: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(self, key, vocab=256, length=64, d=128, heads=4, layers=2):
        k = jax.random.split(key, layers + 3)
        self.tokens, self.positions = eqx.nn.Embedding(vocab, d, key=k[0]), eqx.nn.Embedding(
            length, d, key=k[1])
        self.blocks = [EqxBlock(d, heads, k[3 + i]) for i in range(layers)]
        self.norm, self.head = eqx.nn.LayerNorm(d), eqx.nn.Linear(d, 10, key=k[2])

    def __call__(self, ids):  # [T]
        x = jax.vmap(self.tokens)(ids) + jax.vmap(self.positions)(jnp.arange(ids.shape[0]))
        for block in self.blocks:
            x = block(x)
        return self.head(jnp.mean(jax.vmap(self.norm)(x), axis=0))


def _equinox(kind: str, x):
    def make(key):
        if kind == "mlp":
            mlp = eqx.nn.MLP(784, 10, 512, 2, activation=jax.nn.relu, key=key)
            return eqx.nn.Sequential([eqx.nn.Lambda(lambda v: v.reshape(-1)), mlp])
        return {"cnn": EqxDPCNN, "transformer": EqxTransformer}[kind](key)

    params, static = eqx.partition(eqx.filter_jit(make)(jax.random.PRNGKey(1)), eqx.is_array)

    def loss_fn(params, batch):
        x, y = batch
        logits = jax.vmap(eqx.combine(params, static))(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)

    return loss_fn, params


BUILDERS = {"linen": _linen, "nnx": _nnx, "equinox": _equinox}
