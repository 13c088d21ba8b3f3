import numpy as np
import pytest

from dpjax.data import channel_stats, load_dataset, normalize_splits, standardize
from dpjax.data.normalize import PublicStats

STATS = PublicStats((100.0, 120.0, 90.0), (50.0, 60.0, 70.0), "test constants")


def _images(num, seed):
    return np.random.default_rng(seed).integers(0, 256, (num, 4, 4, 3)).astype(np.uint8)


def test_channel_stats_are_per_channel_mean_and_std_of_the_train_split():
    x = np.random.default_rng(0).normal([1.0, -2.0, 5.0], [0.5, 2.0, 3.0], (200, 6, 3))
    mean, std = channel_stats(x)
    np.testing.assert_allclose(mean, x.reshape(-1, 3).mean(0), rtol=1e-12)
    np.testing.assert_allclose(std, x.reshape(-1, 3).std(0), rtol=1e-12)


def test_channel_stats_are_accurate_for_a_large_mean():
    x = 1e6 + np.random.default_rng(1).standard_normal((1000, 1))
    _, std = channel_stats(x)
    np.testing.assert_allclose(std, x.std(), rtol=1e-9)


def test_constant_channel_gets_unit_std():
    x = np.zeros((10, 2, 2))
    mean, std = channel_stats(x)
    np.testing.assert_array_equal(mean, [0.0, 0.0])
    np.testing.assert_array_equal(std, [1.0, 1.0])


def test_standardize_applies_the_given_public_constants_to_both_splits():
    train, test = _images(50, 0), _images(20, 1)
    x_train, x_test = normalize_splits(train, test, "standardize", stats=STATS)
    assert x_train.dtype == x_test.dtype == np.float32
    mean, std = np.array(STATS.mean), np.array(STATS.std)
    np.testing.assert_allclose(x_train, (train - mean) / std, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(x_test, (test - mean) / std, rtol=1e-5, atol=1e-6)


def test_an_outlier_added_to_the_training_split_moves_no_other_example():
    """The adversarial review's probe: one example with value 1e4 moved every other
    example's standardized features when statistics came from the training split."""
    train = _images(50, 0).astype(np.float64)
    outlier = np.full((1, 4, 4, 3), 1e4)
    for scheme, kw in (("standardize", {"stats": STATS}), ("scale", {"max_value": 255.0}),
                       ("none", {})):
        a, _ = normalize_splits(train, _images(3, 1), scheme, **kw)
        b, _ = normalize_splits(np.concatenate([train, outlier]), _images(3, 1), scheme, **kw)
        np.testing.assert_array_equal(a, b[:50], err_msg=scheme)


def test_standardize_without_public_statistics_is_refused():
    with pytest.raises(ValueError, match=r"normalize='standardize' to come with public stat"):
        normalize_splits(_images(5, 0), _images(3, 1), "standardize")


def test_constants_must_match_the_channels():
    with pytest.raises(ValueError, match="3 channels"):
        normalize_splits(_images(5, 0), _images(3, 1), "standardize",
                         stats=PublicStats((1.0, 2.0), (1.0, 1.0), "two"))
    with pytest.raises(ValueError, match=r"std=\[1.0, 0.0\] to be > 0"):
        PublicStats((1.0, 2.0), (1.0, 0.0), "zero")


def test_synthetic_train_data_ignores_the_test_split_when_standardized():
    common = dict(num_train=300, num_features=5, seed=3, normalize="standardize")
    small = load_dataset("synthetic", num_test=10, noise=1.0, **common)
    large = load_dataset("synthetic", num_test=500, noise=1.0, **common)
    np.testing.assert_array_equal(small.x_train, large.x_train)


def test_synthetic_standardization_uses_population_constants_not_the_draws():
    """The constants are the mixture's population statistics: the same whatever the
    training split drawn (its size here), computed below from the class means alone."""
    from dpjax.data.embedded import load_synthetic

    for num_train in (50, 400):
        kw = dict(num_train=num_train, num_test=5, num_features=3, seed=8, noise=0.5)
        raw = load_synthetic(**kw)
        std = load_synthetic(normalize="standardize", **kw)
        means_rng = np.random.default_rng(np.random.SeedSequence(8).spawn(3)[0])
        means = 4.0 / np.sqrt(2.0 * 3) * means_rng.standard_normal((10, 3))
        m = means.mean(0)
        s = np.sqrt(0.25 + ((means - m) ** 2).mean(0))
        np.testing.assert_allclose(std.x_train, (raw.x_train - m) / s, rtol=1e-5, atol=1e-6)


def test_scale_divides_by_the_format_maximum():
    train, test = _images(5, 0), _images(3, 1)
    x_train, x_test = normalize_splits(train, test, "scale", max_value=255.0)
    np.testing.assert_allclose(x_train, train / 255.0, rtol=1e-6)
    np.testing.assert_allclose(x_test, test / 255.0, rtol=1e-6)


def test_none_keeps_raw_values_as_float32():
    train = _images(5, 0)
    x_train, _ = normalize_splits(train, _images(3, 1), "none")
    assert x_train.dtype == np.float32
    np.testing.assert_array_equal(x_train, train)


def test_scale_is_refused_without_a_format_maximum():
    accepted = r"\['standardize', 'none'\]"
    with pytest.raises(ValueError, match=rf"normalize='scale' to be one of {accepted}"):
        normalize_splits(_images(5, 0), _images(3, 1), "scale", stats=STATS)


def test_unknown_scheme_is_refused():
    with pytest.raises(ValueError, match=r"normalize='minmax'.*'standardize', 'scale', 'none'"):
        normalize_splits(_images(5, 0), _images(3, 1), "minmax", max_value=255.0, stats=STATS)


def test_standardize_matches_formula():
    x = np.array([[[0.0]], [[2.0]]])
    out = standardize(x, np.array([1.0]), np.array([2.0]))
    np.testing.assert_array_equal(out, np.array([[[-0.5]], [[0.5]]], np.float32))
