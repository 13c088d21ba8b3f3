"""Any dataset the user saved as one ``.npz`` file (``numpy.savez``)."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

import dpjax.data._checks as _checks
from dpjax.data.dataset import Dataset
from dpjax.data.normalize import check_scheme, normalize_splits, user_stats

ARRAYS = ("x_train", "y_train", "x_test", "y_test")
CLASS_NAMES = "class_names"  # optional array: the public list of labels


def load_npz(
    *,
    path: str | os.PathLike[str],
    num_classes: int | None = None,
    normalize: str = "none",
    mean: float | list[float] | None = None,
    std: float | list[float] | None = None,
    max_value: float | None = None,
) -> Dataset:
    """A dataset from the arrays ``x_train, y_train, x_test, y_test`` in ``path``.

    Features may have any numeric dtype and shape ``[N, *input_shape]`` with at
    least one axis after the examples (use ``[N, d, 1]`` or ``[N, d]`` for
    vectors); labels are integers in ``[0, num_classes)``. The file is read
    with ``allow_pickle=False``.

    Nothing about the model or other examples is inferred from the training
    data (privacy rule 2b): the number of classes comes from ``num_classes`` or
    from a public label list stored in the file as ``class_names`` (never from
    ``max(y_train) + 1``, which one example labelled 7 would change), and
    normalization uses constants you give, never the data's own statistics.

    Args:
      path: the ``.npz`` file.
      num_classes: number of classes; required unless the file holds
        ``class_names``.
      normalize: ``"none"`` (default), ``"standardize"`` with ``mean`` and
        ``std`` (per channel, last axis; public constants, not statistics of
        this file) or ``"scale"`` (divide by ``max_value``, the format's fixed
        maximum, e.g. 255).

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: the file is not an ``.npz`` archive, lacks an array, or the
        arrays have the wrong dtypes or inconsistent shapes; the number of
        classes is neither given nor in the file; ``standardize`` without
        ``mean`` and ``std``.
    """
    stats = user_stats(mean, std)
    if max_value is not None:
        _checks.finite_non_negative("max_value", max_value)
        if max_value == 0:
            raise ValueError(f"Expected max_value={max_value!r} to be > 0.")
    check_scheme(normalize, max_value=max_value, stats=stats)
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
    num_classes = _num_classes(num_classes, arrays.get(CLASS_NAMES), file)
    x_train, x_test = normalize_splits(arrays["x_train"], arrays["x_test"], normalize,
                                       max_value=max_value, stats=stats)
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
            names = ARRAYS + ((CLASS_NAMES,) if CLASS_NAMES in archive.files else ())
            return {name: archive[name] for name in names}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as error:
        raise ValueError(
            f"Expected {file} to be an .npz file with arrays {', '.join(ARRAYS)}: {error}"
        ) from error


def _num_classes(num_classes: int | None, class_names: np.ndarray | None, file: Path) -> int:
    if class_names is not None:
        if class_names.ndim != 1:
            raise ValueError(f"Expected {CLASS_NAMES} in {file} to be a 1-D array of labels.")
        if num_classes is not None and num_classes != len(class_names):
            raise ValueError(
                f"Expected num_classes={num_classes} to equal the {len(class_names)} "
                f"{CLASS_NAMES} in {file}."
            )
        num_classes = len(class_names)
    if num_classes is None:
        raise ValueError(
            f"Expected num_classes (dataset.options.num_classes=...) for {file}, or a public "
            f"label list stored in it as '{CLASS_NAMES}': it is never inferred from the "
            "training labels, which would let one example change the model's shape."
        )
    _checks.int_at_least("num_classes", num_classes, 2)
    return int(num_classes)


def _labels(y: np.ndarray, num_classes: int, name: str, file: Path) -> np.ndarray:
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(
            f"Expected {name} in {file} to be in [0, {num_classes}); "
            f"found min={int(y.min())}, max={int(y.max())}. Pass num_classes if it is larger."
        )
    return y.astype(np.int32)
