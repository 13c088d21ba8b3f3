import gzip
import re

import numpy as np
import pytest

from dpjax.data import load_dataset, read_idx

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_idx_round_trip_raw_and_gzipped(idx_dir, name, gz):
    directory, arrays = idx_dir(gz=gz)
    dataset = load_dataset(name, data_dir=directory, normalize="none")
    assert dataset.name == name
    assert dataset.input_shape == (4, 3, 1)
    assert dataset.x_train.dtype == np.float32 and dataset.y_train.dtype == np.int32
    np.testing.assert_array_equal(dataset.x_train[..., 0], arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(dataset.x_test[..., 0], arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(dataset.y_train, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(dataset.y_test, arrays["t10k-labels-idx1-ubyte"])


def test_idx_scale_and_standardize_use_pixel_values(idx_dir):
    directory, arrays = idx_dir()
    scaled = load_dataset("mnist", data_dir=str(directory), normalize="scale")
    np.testing.assert_allclose(scaled.x_train[..., 0], arrays["train-images-idx3-ubyte"] / 255.0)
    standardized = load_dataset("mnist", data_dir=directory)
    # the published MNIST constants (0.1307, 0.3081 of 255), never the files' statistics
    expected = (arrays["t10k-images-idx3-ubyte"] - 0.1307 * 255) / (0.3081 * 255)
    np.testing.assert_allclose(standardized.x_test[..., 0], expected, rtol=1e-5, atol=1e-5)
    fashion = load_dataset("fashion_mnist", data_dir=directory)
    expected = (arrays["train-images-idx3-ubyte"] - 0.2860 * 255) / (0.3530 * 255)
    np.testing.assert_allclose(fashion.x_train[..., 0], expected, rtol=1e-5, atol=1e-5)


def test_idx_missing_file_names_the_path_and_the_expected_files(idx_dir):
    directory, _ = idx_dir()
    (directory / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError) as error:
        load_dataset("mnist", data_dir=directory)
    message = str(error.value)
    assert str(directory / "t10k-labels-idx1-ubyte") in message
    assert "train-images-idx3-ubyte" in message and "data_dir" in message


def test_idx_missing_directory_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere"))):
        load_dataset("fashion_mnist", data_dir=tmp_path / "nowhere")


def test_idx_bad_magic_is_refused(idx_dir, idx_bytes):
    directory, arrays = idx_dir()
    path = directory / "train-images-idx3-ubyte"
    path.write_bytes(idx_bytes(arrays["train-images-idx3-ubyte"], 0x00000D03))  # float32 code
    with pytest.raises(
        ValueError, match=f"0x{IMAGES_MAGIC:08x} in {re.escape(str(path))}; found 0x00000d03"
    ):
        load_dataset("mnist", data_dir=directory)


def test_idx_labels_file_given_as_images_is_refused(idx_dir):
    directory, _ = idx_dir()
    images = directory / "train-images-idx3-ubyte"
    images.write_bytes((directory / "train-labels-idx1-ubyte").read_bytes())
    with pytest.raises(
        ValueError, match=f"0x00000803 in {re.escape(str(images))}; found 0x00000801"
    ):
        load_dataset("mnist", data_dir=directory)


def test_idx_count_mismatch_between_images_and_labels_is_refused(idx_dir, idx_bytes):
    directory, arrays = idx_dir()
    labels = arrays["train-labels-idx1-ubyte"][:-1]
    (directory / "train-labels-idx1-ubyte").write_bytes(idx_bytes(labels, LABELS_MAGIC))
    with pytest.raises(ValueError, match="has 12 images and .* has 11 labels"):
        load_dataset("mnist", data_dir=directory)


def test_idx_truncated_file_is_refused(idx_dir):
    directory, _ = idx_dir(gz=True)
    path = directory / "t10k-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-1]))
    with pytest.raises(
        ValueError, match=f"Expected {re.escape(str(path))} to hold {len(raw)} bytes"
    ):
        load_dataset("mnist", data_dir=directory)


def test_idx_header_shorter_than_announced_is_refused(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(LABELS_MAGIC.to_bytes(4, "big"))
    with pytest.raises(ValueError, match="8-byte IDX header; the file has 4 bytes"):
        read_idx(path, LABELS_MAGIC)


def test_idx_corrupt_gzip_is_refused(idx_dir):
    directory, _ = idx_dir(gz=True)
    path = directory / "train-labels-idx1-ubyte.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(
        ValueError, match=f"Expected {re.escape(str(path))} to be a readable IDX file"
    ):
        load_dataset("mnist", data_dir=directory)


def test_idx_label_out_of_range_names_the_file(idx_dir, idx_bytes):
    directory, arrays = idx_dir()
    labels = arrays["t10k-labels-idx1-ubyte"].copy()
    labels[0] = 10
    path = directory / "t10k-labels-idx1-ubyte"
    path.write_bytes(idx_bytes(labels, LABELS_MAGIC))
    with pytest.raises(
        ValueError, match=rf"labels in \[0, 10\) in {re.escape(str(path))}; found 10"
    ):
        load_dataset("mnist", data_dir=directory)
