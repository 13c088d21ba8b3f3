"""Argument checks shared by the public functions.

Each check raises ``ValueError`` naming the argument, the value and what is
accepted, before any computation starts. Values that are JAX tracers (inside
``jit``) are not checked here: they are checked where they are concrete.
"""

from __future__ import annotations

import math
from typing import Any

import jax


def _concrete(value: Any) -> bool:
    return not isinstance(value, jax.core.Tracer)


def non_negative(name: str, value: Any) -> None:
    if _concrete(value) and not (math.isfinite(float(value)) and float(value) >= 0):
        raise ValueError(f"Expected {name}={value} to be finite and >= 0.")


def positive(name: str, value: Any) -> None:
    if _concrete(value) and not (math.isfinite(float(value)) and float(value) > 0):
        raise ValueError(f"Expected {name}={value} to be finite and > 0.")


def positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | jax.numpy.integer) or value < 1:
        raise ValueError(f"Expected {name}={value!r} to be an integer >= 1.")


def sample_rate(name: str, value: Any) -> None:
    if not (math.isfinite(float(value)) and 0 < float(value) <= 1):
        raise ValueError(f"Expected {name}={value} in (0, 1].")


def delta(name: str, value: Any) -> None:
    if not (math.isfinite(float(value)) and 0 < float(value) < 1):
        raise ValueError(f"Expected {name}={value} in (0, 1).")


def one_of(name: str, value: Any, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ValueError(f"Expected {name}={value!r} to be one of {list(accepted)}.")
