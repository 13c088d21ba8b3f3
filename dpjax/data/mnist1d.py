"""MNIST-1D, generated locally with the ``mnist1d`` package and cached on disk.

The ``mnist1d`` package can also download a pickle; that path is never used
here. Generation runs the package's own generator (its templates and
``transform``, seeded as its ``make_dataset`` seeds them) with the package's
default transformation arguments, changing only the number of samples and the
seed, and stops *before* the package's final step, which standardizes with the
mean and standard deviation of all samples: that would make every example's
features depend on every other example (training and test), outside the
mechanism. The raw output is standardized here with public constants instead
(:data:`PUBLIC_STATS`: statistics of an independently generated public sample).

The raw output (all samples, before any split) is cached as an ``.npz`` file
whose name holds the format version and every generation argument, written
atomically (temporary file, then ``os.replace``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import secrets
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

import dpjax.data._checks as _checks
from dpjax.data.dataset import Dataset
from dpjax.data.normalize import PublicStats, check_scheme, normalize_splits

CACHE_FORMAT_VERSION = 2  # 2: the raw generator output (1 held the package-standardized one)
SEQUENCE_LENGTH = 40
NUM_CLASSES = 10
CACHE_DIR_ENV = "DPJAX_CACHE_DIR"
PUBLIC_SAMPLE = {"num_samples": 10_000, "seed": 2020}
# Mean and standard deviation of the raw generator output over PUBLIC_SAMPLE: 10,000
# samples generated with seed 2020, independently of any dataset drawn with another seed
# (the default data seed is 42). tests/data/test_mnist1d.py regenerates them.
PUBLIC_STATS = PublicStats(
    (-0.006043231843919859,), (0.15470851248717066,),
    "raw MNIST-1D statistics of an independent public sample (10,000 samples, seed 2020)",
)


def load_mnist1d(
    *,
    num_samples: int = 70_000,
    test_fraction: float = 1 / 7,
    seed: int = 42,
    cache_dir: str | os.PathLike[str] | None = None,
    normalize: str = "standardize",
) -> Dataset:
    """MNIST-1D: 1-D digit templates, randomly padded, scaled, sheared and noised.

    The first ``num_samples - round(num_samples * test_fraction)`` generated
    samples form the training split and the rest the test split (the
    generator shuffles them), as the package's own ``train_split`` does; the
    defaults give 60,000 / 10,000.

    Args:
      num_samples: total number of samples; a multiple of 10 (the generator
        draws ``num_samples // 10`` per class).
      test_fraction: share of the samples in the test split.
      seed: the generator's seed (the package's default is 42).
      cache_dir: directory of the cache; default ``$DPJAX_CACHE_DIR/mnist1d``
        if that variable is set, else ``~/.cache/dpjax/mnist1d``.
      normalize: ``"standardize"`` (the public constants :data:`PUBLIC_STATS`)
        or ``"none"`` (the raw generator output).

    Returns:
      A :class:`Dataset` named ``"mnist1d"``, input shape ``(40, 1)``, 10 classes.
    """
    _checks.int_at_least("num_samples", num_samples, NUM_CLASSES)
    if num_samples % NUM_CLASSES:
        raise ValueError(
            f"Expected num_samples={num_samples} to be a multiple of {NUM_CLASSES} "
            "(MNIST-1D draws num_samples // 10 samples per class)."
        )
    _checks.open_fraction("test_fraction", test_fraction)
    _checks.seed("seed", seed)
    check_scheme(normalize, stats=PUBLIC_STATS)
    num_train, _ = _checks.split_sizes("test_fraction", num_samples, test_fraction)
    x, y = cached_samples(num_samples, seed, resolve_cache_dir(cache_dir))
    x_train, x_test = normalize_splits(x[:num_train, :, None], x[num_train:, :, None], normalize,
                                       stats=PUBLIC_STATS)
    return Dataset(
        x_train, y[:num_train], x_test, y[num_train:], num_classes=NUM_CLASSES, name="mnist1d"
    )


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    """The cache directory: ``cache_dir``, else the environment's, else the home default."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    root = os.environ.get(CACHE_DIR_ENV)
    root_path = Path(root).expanduser() if root else Path("~/.cache/dpjax").expanduser()
    return root_path / "mnist1d"


def cache_path(cache_dir: Path, num_samples: int, seed: int) -> Path:
    """The cache file for these generation arguments, in ``cache_dir``."""
    args = generator_args(num_samples, seed)
    digest = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:12]
    name = f"mnist1d-v{CACHE_FORMAT_VERSION}-n{num_samples}-seed{seed}-{digest}.npz"
    return cache_dir / name


def cached_samples(num_samples: int, seed: int, cache_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """All generated samples ``(x [n, 40] float32, y [n] int32)``, from the cache if present.

    A cache file that cannot be read or has the wrong shape is regenerated.
    """
    path = cache_path(cache_dir, num_samples, seed)
    cached = _read_cache(path, num_samples)
    if cached is not None:
        return cached
    x, y = generate(num_samples, seed)
    _write_atomically(path, x, y)
    return x, y


def generator_args(num_samples: int, seed: int) -> dict[str, Any]:
    """The ``mnist1d`` generation arguments: the package defaults but size and seed."""
    from mnist1d.data import get_dataset_args

    args = get_dataset_args(as_dict=True)
    args.pop("url", None)
    args.update(num_samples=num_samples, seed=seed, train_split=1.0)
    return args


def generate(num_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``mnist1d`` generator's raw samples and labels (no download), shuffled.

    The same draws as the package's ``make_dataset`` (same seeding, templates,
    ``transform`` calls and shuffles) without its final standardization over all
    samples. The generator seeds and draws from the global ``random`` and
    ``numpy.random`` states; they are restored afterwards so that loading a
    dataset does not change the caller's random streams.
    """
    from mnist1d.data import get_templates
    from mnist1d.transform import transform
    from mnist1d.utils import ObjectView, set_seed

    args = ObjectView(generator_args(num_samples, seed))
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        set_seed(args.seed)
        templates = get_templates()
        xs, ys = [], []
        for label_ix in range(len(templates["y"])):
            for _ in range(args.num_samples // len(templates["y"])):
                x, _ = transform(templates["x"][label_ix], templates["t"], args)
                xs.append(x)
                ys.append(templates["y"][label_ix])
        shuffle = np.random.permutation(len(ys))
        x, y = np.stack(xs)[shuffle], np.stack(ys)[shuffle]
        if args.shuffle_seq:
            x = x[..., np.random.permutation(args.final_seq_length)]
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    return np.asarray(x, np.float32), np.asarray(y, np.int32)


def _read_cache(path: Path, num_samples: int) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as archive:
            x, y = archive["x"], archive["y"]
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    expected = (num_samples, SEQUENCE_LENGTH)
    if x.shape != expected or x.dtype != np.float32 or y.shape != (num_samples,):
        return None
    return x, y.astype(np.int32)


def _write_atomically(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkstemp: its files are private (0600); a cache file gets the
    # permissions the umask gives, like any other file the user writes.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, x=x, y=y)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
