import os
import random

import numpy as np
import pytest
from mnist1d.data import get_dataset_args, make_dataset

import dpjax.data.mnist1d as mnist1d_module
from dpjax.data import load_dataset

SMALL = 500


@pytest.fixture
def counted_generate(monkeypatch):
    """Counts the calls to the generator, which still runs."""
    calls = []
    real = mnist1d_module.generate

    def generate(num_samples, seed):
        calls.append((num_samples, seed))
        return real(num_samples, seed)

    monkeypatch.setattr(mnist1d_module, "generate", generate)
    return calls


def test_mnist1d_small_generation_shapes_and_split(tmp_path, counted_generate):
    dataset = load_dataset("mnist1d", num_samples=SMALL, cache_dir=tmp_path)
    assert dataset.name == "mnist1d" and dataset.num_classes == 10
    assert dataset.input_shape == (40, 1)
    assert (dataset.num_train, dataset.num_test) == (429, 71)  # round(500 / 7) = 71
    assert dataset.x_train.dtype == np.float32 and dataset.y_train.dtype == np.int32
    np.testing.assert_array_equal(
        np.bincount(np.concatenate([dataset.y_train, dataset.y_test])), [50] * 10
    )
    assert counted_generate == [(SMALL, 42)]


def test_mnist1d_second_load_reads_the_cache(tmp_path, counted_generate, monkeypatch):
    first = load_dataset("mnist1d", num_samples=SMALL, seed=3, cache_dir=tmp_path)
    assert len(counted_generate) == 1
    (cached,) = tmp_path.glob("*.npz")
    assert cached.name.startswith(f"mnist1d-v2-n{SMALL}-seed3-")
    assert not list(tmp_path.glob("*.tmp"))

    def fail(*args):
        raise AssertionError("the generator ran although the cache exists")

    monkeypatch.setattr(mnist1d_module, "generate", fail)
    second = load_dataset("mnist1d", num_samples=SMALL, seed=3, cache_dir=tmp_path)
    np.testing.assert_array_equal(first.x_train, second.x_train)
    np.testing.assert_array_equal(first.y_test, second.y_test)


def test_mnist1d_is_the_package_generator_before_its_all_sample_standardization(tmp_path):
    """normalize='none' is the raw output: the package's make_dataset gives the same samples
    standardized with the mean and std of all of them (train and test together)."""
    dataset = load_dataset(
        "mnist1d", num_samples=SMALL, seed=7, cache_dir=tmp_path, normalize="none"
    )
    args = get_dataset_args()
    args.num_samples, args.seed = SMALL, 7
    args.train_split = dataset.num_train / SMALL
    reference = make_dataset(args)
    raw = np.concatenate([dataset.x_train, dataset.x_test])[..., 0].astype(np.float64)
    restandardized = (raw - raw.mean()) / raw.std()
    np.testing.assert_allclose(restandardized[: dataset.num_train], reference["x"], rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(restandardized[dataset.num_train:], reference["x_test"],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(dataset.y_test, reference["y_test"])


def test_mnist1d_different_seeds_use_different_cache_files(tmp_path, counted_generate):
    a = load_dataset("mnist1d", num_samples=100, seed=1, cache_dir=tmp_path)
    b = load_dataset("mnist1d", num_samples=100, seed=2, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 2
    assert counted_generate == [(100, 1), (100, 2)]
    assert not np.allclose(a.x_train, b.x_train)


def test_mnist1d_standardizes_with_the_public_constants_whatever_the_data(tmp_path):
    """The constants do not depend on the generated training split: the same map for any
    seed and size, and about unit scale on data (the default seed 42)."""
    for seed, n in ((42, SMALL), (9, 200)):
        raw = load_dataset("mnist1d", num_samples=n, seed=seed, cache_dir=tmp_path,
                           normalize="none")
        std = load_dataset("mnist1d", num_samples=n, seed=seed, cache_dir=tmp_path)
        expected = (raw.x_train + 0.006043231843919859) / 0.15470851248717066
        np.testing.assert_allclose(std.x_train, expected, rtol=1e-5, atol=1e-5)
    assert abs(float(std.x_train.mean())) < 0.1 and abs(float(std.x_train.std()) - 1) < 0.1


@pytest.mark.slow
def test_mnist1d_public_constants_are_the_statistics_of_the_public_sample():
    """Regenerates the independent public sample (10,000 samples, seed 2020) they come from."""
    from dpjax.data.normalize import channel_stats

    x, _ = mnist1d_module.generate(**mnist1d_module.PUBLIC_SAMPLE)
    mean, std = channel_stats(x.astype(np.float64)[..., None])
    np.testing.assert_allclose(mean, mnist1d_module.PUBLIC_STATS.mean, rtol=1e-6)
    np.testing.assert_allclose(std, mnist1d_module.PUBLIC_STATS.std, rtol=1e-6)


def test_mnist1d_restores_the_global_random_state(tmp_path):
    np.random.seed(123)
    random.seed(123)
    expected_numpy, expected_python = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(123)
    load_dataset("mnist1d", num_samples=100, cache_dir=tmp_path)
    assert np.random.rand() == expected_numpy
    assert random.random() == expected_python


def test_mnist1d_corrupt_cache_is_regenerated(tmp_path, counted_generate):
    load_dataset("mnist1d", num_samples=100, cache_dir=tmp_path)
    (cached,) = tmp_path.glob("*.npz")
    cached.write_bytes(b"truncated")
    dataset = load_dataset("mnist1d", num_samples=100, cache_dir=tmp_path)
    assert len(counted_generate) == 2
    assert dataset.num_train + dataset.num_test == 100


def test_mnist1d_cache_dir_defaults_to_the_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("DPJAX_CACHE_DIR", str(tmp_path))
    assert mnist1d_module.resolve_cache_dir(None) == tmp_path / "mnist1d"
    monkeypatch.delenv("DPJAX_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert mnist1d_module.resolve_cache_dir(None) == tmp_path / "home/.cache/dpjax/mnist1d"


@pytest.mark.parametrize(
    "options, message",
    [
        ({"num_samples": 505}, "num_samples=505 to be a multiple of 10"),
        ({"num_samples": 0}, "num_samples=0 to be an integer >= 10"),
        ({"test_fraction": 0}, r"test_fraction=0 to be a float in \(0, 1\)"),
        ({"seed": "42"}, "seed='42' to be an integer >= 0"),
        ({"normalize": "scale"}, "normalize='scale'"),
    ],
)
def test_mnist1d_invalid_options_name_key_and_value(tmp_path, counted_generate, options, message):
    with pytest.raises(ValueError, match=message):
        load_dataset("mnist1d", cache_dir=tmp_path, **{"num_samples": 100, **options})
    assert counted_generate == []


def test_mnist1d_cache_file_follows_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        load_dataset("mnist1d", num_samples=100, cache_dir=tmp_path)
    finally:
        os.umask(previous)
    (cached,) = tmp_path.glob("*.npz")
    assert cached.stat().st_mode & 0o777 == 0o644
