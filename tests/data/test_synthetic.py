import numpy as np
import pytest

from dpjax.data import load_dataset


def _nearest_centroid_accuracy(dataset):
    x_train = dataset.x_train.reshape(dataset.num_train, -1)
    x_test = dataset.x_test.reshape(dataset.num_test, -1)
    centroids = np.stack(
        [x_train[dataset.y_train == c].mean(0) for c in range(dataset.num_classes)]
    )
    distances = ((x_test[:, None, :] - centroids[None]) ** 2).sum(-1)
    return float((distances.argmin(1) == dataset.y_test).mean())


def test_synthetic_shapes_and_balanced_labels():
    dataset = load_dataset("synthetic", num_train=103, num_test=20, num_features=7, num_classes=5)
    assert dataset.input_shape == (7,)
    assert dataset.x_train.shape == (103, 7) and dataset.x_test.shape == (20, 7)
    assert dataset.x_train.dtype == np.float32 and dataset.y_test.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(dataset.y_train), [21, 21, 21, 20, 20])


def test_synthetic_accepts_an_image_input_shape():
    dataset = load_dataset("synthetic", num_train=10, num_test=3, input_shape=[4, 4, 2])
    assert dataset.input_shape == (4, 4, 2)


def test_synthetic_is_deterministic_in_the_seed():
    a = load_dataset("synthetic", seed=5)
    b = load_dataset("synthetic", seed=5)
    c = load_dataset("synthetic", seed=6)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.allclose(a.x_train, c.x_train)


def test_synthetic_train_split_does_not_depend_on_num_test():
    a = load_dataset("synthetic", num_test=0)
    b = load_dataset("synthetic", num_test=300)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert a.num_test == 0


def test_high_separation_is_separable_by_nearest_centroid():
    # 1000 train / 1000 test, 10 classes; pairwise Bayes error ~ Phi(-10/2) ~ 3e-7.
    dataset = load_dataset("synthetic", num_test=1000, separation=10.0, seed=0)
    assert _nearest_centroid_accuracy(dataset) > 0.99


def test_zero_separation_is_at_chance_level():
    # 1000 test examples, 10 classes: chance 0.1, binomial std ~ 0.0095; bound 0.1 + 5 std.
    dataset = load_dataset("synthetic", num_test=1000, separation=0.0, seed=0)
    assert _nearest_centroid_accuracy(dataset) < 0.15


def test_mean_distance_follows_separation_whatever_the_dimension():
    dataset = load_dataset(
        "synthetic",
        num_train=20_000,
        num_test=0,
        num_features=400,
        num_classes=20,
        separation=3.0,
        noise=0.0,
    )
    means = np.stack([dataset.x_train[dataset.y_train == c][0] for c in range(20)])
    gaps = np.linalg.norm(means[:, None] - means[None], axis=-1)[np.triu_indices(20, 1)]
    # 190 pairs, each |mu_a - mu_b| ~ 3 * chi_400 / sqrt(400): mean 3 within 1%.
    assert abs(gaps.mean() - 3.0) < 0.05


@pytest.mark.parametrize(
    "options, message",
    [
        ({"num_train": 0}, "num_train=0 to be an integer >= 1"),
        ({"num_test": -1}, "num_test=-1 to be an integer >= 0"),
        ({"num_classes": 1}, "num_classes=1 to be an integer >= 2"),
        ({"num_features": 2.5}, "num_features=2.5"),
        ({"num_features": 3, "input_shape": (3,)}, "only one of num_features=3 and input_shape"),
        ({"input_shape": (0, 2)}, r"input_shape=\(0, 2\)"),
        ({"separation": float("nan")}, "separation=nan to be a finite number >= 0"),
        ({"noise": -1.0}, "noise=-1.0"),
        ({"normalize": "scale"}, "normalize='scale'"),
    ],
)
def test_synthetic_invalid_options_name_key_and_value(options, message):
    with pytest.raises(ValueError, match=message):
        load_dataset("synthetic", **options)
