"""Datasets that need no files: scikit-learn's digits and a Gaussian mixture.

Both are deterministic functions of their options (the seed included).
"""

from __future__ import annotations

import numpy as np

import dpjax.data._checks as _checks
from dpjax.data.dataset import Dataset
from dpjax.data.normalize import PublicStats, check_scheme, normalize_splits

_DIGITS_MAX_VALUE = 16.0


def load_digits(
    *, test_fraction: float = 0.2, seed: int = 0, normalize: str = "scale"
) -> Dataset:
    """The 1,797 8x8 handwritten digits bundled with scikit-learn (no download).

    Args:
      test_fraction: share of the examples held out for the test split.
      seed: seed of the permutation that assigns examples to the splits.
      normalize: ``"scale"`` (raw values 0..16 divided by 16, the default) or
        ``"none"``. There is no public sample to take standardization constants
        from, and statistics of the training split are not public.

    Returns:
      A :class:`Dataset` named ``"digits"``, input shape ``(8, 8, 1)``, 10 classes.
    """
    from sklearn.datasets import load_digits as sklearn_load_digits

    _checks.open_fraction("test_fraction", test_fraction)
    _checks.seed("seed", seed)
    check_scheme(normalize, max_value=_DIGITS_MAX_VALUE)
    bunch = sklearn_load_digits()
    images = bunch.images[..., None]
    labels = bunch.target.astype(np.int32)
    num_train, _ = _checks.split_sizes("test_fraction", len(labels), test_fraction)
    order = np.random.default_rng(seed).permutation(len(labels))
    train, test = order[:num_train], order[num_train:]
    x_train, x_test = normalize_splits(
        images[train], images[test], normalize, max_value=_DIGITS_MAX_VALUE
    )
    return Dataset(x_train, labels[train], x_test, labels[test], num_classes=10, name="digits")


def load_synthetic(
    *,
    num_train: int = 1000,
    num_test: int = 200,
    num_features: int | None = None,
    input_shape: tuple[int, ...] | None = None,
    num_classes: int = 10,
    separation: float = 4.0,
    noise: float = 1.0,
    seed: int = 0,
    normalize: str = "none",
) -> Dataset:
    """A Gaussian-mixture classification task of any size.

    Each example is ``mu_y + noise * N(0, I)``. The class means are
    ``mu_c = separation * g_c / sqrt(2 d)`` with ``g_c`` standard normal and
    ``d`` the number of features, so ``E|mu_a - mu_b|^2 = separation^2``: two
    means are about ``separation`` apart whatever ``d`` is, and with
    ``noise=1`` the Bayes error between two classes is about
    ``Phi(-separation / 2)``. Labels cycle through the classes and are
    shuffled, so each class has ``num // num_classes`` or one more examples.

    The means, the training split and the test split come from independent
    streams of ``seed``: changing ``num_test`` leaves the training split as it
    was, and the other way round.

    Args:
      num_train, num_test: split sizes (``num_test`` may be 0).
      num_features: features per example, shape ``(num_features,)``; default 16.
      input_shape: the shape of one example instead (e.g. ``(8, 8, 1)``);
        give one of ``num_features`` and ``input_shape``, not both.
      num_classes: number of mixture components.
      separation: typical distance between two class means (0 makes the
        classes identical).
      noise: standard deviation of the within-class noise.
      seed: the seed everything is drawn from.
      normalize: ``"none"`` (default) or ``"standardize"`` with the mixture's
        population statistics (:func:`mixture_stats`: a function of the class
        means and ``noise``, not of the drawn examples).

    Returns:
      A :class:`Dataset` named ``"synthetic"``.
    """
    shape = _synthetic_shape(num_features, input_shape)
    _checks.int_at_least("num_train", num_train, 1)
    _checks.int_at_least("num_test", num_test, 0)
    _checks.int_at_least("num_classes", num_classes, 2)
    _checks.finite_non_negative("separation", separation)
    _checks.finite_non_negative("noise", noise)
    _checks.seed("seed", seed)
    if normalize not in ("none", "standardize"):
        check_scheme(normalize)
    means_rng, train_rng, test_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)
    )
    scale = separation / np.sqrt(2.0 * np.prod(shape))
    means = scale * means_rng.standard_normal((num_classes, *shape))
    x_train, y_train = _mixture_samples(train_rng, means, noise, num_train)
    x_test, y_test = _mixture_samples(test_rng, means, noise, num_test)
    x_train, x_test = normalize_splits(x_train, x_test, normalize,
                                       stats=mixture_stats(means, noise))
    return Dataset(x_train, y_train, x_test, y_test, num_classes=num_classes, name="synthetic")


def mixture_stats(means: np.ndarray, noise: float) -> PublicStats:
    """Per-channel population mean and standard deviation of the mixture (uniform class
    weights): ``m = E_c,pos[mu_c]``, ``var = noise^2 + E_c,pos[(mu_c - m)^2]``. They depend
    on the generator's parameters only, never on the drawn examples."""
    flat = means.reshape(-1, means.shape[-1])
    mean = flat.mean(axis=0)
    std = np.sqrt(noise**2 + np.square(flat - mean).mean(axis=0))
    std = np.where(std > 0, std, 1.0)
    return PublicStats(tuple(mean), tuple(std), "synthetic mixture's population statistics")


def _synthetic_shape(
    num_features: int | None, input_shape: tuple[int, ...] | None
) -> tuple[int, ...]:
    if num_features is not None and input_shape is not None:
        raise ValueError(
            f"Expected only one of num_features={num_features!r} and "
            f"input_shape={input_shape!r} to be set."
        )
    if input_shape is not None:
        return _checks.shape("input_shape", input_shape)
    num_features = 16 if num_features is None else num_features
    _checks.int_at_least("num_features", num_features, 1)
    return (int(num_features),)


def _mixture_samples(
    rng: np.random.Generator, means: np.ndarray, noise: float, num: int
) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.permutation(np.arange(num) % means.shape[0]).astype(np.int32)
    x = means[labels] + noise * rng.standard_normal((num, *means.shape[1:]))
    return x, labels
