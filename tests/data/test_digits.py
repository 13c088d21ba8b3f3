import numpy as np
import pytest
from sklearn.datasets import load_digits

from dpjax.data import load_dataset


def test_digits_shapes_dtypes_and_classes():
    dataset = load_dataset("digits")
    assert dataset.name == "digits"
    assert dataset.input_shape == (8, 8, 1)
    assert (dataset.num_train, dataset.num_test) == (1438, 359)  # 1797 * 0.2 = 359.4
    assert dataset.x_train.dtype == np.float32 and dataset.y_train.dtype == np.int32
    assert dataset.num_classes == 10
    np.testing.assert_array_equal(np.unique(dataset.y_train), np.arange(10))
    np.testing.assert_array_equal(np.unique(dataset.y_test), np.arange(10))


def test_digits_split_is_fixed_by_the_seed():
    a, b = load_dataset("digits", seed=1), load_dataset("digits", seed=1)
    c = load_dataset("digits", seed=2)
    np.testing.assert_array_equal(a.x_test, b.x_test)
    np.testing.assert_array_equal(a.y_train, b.y_train)
    assert not np.array_equal(a.y_train, c.y_train)


def test_digits_splits_partition_the_1797_images():
    dataset = load_dataset("digits", test_fraction=0.5, normalize="none")
    images = np.concatenate([dataset.x_train, dataset.x_test]).reshape(1797, -1)
    assert images.min() == 0.0 and images.max() == 16.0
    assert dataset.num_test == 898  # round(898.5) rounds half to even
    bunch = load_digits()
    labels = np.concatenate([dataset.y_train, dataset.y_test])
    ours = np.column_stack([images, labels])
    theirs = np.column_stack([bunch.data, bunch.target])
    np.testing.assert_array_equal(ours[np.lexsort(ours.T)], theirs[np.lexsort(theirs.T)])


def test_digits_scale_maps_pixels_into_unit_interval():
    dataset = load_dataset("digits", normalize="scale")
    assert dataset.x_train.min() == 0.0 and dataset.x_train.max() == 1.0


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("test_fraction", 1.0, r"test_fraction=1.0 to be a float in \(0, 1\)"),
        ("test_fraction", 0.0001, "at least one example in each split"),
        ("seed", -1, "seed=-1 to be an integer >= 0"),
        ("normalize", "zscore", "normalize='zscore'"),
    ],
)
def test_digits_invalid_options_name_key_and_value(key, value, message):
    with pytest.raises(ValueError, match=message):
        load_dataset("digits", **{key: value})
