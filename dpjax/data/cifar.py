"""CIFAR-10 from the user's "python version" batches (nothing is downloaded).

The official archive ``cifar-10-python.tar.gz`` unpacks to a folder
``cifar-10-batches-py`` holding ``data_batch_1`` .. ``data_batch_5`` and
``test_batch``: pickled dicts with ``b"data"`` (``uint8 [N, 3072]``, each row
the red, green and blue 32x32 planes) and ``b"labels"`` (``N`` ints).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np

from dpjax.data.dataset import Dataset
from dpjax.data.normalize import PublicStats, check_scheme, normalize_splits

FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
IMAGE_SHAPE_CHW = (3, 32, 32)
_PIXEL_MAX_VALUE = 255.0
_NUM_CLASSES = 10
# Per-channel (R, G, B) constants in raw units (0..255): the CIFAR-10 training-set
# statistics as widely published (mean 0.4914 / 0.4822 / 0.4465, std 0.2470 / 0.2435 /
# 0.2616 of 255). Fixed numbers: one example of your files never moves another's features.
PUBLIC_STATS = PublicStats(
    tuple(v * 255 for v in (0.4914, 0.4822, 0.4465)),
    tuple(v * 255 for v in (0.2470, 0.2435, 0.2616)),
    "CIFAR-10 training-set statistics as widely published",
)


def load_cifar10(*, data_dir: str | os.PathLike[str], normalize: str = "standardize") -> Dataset:
    """CIFAR-10 as NHWC images of shape ``(32, 32, 3)``, 10 classes.

    The batches are pickles: only load files you trust (the official
    archive or your own copy of it), since unpickling can run code.

    Args:
      data_dir: the ``cifar-10-batches-py`` folder or the folder containing it.
      normalize: ``"standardize"`` (the published per-channel constants
        :data:`PUBLIC_STATS`, never statistics of the files read), ``"scale"``
        (pixels divided by 255) or ``"none"``.

    Raises:
      FileNotFoundError: a batch is missing (the message names where to put it).
      ValueError: a batch is not a dict with ``b"data"`` and ``b"labels"`` of
        matching sizes.
    """
    check_scheme(normalize, max_value=_PIXEL_MAX_VALUE, stats=PUBLIC_STATS)
    folder = resolve_folder(Path(data_dir).expanduser())
    train = [read_batch(folder / name) for name in TRAIN_BATCHES]
    x_train = np.concatenate([images for images, _ in train])
    y_train = np.concatenate([labels for _, labels in train])
    x_test, y_test = read_batch(folder / TEST_BATCH)
    x_train, x_test = normalize_splits(x_train, x_test, normalize, max_value=_PIXEL_MAX_VALUE,
                                       stats=PUBLIC_STATS)
    return Dataset(x_train, y_train, x_test, y_test, num_classes=_NUM_CLASSES, name="cifar10")


def resolve_folder(data_dir: Path) -> Path:
    """``data_dir/cifar-10-batches-py`` if it is a folder, else ``data_dir``.

    Every batch must be in the folder returned.
    """
    folder = data_dir / FOLDER if (data_dir / FOLDER).is_dir() else data_dir
    missing = [name for name in (*TRAIN_BATCHES, TEST_BATCH) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Expected the CIFAR-10 batches {', '.join(missing)} in {folder}. "
            f"Unpack the official cifar-10-python.tar.gz so that data_dir={str(data_dir)!r} "
            f"is the {FOLDER} folder or contains it; dpjax does not download it."
        )
    return folder


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images ``uint8 [N, 32, 32, 3]`` and labels ``int32 [N]`` of one trusted batch file."""
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as error:
        raise ValueError(f"Expected {path} to be a CIFAR-10 pickle batch: {error}") from error
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"Expected {path} to hold a dict with keys b'data' and b'labels'.")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"])
    row_size = int(np.prod(IMAGE_SHAPE_CHW))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != row_size:
        raise ValueError(
            f"Expected b'data' in {path} to be uint8 of shape [N, {row_size}]; "
            f"got {data.dtype} {data.shape}."
        )
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise ValueError(
            f"Expected {data.shape[0]} labels in {path}, one per image; got shape {labels.shape}."
        )
    if not np.issubdtype(labels.dtype, np.integer) or (
        labels.size and (labels.min() < 0 or labels.max() >= _NUM_CLASSES)
    ):
        raise ValueError(f"Expected integer labels in [0, {_NUM_CLASSES}) in {path}.")
    images = data.reshape(-1, *IMAGE_SHAPE_CHW).transpose(0, 2, 3, 1)
    return images, labels.astype(np.int32)
