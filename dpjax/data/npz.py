"""Any dataset the user saved as one ``.npz`` file (``numpy.savez``)."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from dpjax.data import _checks
from dpjax.data.dataset import Dataset
from dpjax.data.normalize import check_scheme, normalize_splits

ARRAYS = ("x_train", "y_train", "x_test", "y_test")


def load_npz(
    *,
    path: str | os.PathLike[str],
    num_classes: int | None = None,
    normalize: str = "standardize",
) -> Dataset:
    """A dataset from the arrays ``x_train, y_train, x_test, y_test`` in ``path``.

    Features may have any numeric dtype and shape ``[N, *input_shape]`` with at
    least one axis after the examples (use ``[N, d, 1]`` or ``[N, d]`` for
    vectors); labels are integers in ``[0, num_classes)``. The file is read
    with ``allow_pickle=False``.

    Args:
      path: the ``.npz`` file.
      num_classes: number of classes; default ``max(y_train) + 1``.
      normalize: ``"standardize"`` (train statistics) or ``"none"``.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: the file is not an ``.npz`` archive, lacks an array, or the
        arrays have the wrong dtypes or inconsistent shapes.
    """
    check_scheme(normalize)
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"Expected an .npz file at path={str(file)!r} with arrays {', '.join(ARRAYS)} "
            "(write it with numpy.savez)."
        )
    arrays = _read_arrays(file)
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if not (np.issubdtype(x.dtype, np.number) and not np.iscomplexobj(x)) or x.ndim < 2:
            raise ValueError(
                f"Expected x_{split} in {file} to be real numbers of shape [N, *input_shape]; "
                f"got {x.dtype} {x.shape}."
            )
        if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1:
            raise ValueError(
                f"Expected y_{split} in {file} to be 1-D integers; got {y.dtype} {y.shape}."
            )
        if x.shape[0] != y.shape[0]:
            raise ValueError(
                f"Expected x_{split} and y_{split} in {file} to have the same number of "
                f"examples; got {x.shape[0]} and {y.shape[0]}."
            )
    if num_classes is None:
        num_classes = int(arrays["y_train"].max(initial=0)) + 1
    _checks.int_at_least("num_classes", num_classes, 2)
    x_train, x_test = normalize_splits(arrays["x_train"], arrays["x_test"], normalize)
    return Dataset(
        x_train,
        _labels(arrays["y_train"], num_classes, "y_train", file),
        x_test,
        _labels(arrays["y_test"], num_classes, "y_test", file),
        num_classes=int(num_classes),
        name="npz",
    )


def _read_arrays(file: Path) -> dict[str, np.ndarray]:
    try:
        archive = np.load(file, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError("it holds a single array, not an .npz archive")
        with archive:
            missing = [name for name in ARRAYS if name not in archive.files]
            if missing:
                raise ValueError(
                    f"it lacks {', '.join(missing)} (found {', '.join(archive.files) or 'none'})"
                )
            return {name: archive[name] for name in ARRAYS}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as error:
        raise ValueError(
            f"Expected {file} to be an .npz file with arrays {', '.join(ARRAYS)}: {error}"
        ) from error


def _labels(y: np.ndarray, num_classes: int, name: str, file: Path) -> np.ndarray:
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(
            f"Expected {name} in {file} to be in [0, {num_classes}); "
            f"found min={int(y.min())}, max={int(y.max())}. Pass num_classes if it is larger."
        )
    return y.astype(np.int32)
