"""Feature normalization with public constants only.

Nothing computed from the private training split may shape other examples'
features (privacy rule 2b): if the training set's own mean and standard
deviation were used, adding one outlier would move every other example's
features, and so the clipped sum of a batch that does not even contain the
outlier, outside the mechanism and without noise. So every scheme here is a
fixed, data-independent map applied unchanged to both splits:

- ``"standardize"``: ``(x - mean) / std`` per channel with :class:`PublicStats`:
  constants published for the dataset (each loader documents their source), or
  statistics of an independently generated public sample (MNIST-1D), or values
  the user supplies. Never fitted on the data being loaded.
- ``"scale"``: divide by the format's fixed maximum value (e.g. 255 for 8-bit
  images), mapping raw values into ``[0, 1]``; only for formats that have one.
- ``"none"``: the raw values as ``float32``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from dpjax._validate import one_of

NORMALIZATIONS = ("standardize", "scale", "none")
"""Accepted values of the ``normalize`` option of the loaders."""

_CHUNK_ROWS = 1 << 16


@dataclasses.dataclass(frozen=True)
class PublicStats:
    """Per-channel ``mean`` and ``std`` (channel = last axis) that do not depend on the
    data being normalized, and where they come from."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str

    def __post_init__(self) -> None:
        mean, std = _floats("mean", self.mean), _floats("std", self.std)
        if len(mean) != len(std):
            raise ValueError(
                f"Expected mean={list(mean)} and std={list(std)} to have one value per channel "
                "each (the same length)."
            )
        if any(s <= 0 for s in std):
            raise ValueError(f"Expected std={list(std)} to be > 0 in every channel.")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)


def _floats(name: str, value: float | Sequence[float]) -> tuple[float, ...]:
    values = (value,) if isinstance(value, int | float) else tuple(value)
    if not values or not all(
        isinstance(v, int | float | np.number) and not isinstance(v, bool) and math.isfinite(v)
        for v in values
    ):
        raise ValueError(f"Expected {name}={value!r} to be a finite number or a non-empty "
                         "list of finite numbers (one per channel).")
    return tuple(float(v) for v in values)


def user_stats(mean, std) -> PublicStats | None:
    """Statistics the user supplies (``None`` when neither is given)."""
    if mean is None and std is None:
        return None
    if mean is None or std is None:
        raise ValueError(f"Expected both mean={mean!r} and std={std!r} to be given, or neither.")
    return PublicStats(mean, std, "supplied by the user")


def channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of ``x`` (the last axis), in float64.

    Used to derive public constants from *public* samples (see the MNIST-1D
    loader); never applied to the data being loaded. A channel with zero spread
    gets standard deviation 1.
    """
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"Expected x with at least one example and 2 dims; got shape {x.shape}.")
    # Two passes over chunks of rows in float64: exact enough for large means,
    # without a float64 copy of the whole array.
    flat = x.reshape(-1, x.shape[-1])
    chunks = range(0, flat.shape[0], _CHUNK_ROWS)
    total = sum(flat[i : i + _CHUNK_ROWS].sum(axis=0, dtype=np.float64) for i in chunks)
    mean = total / flat.shape[0]
    squares = sum(
        np.square(flat[i : i + _CHUNK_ROWS].astype(np.float64) - mean).sum(axis=0) for i in chunks
    )
    std = np.sqrt(squares / flat.shape[0])
    return mean, np.where(std > 0, std, 1.0)


def standardize(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``(x - mean) / std`` over the last axis, as ``float32``."""
    return (np.asarray(x, np.float32) - np.asarray(mean, np.float32)) / np.asarray(
        std, np.float32
    )


def check_scheme(
    scheme: str, *, max_value: float | None = None, stats: PublicStats | None = None
) -> None:
    """Raise ``ValueError`` unless ``scheme`` applies: ``"standardize"`` needs public
    ``stats``, ``"scale"`` needs the format's ``max_value``.

    Loaders call this before reading or generating anything.
    """
    accepted = [s for s in NORMALIZATIONS
                if (s != "scale" or max_value is not None)
                and (s != "standardize" or stats is not None)]
    if scheme == "standardize" and stats is None and scheme in NORMALIZATIONS:
        raise ValueError(
            "Expected normalize='standardize' to come with public statistics: pass mean= and "
            "std= (constants that do not depend on the private training data, e.g. published "
            f"values), or use one of {accepted}. Statistics of the training split itself would "
            "let one example move every other example's features outside the mechanism."
        )
    one_of("normalize", scheme, tuple(accepted))


def normalize_splits(
    x_train: np.ndarray,
    x_test: np.ndarray,
    scheme: str,
    *,
    max_value: float | None = None,
    stats: PublicStats | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Normalize both splits with the same data-independent map.

    Args:
      x_train, x_test: raw features, examples on the leading axis.
      scheme: one of :data:`NORMALIZATIONS`.
      max_value: the format's fixed maximum raw value, needed by ``"scale"``.
      stats: public per-channel statistics, needed by ``"standardize"``.

    Returns:
      ``(x_train, x_test)`` as ``float32``. Each example's result depends on that
      example alone.
    """
    check_scheme(scheme, max_value=max_value, stats=stats)
    if scheme == "standardize":
        channels = x_train.shape[-1]
        if len(stats.mean) not in (1, channels):
            raise ValueError(
                f"Expected {len(stats.mean)} normalization constants to match the "
                f"{channels} channels (last axis) of the features, or a single one."
            )
        mean, std = np.asarray(stats.mean), np.asarray(stats.std)
        return standardize(x_train, mean, std), standardize(x_test, mean, std)
    if scheme == "scale":
        return (
            np.asarray(x_train, np.float32) / np.float32(max_value),
            np.asarray(x_test, np.float32) / np.float32(max_value),
        )
    return np.asarray(x_train, np.float32), np.asarray(x_test, np.float32)
