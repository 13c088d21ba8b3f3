import pickle
import re

import numpy as np
import pytest

from dpjax.data import load_dataset


def _batch(path):
    with open(path, "rb") as f:
        return pickle.load(f)


@pytest.mark.parametrize("use_parent", [False, True])
def test_cifar_round_trip_as_nhwc(cifar_dir, use_parent):
    folder = cifar_dir()
    data_dir = folder.parent if use_parent else folder
    dataset = load_dataset("cifar10", data_dir=data_dir, normalize="none")
    assert dataset.name == "cifar10" and dataset.num_classes == 10
    assert dataset.input_shape == (32, 32, 3)
    assert (dataset.num_train, dataset.num_test) == (15, 3)
    assert dataset.x_train.dtype == np.float32 and dataset.y_train.dtype == np.int32
    first = _batch(folder / "data_batch_1")
    # Row layout: 1024 red, then 1024 green, then 1024 blue values, each row-major 32x32.
    red_pixel_row2_col5 = first[b"data"][1, 2 * 32 + 5]
    blue_pixel_row2_col5 = first[b"data"][1, 2048 + 2 * 32 + 5]
    assert dataset.x_train[1, 2, 5, 0] == red_pixel_row2_col5
    assert dataset.x_train[1, 2, 5, 2] == blue_pixel_row2_col5
    test = _batch(folder / "test_batch")
    np.testing.assert_array_equal(dataset.y_test, test[b"labels"])
    last = _batch(folder / "data_batch_5")
    np.testing.assert_array_equal(dataset.y_train[-3:], last[b"labels"])


def test_cifar_standardize_uses_the_published_per_channel_constants(cifar_dir):
    folder = cifar_dir()
    raw = load_dataset("cifar10", data_dir=folder, normalize="none")
    dataset = load_dataset("cifar10", data_dir=folder)
    mean = 255 * np.array([0.4914, 0.4822, 0.4465])
    std = 255 * np.array([0.2470, 0.2435, 0.2616])
    np.testing.assert_allclose(dataset.x_train, (raw.x_train - mean) / std, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dataset.x_test, (raw.x_test - mean) / std, rtol=1e-5, atol=1e-5)


def test_cifar_missing_batch_names_the_folder_and_the_files(cifar_dir):
    folder = cifar_dir()
    (folder / "data_batch_3").unlink()
    (folder / "test_batch").unlink()
    with pytest.raises(FileNotFoundError) as error:
        load_dataset("cifar10", data_dir=folder.parent)
    message = str(error.value)
    assert "data_batch_3, test_batch" in message and str(folder) in message
    assert "cifar-10-python.tar.gz" in message


def test_cifar_empty_directory_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        load_dataset("cifar10", data_dir=tmp_path)


def test_cifar_label_count_mismatch_is_refused(cifar_dir):
    folder = cifar_dir()
    batch = _batch(folder / "data_batch_2")
    batch[b"labels"] = batch[b"labels"][:-1]
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump(batch, f)
    path = re.escape(str(folder / "data_batch_2"))
    with pytest.raises(ValueError, match=f"Expected 3 labels in {path}, one per image"):
        load_dataset("cifar10", data_dir=folder)


def test_cifar_wrong_row_size_is_refused(cifar_dir):
    folder = cifar_dir()
    batch = _batch(folder / "test_batch")
    batch[b"data"] = batch[b"data"][:, :1024]
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(batch, f)
    with pytest.raises(ValueError, match=r"uint8 of shape \[N, 3072\]; got uint8 \(3, 1024\)"):
        load_dataset("cifar10", data_dir=folder)


def test_cifar_non_pickle_file_is_refused(cifar_dir):
    folder = cifar_dir()
    (folder / "data_batch_4").write_bytes(b"\x00garbage")
    path = re.escape(str(folder / "data_batch_4"))
    with pytest.raises(ValueError, match=f"Expected {path} to be a CIFAR-10 pickle batch"):
        load_dataset("cifar10", data_dir=folder)


def test_cifar_batch_without_labels_key_is_refused(cifar_dir):
    folder = cifar_dir()
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"data": np.zeros((3, 3072), np.uint8)}, f)
    with pytest.raises(ValueError, match="dict with keys b'data' and b'labels'"):
        load_dataset("cifar10", data_dir=folder)


def test_cifar_label_out_of_range_is_refused(cifar_dir):
    folder = cifar_dir()
    batch = _batch(folder / "data_batch_1")
    batch[b"labels"][0] = 10
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump(batch, f)
    with pytest.raises(ValueError, match=r"integer labels in \[0, 10\)"):
        load_dataset("cifar10", data_dir=folder)
