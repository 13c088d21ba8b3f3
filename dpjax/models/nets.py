"""The model zoo: MLP, the standard DP CNN, a 1-D CNN and a GroupNorm WideResNet."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class MLP(nn.Module):
    """Flatten -> Dense(h) -> act ... -> Dense(num_classes). Default 784-512-512-10."""

    num_classes: int = 10
    hidden: Sequence[int] = (512, 512)
    activation: str = "relu"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = getattr(nn, self.activation)
        x = x.reshape((x.shape[0], -1))
        for width in self.hidden:
            x = act(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)


class DPCNN(nn.Module):
    """The CNN of the DP literature (Papernot et al. 2020, tanh).

    conv16 8x8/2 -> maxpool 2/1 -> conv32 4x4/2 -> maxpool 2/1 -> fc32 -> fc10.
    """

    num_classes: int = 10
    activation: str = "tanh"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = getattr(nn, self.activation)
        x = act(nn.Conv(16, (8, 8), strides=2, padding="SAME")(x))
        x = nn.max_pool(x, (2, 2), strides=(1, 1))
        x = act(nn.Conv(32, (4, 4), strides=2, padding="VALID")(x))
        x = nn.max_pool(x, (2, 2), strides=(1, 1))
        x = x.reshape((x.shape[0], -1))
        x = act(nn.Dense(32)(x))
        return nn.Dense(self.num_classes)(x)


class CNN1D(nn.Module):
    """A small 1-D CNN for MNIST-1D inputs [B, length, channels].

    ``groups > 0`` adds GroupNorm (per example) after each convolution;
    ``pool="flatten"`` feeds every position to the classifier, ``"mean"`` /
    ``"max"`` pool over positions first (fewer parameters).
    """

    num_classes: int = 10
    channels: Sequence[int] = (32, 32, 32)
    kernel_size: int = 5
    activation: str = "relu"
    groups: int = 0
    pool: str = "flatten"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = getattr(nn, self.activation)
        if x.ndim == 2:
            x = x[..., None]
        for i, c in enumerate(self.channels):
            x = nn.Conv(c, (self.kernel_size,), strides=1 if i == 0 else 2)(x)
            if self.groups:
                x = nn.GroupNorm(num_groups=self.groups)(x)
            x = act(x)
        if self.pool == "flatten":
            x = x.reshape((x.shape[0], -1))
        elif self.pool in ("mean", "max"):
            x = getattr(jnp, self.pool)(x, axis=1)
        else:
            accepted = ["flatten", "mean", "max"]
            raise ValueError(f"Expected pool={self.pool!r} to be one of {accepted}.")
        return nn.Dense(self.num_classes)(x)


class _WideBlock(nn.Module):
    width: int
    strides: int
    groups: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.relu(nn.GroupNorm(num_groups=self.groups)(x))
        shortcut = x
        if self.strides != 1 or x.shape[-1] != self.width:
            shortcut = nn.Conv(self.width, (1, 1), strides=self.strides, use_bias=False)(h)
        h = nn.Conv(self.width, (3, 3), strides=self.strides, use_bias=False)(h)
        h = nn.relu(nn.GroupNorm(num_groups=self.groups)(h))
        h = nn.Conv(self.width, (3, 3), use_bias=False)(h)
        return h + shortcut


class WideResNet(nn.Module):
    """WRN-depth-width with GroupNorm (De et al. 2022 use WRN-16-4 for DP CIFAR-10)."""

    num_classes: int = 10
    depth: int = 16
    width: int = 4
    groups: int = 16

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if (self.depth - 4) % 6:
            raise ValueError(f"Expected depth={self.depth} with (depth - 4) % 6 == 0.")
        n = (self.depth - 4) // 6
        x = nn.Conv(16, (3, 3), use_bias=False)(x)
        for stage, base in enumerate((16, 32, 64)):
            for i in range(n):
                strides = 2 if stage > 0 and i == 0 else 1
                x = _WideBlock(base * self.width, strides, self.groups)(x)
        x = nn.relu(nn.GroupNorm(num_groups=self.groups)(x))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes)(x)
