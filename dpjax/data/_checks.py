"""Option checks for the dataset loaders.

Each raises ``ValueError`` naming the option, the bad value and what is
accepted, before any work starts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def seed(name: str, value: Any) -> None:
    if not is_int(value) or value < 0:
        raise ValueError(f"Expected {name}={value!r} to be an integer >= 0.")


def int_at_least(name: str, value: Any, low: int) -> None:
    if not is_int(value) or value < low:
        raise ValueError(f"Expected {name}={value!r} to be an integer >= {low}.")


def open_fraction(name: str, value: Any) -> None:
    if is_int(value) or not isinstance(value, float | np.floating) or not 0 < value < 1:
        raise ValueError(f"Expected {name}={value!r} to be a float in (0, 1).")


def finite_non_negative(name: str, value: Any) -> None:
    if not isinstance(value, int | float | np.number) or isinstance(value, bool):
        raise ValueError(f"Expected {name}={value!r} to be a finite number >= 0.")
    if not (math.isfinite(float(value)) and float(value) >= 0):
        raise ValueError(f"Expected {name}={value!r} to be a finite number >= 0.")


def shape(name: str, value: Any) -> tuple[int, ...]:
    """``value`` as a tuple of positive ints (lists from YAML configs are fine)."""
    if isinstance(value, str | bytes) or not isinstance(value, Sequence) or len(value) == 0:
        raise ValueError(f"Expected {name}={value!r} to be a non-empty sequence of integers >= 1.")
    if not all(is_int(d) and d >= 1 for d in value):
        raise ValueError(f"Expected {name}={value!r} to be a non-empty sequence of integers >= 1.")
    return tuple(int(d) for d in value)


def split_sizes(name: str, num_examples: int, test_fraction: float) -> tuple[int, int]:
    """``(num_train, num_test)`` with ``num_test = round(num_examples * test_fraction)``.

    Both must be at least 1.
    """
    num_test = int(round(num_examples * test_fraction))
    if num_test < 1 or num_test > num_examples - 1:
        raise ValueError(
            f"Expected {name}={test_fraction!r} to leave at least one example in each split "
            f"of {num_examples}; it gives {num_test} test examples."
        )
    return num_examples - num_test, num_test
