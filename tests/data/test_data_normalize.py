import numpy as np
import pytest

from dpjax.data import channel_stats, load_dataset, normalize_splits, standardize


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


def test_standardized_train_split_has_zero_mean_unit_std_per_channel():
    x_train, x_test = normalize_splits(_images(50, 0), _images(20, 1), "standardize")
    assert x_train.dtype == x_test.dtype == np.float32
    np.testing.assert_allclose(x_train.reshape(-1, 3).mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(x_train.reshape(-1, 3).std(0), 1.0, atol=1e-5)


def test_test_split_is_transformed_with_train_statistics():
    train, test = _images(50, 0), _images(20, 1)
    _, x_test = normalize_splits(train, test, "standardize")
    mean, std = channel_stats(train)
    np.testing.assert_allclose(x_test, (test - mean) / std, rtol=1e-5, atol=1e-5)


def test_changing_the_test_split_does_not_change_normalized_train_data():
    train = _images(50, 0)
    a_train, a_test = normalize_splits(train, _images(20, 1), "standardize")
    b_train, b_test = normalize_splits(train, _images(7, 2) // 2, "standardize")
    np.testing.assert_array_equal(a_train, b_train)
    assert a_test.shape != b_test.shape


def test_synthetic_train_data_ignores_the_test_split_when_standardized():
    common = dict(num_train=300, num_features=5, seed=3, normalize="standardize")
    small = load_dataset("synthetic", num_test=10, noise=1.0, **common)
    large = load_dataset("synthetic", num_test=500, noise=1.0, **common)
    np.testing.assert_array_equal(small.x_train, large.x_train)


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
        normalize_splits(_images(5, 0), _images(3, 1), "scale")


def test_unknown_scheme_is_refused():
    with pytest.raises(ValueError, match=r"normalize='minmax'.*'standardize', 'scale', 'none'"):
        normalize_splits(_images(5, 0), _images(3, 1), "minmax", max_value=255.0)


def test_standardize_matches_formula():
    x = np.array([[[0.0]], [[2.0]]])
    out = standardize(x, np.array([1.0]), np.array([2.0]))
    np.testing.assert_array_equal(out, np.array([[[-0.5]], [[0.5]]], np.float32))
