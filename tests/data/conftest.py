"""Fixtures for the data tests: tiny dataset files written into ``tmp_path``."""

from __future__ import annotations

import gzip
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801


@pytest.fixture(autouse=True)
def _warnings_are_errors():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """An IDX file: big-endian magic, big-endian uint32 dims, then the bytes."""
    dims = np.asarray(array.shape, dtype=">u4").tobytes()
    return magic.to_bytes(4, "big") + dims + np.asarray(array, np.uint8).tobytes()


@pytest.fixture(name="idx_bytes")
def idx_bytes_fixture() -> Callable[[np.ndarray, int], bytes]:
    return idx_bytes


def write_file(path: Path, content: bytes, gz: bool) -> Path:
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(content))
    else:
        path.write_bytes(content)
    return path


@pytest.fixture
def idx_dir(tmp_path: Path) -> Callable[..., tuple[Path, dict[str, np.ndarray]]]:
    """Writes the four IDX files of a tiny 10-class image dataset; returns dir and arrays."""

    def write(
        num_train: int = 12, num_test: int = 5, rows: int = 4, cols: int = 3, gz: bool = False
    ) -> tuple[Path, dict[str, np.ndarray]]:
        rng = np.random.default_rng(0)
        arrays = {
            "train-images-idx3-ubyte": rng.integers(0, 256, (num_train, rows, cols), np.uint8),
            "train-labels-idx1-ubyte": np.arange(num_train, dtype=np.uint8) % 10,
            "t10k-images-idx3-ubyte": rng.integers(0, 256, (num_test, rows, cols), np.uint8),
            "t10k-labels-idx1-ubyte": (np.arange(num_test, dtype=np.uint8) * 3) % 10,
        }
        for name, array in arrays.items():
            magic = IMAGES_MAGIC if array.ndim == 3 else LABELS_MAGIC
            write_file(tmp_path / name, idx_bytes(array, magic), gz)
        return tmp_path, arrays

    return write


def cifar_batch(num: int, seed: int) -> dict[bytes, object]:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"tiny",
        b"data": rng.integers(0, 256, (num, 3072), np.uint8),
        b"labels": [int(v) for v in rng.integers(0, 10, num)],
    }


@pytest.fixture
def cifar_dir(tmp_path: Path) -> Callable[..., Path]:
    """Writes tiny ``cifar-10-batches-py`` pickles (3 images each) under ``tmp_path``."""

    def write(num_per_batch: int = 3) -> Path:
        folder = tmp_path / "cifar-10-batches-py"
        folder.mkdir()
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        for seed, name in enumerate(names):
            with open(folder / name, "wb") as f:
                pickle.dump(cifar_batch(num_per_batch, seed), f)
        return folder

    return write
