"""The dataset registry: one name per loader, and option checking.

Loaders take keyword-only options. :func:`load_dataset` refuses an option a
loader does not take before calling it, naming the option and the accepted
ones; each loader checks the values of its own options.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from dpjax.data.cifar import load_cifar10
from dpjax.data.dataset import Dataset
from dpjax.data.embedded import load_digits, load_synthetic
from dpjax.data.idx import load_fashion_mnist, load_mnist
from dpjax.data.mnist1d import load_mnist1d
from dpjax.data.npz import load_npz
from dpjax.data.text import TextDataset, load_private_text, load_pydoc_text, load_text

_LOADERS: dict[str, Callable[..., Dataset | TextDataset]] = {
    "digits": load_digits,
    "mnist1d": load_mnist1d,
    "synthetic": load_synthetic,
    "mnist": load_mnist,
    "fashion_mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "npz": load_npz,
    "pydoc_text": load_pydoc_text,
    "private_text": load_private_text,
    "text": load_text,
}

DATASETS: tuple[str, ...] = tuple(_LOADERS)
"""The names :func:`load_dataset` accepts."""
TEXT_DATASETS: tuple[str, ...] = ("pydoc_text", "private_text", "text")
"""The text corpora (a :class:`~dpjax.data.text.TextDataset` each, for language models)."""
PUBLIC_TEXT_DATASETS: tuple[str, ...] = ("pydoc_text",)
"""Text corpora that are public: training on them needs no privacy (pre-training)."""


def load_dataset(name: str, **options: Any) -> Dataset | TextDataset:
    """Load the dataset registered as ``name`` with the loader's ``options``.

    Embedded datasets (``digits``, ``mnist1d``, ``synthetic``) need no files;
    ``mnist``, ``fashion_mnist`` and ``cifar10`` need ``data_dir`` and ``npz``
    needs ``path``. The text corpora (:data:`TEXT_DATASETS`) return a
    :class:`~dpjax.data.text.TextDataset`: ``pydoc_text`` and ``private_text``
    are generated locally, ``text`` needs ``path``. Nothing is ever downloaded.

    Raises:
      ValueError: ``name`` is not one of :data:`DATASETS`, an option is not one
        the loader takes, a required option is missing, or a value is invalid.
      FileNotFoundError: a file the dataset needs is missing.
    """
    if name not in _LOADERS:
        raise ValueError(f"Expected name={name!r} to be one of {list(DATASETS)}.")
    loader = _LOADERS[name]
    accepted, required = loader_options(name)
    for key, value in options.items():
        if key not in accepted:
            raise ValueError(
                f"Expected an option of dataset {name!r} ({', '.join(accepted)}); "
                f"got {key}={value!r}."
            )
    missing = [key for key in required if key not in options]
    if missing:
        raise ValueError(
            f"Expected option {', '.join(missing)} for dataset {name!r}; "
            f"it takes {', '.join(accepted)}."
        )
    return loader(**options)


def loader_options(name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(accepted, required)`` option names of the loader registered as ``name``."""
    if name not in _LOADERS:
        raise ValueError(f"Expected name={name!r} to be one of {list(DATASETS)}.")
    params = inspect.signature(_LOADERS[name]).parameters.values()
    accepted = tuple(p.name for p in params)
    required = tuple(p.name for p in params if p.default is inspect.Parameter.empty)
    return accepted, required
