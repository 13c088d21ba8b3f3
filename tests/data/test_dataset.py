import numpy as np
import pytest

from dpjax.data import Dataset


def _arrays(num_train=6, num_test=4, shape=(5, 1)):
    rng = np.random.default_rng(0)
    return dict(
        x_train=rng.standard_normal((num_train, *shape)).astype(np.float32),
        y_train=(np.arange(num_train) % 3).astype(np.int32),
        x_test=rng.standard_normal((num_test, *shape)).astype(np.float32),
        y_test=(np.arange(num_test) % 3).astype(np.int32),
    )


def test_input_shape_and_sizes_come_from_the_arrays():
    dataset = Dataset(**_arrays(shape=(4, 4, 2)), num_classes=3, name="toy")
    assert dataset.input_shape == (4, 4, 2)
    assert (dataset.num_train, dataset.num_test) == (6, 4)


def test_dataset_is_frozen():
    dataset = Dataset(**_arrays(), num_classes=3, name="toy")
    with pytest.raises(AttributeError):
        dataset.name = "other"


def test_label_out_of_range_is_refused():
    arrays = _arrays()
    arrays["y_test"][0] = 3
    with pytest.raises(ValueError, match=r"y_test labels in \[0, 3\); got min=0, max=3"):
        Dataset(**arrays, num_classes=3, name="toy")


def test_negative_label_is_refused():
    arrays = _arrays()
    arrays["y_train"][1] = -1
    with pytest.raises(ValueError, match="y_train labels"):
        Dataset(**arrays, num_classes=3, name="toy")


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("x_train", np.zeros((6, 5, 1), np.float64), "x_train to be a float32"),
        ("y_test", np.zeros(4, np.int64), "y_test to be a 1-D int32"),
        ("y_train", np.zeros(5, np.int32), "same number of examples; got 6 and 5"),
        ("x_test", np.zeros((4, 6, 1), np.float32), r"x_test example shape \(6, 1\)"),
    ],
)
def test_wrong_dtypes_and_shapes_are_refused(key, value, message):
    arrays = _arrays()
    arrays[key] = value
    with pytest.raises(ValueError, match=message):
        Dataset(**arrays, num_classes=3, name="toy")


@pytest.mark.parametrize("num_classes", [1, 2.0, True])
def test_num_classes_must_be_an_integer_at_least_two(num_classes):
    with pytest.raises(ValueError, match="num_classes"):
        Dataset(**_arrays(), num_classes=num_classes, name="toy")
