"""Feature normalization whose statistics come from the training split only.

Fitting statistics on the test split would let test examples shape the
training inputs; every scheme here is a function of the training features
(or of a fixed, data-independent constant) and is applied unchanged to both
splits.
"""

from __future__ import annotations

import numpy as np

from dpjax._validate import one_of

NORMALIZATIONS = ("standardize", "scale", "none")
"""Accepted values of the ``normalize`` option of the loaders.

``"standardize"``: subtract the per-channel mean and divide by the per-channel
standard deviation of the training split (channel = last axis of an example).
``"scale"``: divide by the format's fixed maximum value (e.g. 255 for 8-bit
images), mapping raw values into ``[0, 1]``; only for formats that have one.
``"none"``: the raw values as ``float32``.
"""

_CHUNK_ROWS = 1 << 16


def channel_stats(x_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of the training features.

    Returns two ``float64`` arrays of shape ``[channels]`` (the last axis).
    A channel with zero spread gets standard deviation 1, so standardizing it
    leaves it centred instead of dividing by zero.
    """
    if x_train.ndim < 2 or x_train.shape[0] == 0:
        raise ValueError(
            f"Expected x_train with at least one example and 2 dims; got shape {x_train.shape}."
        )
    # Two passes over chunks of rows in float64: exact enough for large
    # means, without a float64 copy of the whole split (1.2 GB for CIFAR-10).
    flat = x_train.reshape(-1, x_train.shape[-1])
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
    return (np.asarray(x, np.float32) - mean.astype(np.float32)) / std.astype(np.float32)


def check_scheme(scheme: str, *, max_value: float | None = None) -> None:
    """Raise ``ValueError`` unless ``scheme`` applies (``"scale"`` needs ``max_value``).

    Loaders call this before reading or generating anything.
    """
    accepted = NORMALIZATIONS if max_value is not None else ("standardize", "none")
    one_of("normalize", scheme, accepted)


def normalize_splits(
    x_train: np.ndarray,
    x_test: np.ndarray,
    scheme: str,
    *,
    max_value: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Normalize both splits with ``scheme`` fitted on ``x_train`` only.

    Args:
      x_train, x_test: raw features, examples on the leading axis.
      scheme: one of :data:`NORMALIZATIONS`.
      max_value: the format's fixed maximum raw value, needed by ``"scale"``;
        ``None`` for formats without one, which then refuse ``"scale"``.

    Returns:
      ``(x_train, x_test)`` as ``float32``. The result for ``x_train`` does
      not depend on ``x_test``.
    """
    check_scheme(scheme, max_value=max_value)
    if scheme == "standardize":
        mean, std = channel_stats(x_train)
        return standardize(x_train, mean, std), standardize(x_test, mean, std)
    if scheme == "scale":
        return (
            np.asarray(x_train, np.float32) / np.float32(max_value),
            np.asarray(x_test, np.float32) / np.float32(max_value),
        )
    return np.asarray(x_train, np.float32), np.asarray(x_test, np.float32)
