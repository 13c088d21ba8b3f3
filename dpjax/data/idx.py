"""MNIST and Fashion-MNIST from the user's IDX files (nothing is downloaded).

The IDX format: a big-endian header ``0x00 0x00 <type> <ndim>``, then ``ndim``
big-endian ``uint32`` sizes, then the values. Both datasets use unsigned bytes
(type ``0x08``): images have ``ndim=3`` (magic ``0x00000803``), labels
``ndim=1`` (magic ``0x00000801``). Each file may be raw or gzipped (``.gz``).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from dpjax.data.dataset import Dataset
from dpjax.data.normalize import PublicStats, check_scheme, normalize_splits

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_PIXEL_MAX_VALUE = 255.0
_NUM_CLASSES = 10
# Per-pixel constants in raw units (0..255), as published with the datasets' standard
# training pipelines (torchvision's MNIST example: 0.1307 / 0.3081 of 255; the
# Fashion-MNIST benchmark's 0.2860 / 0.3530). They are fixed numbers, so one example
# of *your* files can never move another's features.
PUBLIC_STATS = {
    "mnist": PublicStats((0.1307 * 255,), (0.3081 * 255,),
                         "MNIST training-set statistics published with torchvision's example"),
    "fashion_mnist": PublicStats((0.2860 * 255,), (0.3530 * 255,),
                                 "Fashion-MNIST training-set statistics as commonly published"),
}


def load_mnist(*, data_dir: str | os.PathLike[str], normalize: str = "standardize") -> Dataset:
    """MNIST from the four IDX files in ``data_dir``; see :func:`load_idx_dataset`."""
    return load_idx_dataset("mnist", data_dir, normalize)


def load_fashion_mnist(
    *, data_dir: str | os.PathLike[str], normalize: str = "standardize"
) -> Dataset:
    """Fashion-MNIST from the four IDX files in ``data_dir``; see :func:`load_idx_dataset`."""
    return load_idx_dataset("fashion_mnist", data_dir, normalize)


def load_idx_dataset(name: str, data_dir: str | os.PathLike[str], normalize: str) -> Dataset:
    """A 10-class image dataset from the files named in :data:`IDX_FILES`.

    Args:
      name: the dataset's registry name.
      data_dir: directory holding ``train-images-idx3-ubyte``,
        ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
        ``t10k-labels-idx1-ubyte``, each raw or with ``.gz``.
      normalize: ``"standardize"`` (the dataset's published constants,
        :data:`PUBLIC_STATS`, never statistics of the files read), ``"scale"``
        (pixels divided by 255) or ``"none"``.

    Returns:
      A :class:`Dataset` with input shape ``(rows, cols, 1)`` (28x28 for MNIST).

    Raises:
      FileNotFoundError: a file is missing (the message names where to put it).
      ValueError: a file is not a valid IDX file of the expected kind, or the
        image and label counts differ.
    """
    stats = PUBLIC_STATS[name]
    check_scheme(normalize, max_value=_PIXEL_MAX_VALUE, stats=stats)
    directory = Path(data_dir).expanduser()
    paths = {key: find_idx_file(directory, base, name) for key, base in IDX_FILES.items()}
    splits = {}
    for split in ("train", "test"):
        images = read_idx(paths[f"{split}_images"], IMAGES_MAGIC)
        labels = read_idx(paths[f"{split}_labels"], LABELS_MAGIC)
        if images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"Expected as many labels as images in the {split} split; "
                f"{paths[f'{split}_images']} has {images.shape[0]} images and "
                f"{paths[f'{split}_labels']} has {labels.shape[0]} labels."
            )
        if labels.size and labels.max() >= _NUM_CLASSES:
            raise ValueError(
                f"Expected labels in [0, {_NUM_CLASSES}) in {paths[f'{split}_labels']}; "
                f"found {int(labels.max())}."
            )
        splits[split] = (images[..., None], labels.astype(np.int32))
    x_train, x_test = normalize_splits(
        splits["train"][0], splits["test"][0], normalize, max_value=_PIXEL_MAX_VALUE,
        stats=stats,
    )
    return Dataset(
        x_train, splits["train"][1], x_test, splits["test"][1], num_classes=_NUM_CLASSES, name=name
    )


def find_idx_file(directory: Path, base: str, name: str) -> Path:
    """``directory/base`` or ``directory/base.gz``, whichever exists (raw first)."""
    for candidate in (directory / base, directory / f"{base}.gz"):
        if candidate.is_file():
            return candidate
    expected = ", ".join(IDX_FILES.values())
    raise FileNotFoundError(
        f"Expected the {name} file {directory / base} (or {directory / base}.gz). "
        f"Put the four IDX files ({expected}; raw or .gz) in data_dir={str(directory)!r}; "
        "dpjax does not download them."
    )


def read_idx(path: Path, magic: int) -> np.ndarray:
    """The unsigned-byte array stored in the IDX file ``path``.

    Checks the magic number against ``magic`` (``0x00000803`` images,
    ``0x00000801`` labels) and that the file holds exactly the values its
    header announces.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as error:
        raise ValueError(f"Expected {path} to be a readable IDX file: {error}") from error
    ndim = magic & 0xFF
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise ValueError(
            f"Expected {path} to start with a {header_size}-byte IDX header; "
            f"the file has {len(raw)} bytes."
        )
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(f"Expected IDX magic number 0x{magic:08x} in {path}; found 0x{found:08x}.")
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    expected_bytes = header_size + int(np.prod(dims))
    if len(raw) != expected_bytes:
        raise ValueError(
            f"Expected {path} to hold {expected_bytes} bytes for dims {tuple(dims.tolist())}; "
            f"it has {len(raw)}."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(dims)
