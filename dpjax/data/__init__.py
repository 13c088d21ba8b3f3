"""Datasets for dpjax: in-memory numpy train/test splits, never downloaded.

``load_dataset(name, **options)`` returns a :class:`Dataset`; :data:`DATASETS`
lists the names. Embedded: ``digits`` (scikit-learn's bundled 8x8 digits),
``mnist1d`` (generated with the ``mnist1d`` package, cached on disk),
``synthetic`` (a Gaussian mixture). From the user's files: ``mnist`` and
``fashion_mnist`` (IDX), ``cifar10`` (python batches), ``npz``. Text corpora
for language models (:data:`TEXT_DATASETS`, :mod:`dpjax.data.text`):
``pydoc_text`` (public), ``private_text`` (synthetic private records), ``text``
(the user's files, one record per line).
Normalization statistics come from the training split only.
"""

from dpjax.data.cifar import load_cifar10
from dpjax.data.dataset import Dataset
from dpjax.data.embedded import load_digits, load_synthetic
from dpjax.data.idx import load_fashion_mnist, load_mnist, read_idx
from dpjax.data.mnist1d import load_mnist1d
from dpjax.data.normalize import (
    NORMALIZATIONS,
    channel_stats,
    check_scheme,
    normalize_splits,
    standardize,
)
from dpjax.data.npz import load_npz
from dpjax.data.registry import (
    DATASETS,
    PUBLIC_TEXT_DATASETS,
    TEXT_DATASETS,
    load_dataset,
    loader_options,
)

__all__ = [
    "DATASETS",
    "NORMALIZATIONS",
    "PUBLIC_TEXT_DATASETS",
    "TEXT_DATASETS",
    "Dataset",
    "channel_stats",
    "check_scheme",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_mnist",
    "load_mnist1d",
    "load_npz",
    "load_synthetic",
    "loader_options",
    "normalize_splits",
    "read_idx",
    "standardize",
]
