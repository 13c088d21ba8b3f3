import re

import numpy as np
import pytest

from dpjax.data import load_dataset


def _arrays(num_train=20, num_test=6, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.standard_normal((num_train, 5, 2)),
        "y_train": (np.arange(num_train) % 4).astype(np.int64),
        "x_test": rng.standard_normal((num_test, 5, 2)),
        "y_test": (np.arange(num_test) % 3).astype(np.uint8),
    }


def _write(tmp_path, arrays, name="data.npz"):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def test_npz_round_trip(tmp_path):
    arrays = _arrays()
    dataset = load_dataset("npz", path=_write(tmp_path, arrays), num_classes=4)
    assert dataset.name == "npz" and dataset.num_classes == 4
    assert dataset.input_shape == (5, 2)
    assert dataset.x_test.dtype == np.float32 and dataset.y_test.dtype == np.int32
    np.testing.assert_allclose(dataset.x_train, arrays["x_train"], rtol=1e-6)
    np.testing.assert_array_equal(dataset.y_test, arrays["y_test"])


def test_npz_num_classes_option_gives_the_classes(tmp_path):
    dataset = load_dataset("npz", path=str(_write(tmp_path, _arrays())), num_classes=7)
    assert dataset.num_classes == 7


def test_npz_label_beyond_the_classes_asks_for_num_classes(tmp_path):
    arrays = _arrays()
    arrays["y_test"][0] = 4
    path = _write(tmp_path, arrays)
    with pytest.raises(ValueError, match=r"y_test .* in \[0, 4\); found min=0, max=4\. Pass"):
        load_dataset("npz", path=path, num_classes=4)


def test_npz_num_classes_is_never_inferred_from_the_training_labels(tmp_path):
    """One extra example labelled 7 used to change the output width from 2 to 8."""
    with pytest.raises(ValueError, match=r"Expected num_classes .* never inferred"):
        load_dataset("npz", path=_write(tmp_path, _arrays()))


def test_npz_a_public_label_list_in_the_file_gives_the_classes(tmp_path):
    arrays = dict(_arrays(), class_names=np.array(["a", "b", "c", "d", "e"]))
    dataset = load_dataset("npz", path=_write(tmp_path, arrays))
    assert dataset.num_classes == 5
    with pytest.raises(ValueError, match="num_classes=4 to equal the 5 class_names"):
        load_dataset("npz", path=_write(tmp_path, arrays), num_classes=4)


def test_npz_standardize_needs_supplied_constants_and_uses_them(tmp_path):
    path = _write(tmp_path, _arrays())
    with pytest.raises(ValueError, match="public statistics"):
        load_dataset("npz", path=path, num_classes=4, normalize="standardize")
    raw = load_dataset("npz", path=path, num_classes=4)
    std = load_dataset("npz", path=path, num_classes=4, normalize="standardize",
                       mean=[1.0, -1.0], std=[2.0, 0.5])
    np.testing.assert_allclose(std.x_train, (raw.x_train - [1.0, -1.0]) / [2.0, 0.5],
                               rtol=1e-6)
    scaled = load_dataset("npz", path=path, num_classes=4, normalize="scale", max_value=4.0)
    np.testing.assert_allclose(scaled.x_train, raw.x_train / 4.0, rtol=1e-6)


def test_npz_missing_file_names_the_path(tmp_path):
    path = tmp_path / "absent.npz"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        load_dataset("npz", path=path)


def test_npz_missing_array_is_named(tmp_path):
    arrays = _arrays()
    del arrays["y_test"]
    with pytest.raises(ValueError, match="it lacks y_test"):
        load_dataset("npz", path=_write(tmp_path, arrays))


def test_npz_file_that_is_not_an_archive_is_refused(tmp_path):
    path = tmp_path / "bad.npz"
    path.write_bytes(b"definitely not a zip file")
    with pytest.raises(ValueError, match=f"Expected {re.escape(str(path))} to be an .npz file"):
        load_dataset("npz", path=path)


def test_npz_single_array_file_is_refused(tmp_path):
    path = tmp_path / "single.npy"
    np.save(path, np.zeros(3))
    with pytest.raises(ValueError, match="single array"):
        load_dataset("npz", path=path)


def test_npz_float_labels_are_refused(tmp_path):
    arrays = dict(_arrays(), y_train=np.zeros(20))
    with pytest.raises(ValueError, match="y_train in .* to be 1-D integers; got float64"):
        load_dataset("npz", path=_write(tmp_path, arrays))


def test_npz_count_mismatch_is_refused(tmp_path):
    arrays = dict(_arrays(), y_train=np.arange(19) % 4)
    with pytest.raises(ValueError, match="y_train in .* same number of examples; got 20 and 19"):
        load_dataset("npz", path=_write(tmp_path, arrays))


def test_npz_vector_features_need_an_example_axis(tmp_path):
    arrays = dict(_arrays(), x_test=np.zeros(6))
    with pytest.raises(ValueError, match=r"x_test .* shape \[N, \*input_shape\]"):
        load_dataset("npz", path=_write(tmp_path, arrays))
