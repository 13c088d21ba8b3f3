"""The in-memory dataset every loader returns.

A :class:`Dataset` holds a train and a test split as numpy arrays: features
``float32`` with examples on the leading axis (images NHWC, sequences
``(length, channels)``), labels ``int32`` in ``[0, num_classes)``. It checks
these invariants when it is built, so code that receives one can rely on them.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A classification dataset with a train and a test split.

    Attributes:
      x_train: ``float32`` features, shape ``[num_train, *input_shape]``.
      y_train: ``int32`` labels in ``[0, num_classes)``, shape ``[num_train]``.
      x_test: ``float32`` features, shape ``[num_test, *input_shape]``.
      y_test: ``int32`` labels in ``[0, num_classes)``, shape ``[num_test]``.
      num_classes: number of classes.
      name: the registry name the dataset was loaded under.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str

    def __post_init__(self) -> None:
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int | np.integer):
            raise ValueError(f"Expected num_classes={self.num_classes!r} to be an integer >= 2.")
        if self.num_classes < 2:
            raise ValueError(f"Expected num_classes={self.num_classes} to be an integer >= 2.")
        for split in ("train", "test"):
            _check_split(
                split, getattr(self, f"x_{split}"), getattr(self, f"y_{split}"), self.num_classes
            )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(
                f"Expected x_test example shape {self.x_test.shape[1:]} to equal "
                f"x_train example shape {self.x_train.shape[1:]}."
            )

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one example, e.g. ``(28, 28, 1)`` or ``(40, 1)``."""
        return tuple(int(d) for d in self.x_train.shape[1:])

    @property
    def num_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.x_test.shape[0])


def _check_split(split: str, x: np.ndarray, y: np.ndarray, num_classes: int) -> None:
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim < 2:
        raise ValueError(
            f"Expected x_{split} to be a float32 numpy array with at least 2 dims; "
            f"got {type(x).__name__} {getattr(x, 'dtype', None)} {getattr(x, 'shape', None)}."
        )
    if not isinstance(y, np.ndarray) or y.dtype != np.int32 or y.ndim != 1:
        raise ValueError(
            f"Expected y_{split} to be a 1-D int32 numpy array; "
            f"got {type(y).__name__} {getattr(y, 'dtype', None)} {getattr(y, 'shape', None)}."
        )
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"Expected x_{split} and y_{split} to have the same number of examples; "
            f"got {x.shape[0]} and {y.shape[0]}."
        )
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(
            f"Expected y_{split} labels in [0, {num_classes}); "
            f"got min={int(y.min())}, max={int(y.max())}."
        )
