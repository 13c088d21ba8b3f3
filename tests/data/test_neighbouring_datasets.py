"""Privacy rule 2b per loader: one more training example changes no other example's
features, no shape and no number of classes (only the mechanism may see it).

For each loader that reads the user's files, the same files are written twice, the
second time with one extra training example of extreme values (an outlier, labelled
with the largest class), and every loaded array of the shared examples must be equal
bit for bit, for every normalization the loader offers.
"""

import pickle

import numpy as np
import pytest

from dpjax.data import load_dataset

IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801


def _cifar_batch(num, seed):
    rng = np.random.default_rng(seed)
    return {b"data": rng.integers(0, 256, (num, 3072), np.uint8),
            b"labels": [int(v) for v in rng.integers(0, 10, num)]}


def _assert_neighbours_agree(a, b, extra: int):
    assert b.num_train == a.num_train + extra
    assert a.input_shape == b.input_shape and a.num_classes == b.num_classes
    np.testing.assert_array_equal(a.x_train, b.x_train[: a.num_train])
    np.testing.assert_array_equal(a.y_train, b.y_train[: a.num_train])
    np.testing.assert_array_equal(a.x_test, b.x_test)


def _write_idx(idx_bytes, folder, train_images, train_labels):
    rng = np.random.default_rng(1)
    folder.mkdir()
    files = {
        "train-images-idx3-ubyte": (train_images, IMAGES_MAGIC),
        "train-labels-idx1-ubyte": (train_labels, LABELS_MAGIC),
        "t10k-images-idx3-ubyte": (rng.integers(0, 256, (4, 5, 5), np.uint8), IMAGES_MAGIC),
        "t10k-labels-idx1-ubyte": (np.arange(4, dtype=np.uint8), LABELS_MAGIC),
    }
    for name, (array, magic) in files.items():
        (folder / name).write_bytes(idx_bytes(array, magic))
    return folder


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
@pytest.mark.parametrize("normalize", ["standardize", "scale", "none"])
def test_idx_loaders_ignore_a_neighbouring_example(tmp_path, idx_bytes, name, normalize):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 100, (12, 5, 5), np.uint8)
    labels = (np.arange(12) % 3).astype(np.uint8)
    a = load_dataset(name, data_dir=_write_idx(idx_bytes, tmp_path / "a", images, labels),
                     normalize=normalize)
    outlier = np.full((1, 5, 5), 255, np.uint8)
    folder = _write_idx(idx_bytes, tmp_path / "b", np.concatenate([images, outlier]),
                        np.append(labels, np.uint8(9)))
    b = load_dataset(name, data_dir=folder, normalize=normalize)
    _assert_neighbours_agree(a, b, 1)


@pytest.mark.parametrize("normalize", ["standardize", "scale", "none"])
def test_cifar10_ignores_a_neighbouring_example(tmp_path, normalize):
    def write(folder, extra):
        folder.mkdir()
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        for seed, batch_name in enumerate(names):
            batch = _cifar_batch(3, seed)
            if extra and batch_name == "data_batch_5":
                batch[b"data"] = np.concatenate([batch[b"data"], np.full((1, 3072), 255,
                                                                        np.uint8)])
                batch[b"labels"] = [*batch[b"labels"], 9]
            with open(folder / batch_name, "wb") as f:
                pickle.dump(batch, f)
        return folder

    a = load_dataset("cifar10", data_dir=write(tmp_path / "a", False), normalize=normalize)
    b = load_dataset("cifar10", data_dir=write(tmp_path / "b", True), normalize=normalize)
    _assert_neighbours_agree(a, b, 1)


@pytest.mark.parametrize("options", [
    {"normalize": "none"},
    {"normalize": "standardize", "mean": [0.5, -0.5], "std": [2.0, 3.0]},
    {"normalize": "scale", "max_value": 10.0},
])
def test_npz_ignores_a_neighbouring_example(tmp_path, options):
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.standard_normal((20, 5, 2)), "y_train": np.arange(20) % 2,
              "x_test": rng.standard_normal((6, 5, 2)), "y_test": np.arange(6) % 2}
    np.savez(tmp_path / "a.npz", **arrays)
    np.savez(tmp_path / "b.npz", **dict(
        arrays, x_train=np.concatenate([arrays["x_train"], np.full((1, 5, 2), 1e4)]),
        y_train=np.append(arrays["y_train"], 1)))
    a = load_dataset("npz", path=tmp_path / "a.npz", num_classes=2, **options)
    b = load_dataset("npz", path=tmp_path / "b.npz", num_classes=2, **options)
    _assert_neighbours_agree(a, b, 1)


def test_digits_features_are_a_fixed_scaling_of_each_example():
    from sklearn.datasets import load_digits

    images = load_digits().images
    dataset = load_dataset("digits", seed=0)
    order = np.random.default_rng(0).permutation(len(images))
    np.testing.assert_allclose(dataset.x_train[..., 0], images[order[: dataset.num_train]] / 16,
                               rtol=1e-6)
    with pytest.raises(ValueError, match="normalize='standardize'"):
        load_dataset("digits", normalize="standardize")
