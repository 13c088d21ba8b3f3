"""Starting a language model from an earlier run's parameters (``model.init_from``).

    params, meta = the source's latest checkpoint        params only: its secret, optimizer
                                                         state and step count are dropped
    full         = those params over the source's own    a LoRA / last-layer source saved
                   start (rebuilt from its config)       only its trainable leaves
    base         = full with LoRA adapters folded in     W + (alpha / r) A @ B: the same function
    start        = overlay(fresh init, base)             every non-adapter leaf from the source;
                                                         this run's adapters start fresh (B = 0)

The new run's noise and batches come from its own fresh secret. What the source
was trained on, and whether with DP, is read from its checkpoint's fingerprint
(:class:`Source`) and checked against the new run (:func:`check_source`): a DP run
may not start from parameters trained on its own private records -- non-privately,
they would carry those records unprotected past the mechanism; with DP, the epsilon
this run reports would count only its own steps.

The check covers the whole chain (:class:`Origin`: the source, the source's source,
...): a run that starts from another run writes that chain into its checkpoint
(``provenance``), so a public pre-training continued from a private fine-tune does
not launder the fine-tune's records. Records are compared by content as well as by
configuration: every checkpoint holds a short hash of each of its run's training records
(``record_digests``, canaries included; the chain refers to its runs by path and reads
theirs at check time), and a DP run is refused when any of its training records is among
an origin's -- whatever path, copy, split or context length the text came from (byte-
identical records only).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import traverse_util

import dpjax.accounting as accounting
import dpjax.checkpoint as checkpoint
from dpjax.config import ConfigError
from dpjax.data.text import DIGEST_CHARS
from dpjax.models.lora import ADAPTER_NAMES, is_adapter
from dpjax.models.transformer import DecoderLM

PyTree = Any
MAX_DEPTH = 8
"""Longest chain of ``init_from`` sources followed (a source that starts from a source...)."""
PROVENANCE = "provenance"
"""Checkpoint metadata key: the run's chain of sources (:meth:`Origin.to_meta` each)."""
RECORD_DIGESTS = "record_digests"
"""Checkpoint metadata key: :func:`~dpjax.data.text.record_digests` of the run's training
records (canaries included). Only in the run's own checkpoints: a run that starts from it
records the chain by reference and reads these at check time, so a shared descendant
checkpoint never carries another run's record hashes."""
SOURCE_START = "init_from_start"
"""Checkpoint metadata key: the source's path, checkpoint step and :func:`params_digest`."""


@dataclasses.dataclass(frozen=True)
class Origin:
    """One run of a chain of ``init_from`` sources: what it was trained on.

    ``digests``: the record digests of its training records, read from its own checkpoint
    (None when that checkpoint predates them or cannot be read: then only the
    configuration is compared, and the run says so).
    """

    path: str
    dataset: str
    dataset_options: dict[str, Any]
    dp_enabled: bool
    epsilon: float | None
    delta: float | None
    steps: int
    digests: tuple[str, ...] | None = None
    randomness: str = "secure"  # dp.randomness: "seeded" voids epsilon against the seed

    def to_meta(self) -> dict[str, Any]:
        return {"path": self.path, "dataset": self.dataset,
                "dataset_options": self.dataset_options, "dp_enabled": self.dp_enabled,
                "epsilon": self.epsilon, "delta": self.delta, "steps": self.steps,
                "randomness": self.randomness}

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> Origin:
        return cls(path=str(meta["path"]), dataset=str(meta["dataset"]),
                   dataset_options=dict(meta.get("dataset_options") or {}),
                   dp_enabled=bool(meta["dp_enabled"]), epsilon=meta.get("epsilon"),
                   delta=meta.get("delta"), steps=int(meta.get("steps", 0)),
                   digests=_digests_of(str(meta["path"])),
                   randomness=str(meta.get("randomness", "secure")))

    def public(self) -> dict[str, Any]:
        """What ``summary.json`` reports of it (its configuration and accountant)."""
        return {"path": self.path, "dataset": self.dataset, "dp_enabled": self.dp_enabled,
                "epsilon": self.epsilon, "randomness": self.randomness}


def params_digest(params: PyTree) -> str:
    """SHA-256 of every leaf's path, dtype, shape and bytes: which parameters a run started
    from (a resumed run must find the same)."""
    h = hashlib.sha256()
    for key, leaf in sorted(traverse_util.flatten_dict(params).items()):
        arr = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{'/'.join(key)}:{arr.dtype}:{arr.shape};".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def _digests_of(path: str) -> tuple[str, ...] | None:
    """The record digests in the checkpoint at ``path`` (None if absent or unreadable)."""
    try:
        meta = checkpoint.read_meta(checkpoint_dir(path))
    except checkpoint.CheckpointError:
        return None
    return _split_digests(meta.get(RECORD_DIGESTS))


def _split_digests(joined: str | None) -> tuple[str, ...] | None:
    if joined is None:
        return None
    return tuple(joined[i:i + DIGEST_CHARS] for i in range(0, len(joined), DIGEST_CHARS))


@dataclasses.dataclass(frozen=True)
class Source:
    """An earlier run whose parameters start this one, and what it was trained on.

    ``params`` are the source model's full parameters with any LoRA adapters folded
    into their kernels; ``dataset`` / ``dataset_options`` / ``dp_enabled`` /
    ``epsilon`` (at ``delta``, with its own accountant; None without DP) come from
    its checkpoint; ``steps`` is the step the checkpoint was written at.
    ``origins`` is the whole chain: this source first, then its own source, and so on.
    """

    path: str
    params: PyTree
    dataset: str
    dataset_options: dict[str, Any]
    dp_enabled: bool
    epsilon: float | None
    delta: float | None
    steps: int
    origins: tuple[Origin, ...] = ()

    def provenance_meta(self) -> list[dict[str, Any]]:
        """The chain, for the checkpoint metadata of a run that starts from this source."""
        return [o.to_meta() for o in self.origins]


def checkpoint_dir(path: str) -> Path:
    """The checkpoints directory of ``path``: a run's output directory or that directory."""
    root = Path(path).expanduser()
    return root / checkpoint.CHECKPOINT_DIR if (root / checkpoint.CHECKPOINT_DIR).is_dir() \
        else root


def read_source(path: str, *, rebuild: Callable[[dict[str, Any], int, str | None], PyTree],
                depth: int = 0) -> Source:
    """The parameters and the training record of the run that wrote ``path``.

    ``rebuild(fingerprint, depth, expected)`` returns the starting parameters of a run
    with that checkpoint fingerprint (its fresh init, or its own source's, whose
    :func:`params_digest` must be ``expected`` when given): a source that trained only
    some leaves (LoRA, last layer) saved only those, and the rest is what it started from.
    """
    if depth >= MAX_DEPTH:
        raise ConfigError(f"Expected a chain of at most {MAX_DEPTH} model.init_from sources; "
                          f"{path} is deeper (or the chain loops).")
    try:
        saved, meta, step = checkpoint.read_params(checkpoint_dir(path))
    except checkpoint.CheckpointError as err:
        raise ConfigError(f"Expected model.init_from={path!r} to be an earlier run's output "
                          f"directory with a checkpoint: {err}") from err
    fp = meta.get("fingerprint", {})
    if fp.get("model.name") != "transformer":
        raise ConfigError(f"Expected model.init_from={path!r} to hold a model=transformer run; "
                          f"it holds model={fp.get('model.name')!r}.")
    options = dict(fp.get("model.options") or {})
    full = saved
    if options.get("trainable", "full") != "full":
        # the frozen leaves are the source's start, rebuilt from its own source: which must
        # still hold the parameters the source started from
        expected = (meta.get(SOURCE_START) or {}).get("params_sha256")
        full = _overlay_saved(rebuild(fp, depth + 1, expected), saved, path)
    alpha = float(options.get("lora_alpha", DecoderLM.lora_alpha))
    dp_enabled = bool(fp.get("dp.enabled", True))
    epsilon = delta = None
    if dp_enabled:
        delta = float(fp["dp.delta"])
        epsilon = accounting.Ledger.from_dict(meta["ledger"]).epsilon(
            delta, fp.get("dp.accountant", "rdp"))
    dataset, dataset_options = str(fp.get("dataset.name")), dict(fp.get("dataset.options") or {})
    origin = Origin(path=str(Path(path).expanduser().absolute()), dataset=dataset,
                    dataset_options=dataset_options, dp_enabled=dp_enabled, epsilon=epsilon,
                    delta=delta, steps=step, digests=_split_digests(meta.get(RECORD_DIGESTS)),
                    randomness=str(fp.get("dp.randomness", "secure")))
    return Source(path=path, params=fold_adapters(full, alpha), dataset=dataset,
                  dataset_options=dataset_options, dp_enabled=dp_enabled, epsilon=epsilon,
                  delta=delta, steps=step,
                  origins=(origin, *_ancestors(meta, fp, rebuild, depth)))


def _ancestors(meta: Mapping[str, Any], fp: Mapping[str, Any], rebuild, depth: int):
    """The source's own chain: from its checkpoint, or (a checkpoint written before the
    chain was recorded) by reading its ``model.init_from`` again; an unreadable one is an
    error, never an empty chain."""
    if PROVENANCE in meta:
        return tuple(Origin.from_meta(m) for m in meta[PROVENANCE])
    parent = fp.get("model.init_from")
    if parent is None:
        return ()
    return read_source(str(parent), rebuild=rebuild, depth=depth + 1).origins


def _overlay_saved(start: PyTree, saved: PyTree, path: str) -> PyTree:
    """The source's start with the leaves its checkpoint holds put back."""
    flat_start, flat_saved = traverse_util.flatten_dict(start), traverse_util.flatten_dict(saved)
    for key, value in flat_saved.items():
        if key not in flat_start or np.shape(flat_start[key]) != np.shape(value):
            raise ConfigError(f"Expected the checkpoint of model.init_from={path!r} to match the "
                              f"model its config builds; it differs at {'/'.join(key)}.")
    return traverse_util.unflatten_dict({**flat_start, **flat_saved})


def fold_adapters(params: PyTree, lora_alpha: float) -> PyTree:
    """``params`` without adapters: each ``kernel`` becomes ``kernel + (alpha / r) A @ B``.

    The folded model computes the same function as the adapted one
    (:class:`~dpjax.models.lora.LoRADense`), up to float rounding.
    """
    flat = traverse_util.flatten_dict(params)
    out = {k: v for k, v in flat.items() if not is_adapter(k)}
    for key in flat:
        if key[-1] != ADAPTER_NAMES[0]:
            continue
        layer = key[:-1]
        a, b = np.asarray(flat[key], np.float64), np.asarray(flat[layer + (ADAPTER_NAMES[1],)],
                                                              np.float64)
        kernel = np.asarray(flat[layer + ("kernel",)])
        out[layer + ("kernel",)] = (kernel + lora_alpha / a.shape[1] * (a @ b)).astype(
            kernel.dtype)
    return traverse_util.unflatten_dict(out)


def overlay(start: PyTree, base: PyTree, path: str) -> PyTree:
    """``start`` (a fresh init) with every leaf taken from ``base`` but this run's adapters.

    Every non-adapter leaf of ``start`` must be in ``base`` with the same shape, and
    ``base`` may hold nothing else: the two models must have the same architecture
    apart from the adapters.
    """
    flat_start, flat_base = traverse_util.flatten_dict(start), traverse_util.flatten_dict(base)
    missing = [k for k in flat_start if not is_adapter(k) and k not in flat_base]
    extra = [k for k in flat_base if k not in flat_start]
    shapes = [k for k in flat_start if k in flat_base
              and np.shape(flat_start[k]) != np.shape(flat_base[k])]
    for what, keys in (("lacks", missing), ("has parameters this model does not have:", extra),
                       ("has other shapes at", shapes)):
        if keys:
            raise ConfigError(
                f"Expected model.init_from={path!r} to hold this model's architecture "
                f"(model.options other than lora_rank/lora_alpha/trainable, and the context "
                f"length); it {what} {', '.join('/'.join(k) for k in keys[:3])}.")
    merged = {k: (np.asarray(flat_base[k]) if k in flat_base else v)
              for k, v in flat_start.items()}
    return traverse_util.unflatten_dict(merged)


def same_records(name: str, options: Mapping[str, Any], other_name: str,
                 other_options: Mapping[str, Any]) -> bool:
    """Whether two private text datasets may share records: the same synthetic corpus
    seed, or the same file/directory of the user's text. (Copies under another path
    cannot be detected.)"""
    if name != other_name:
        return False
    if name == "private_text":
        return options.get("seed", 0) == other_options.get("seed", 0)
    if name == "text":
        def resolved(o):
            return str(Path(str(o.get("path"))).expanduser().resolve())
        return resolved(options) == resolved(other_options)
    return True


def check_source(source: Source, *, dataset: str, dataset_options: Mapping[str, Any],
                 dp_enabled: bool, public_datasets: tuple[str, ...],
                 digests: Iterable[str] = ()) -> None:
    """Refuses a DP run that starts from parameters trained, anywhere in the chain of
    sources, on its own private records.

    Each :class:`Origin` of ``source.origins`` is compared with this run: by
    configuration (:func:`same_records`) and by content (``digests``, this run's
    :func:`~dpjax.data.text.record_digests`, against the origin's). An origin trained on a
    public corpus
    is not compared (a private line may equal a public one), one on other private records
    is accepted (the summary names the chain); so is any source for
    a non-private run, which claims nothing; and a run on a public corpus has no private
    records to compare.
    """
    if not dp_enabled or dataset in public_datasets:
        return
    own = set(digests)
    for depth, origin in enumerate(source.origins):
        if origin.dataset in public_datasets:
            continue  # a public corpus may share lines with the private one: nothing to protect
        by_config = same_records(origin.dataset, origin.dataset_options, dataset,
                                 dataset_options)
        if origin.digests is None and not by_config:
            logging.getLogger("dpjax").warning(
                "model.init_from: %s (trained on %s) has no readable record digests (its "
                "checkpoint predates them, or is gone): its records were compared with this "
                "run's by configuration only, so a copy of them under another path would not "
                "be found.", origin.path, origin.dataset)
        shared = 0 if origin.digests is None else len(own.intersection(origin.digests))
        if not (by_config or shared):
            continue
        how = ("without DP: the parameters would carry those records past the mechanism, "
               "unprotected" if not origin.dp_enabled else
               f"with DP (epsilon {origin.epsilon:.3g}): this run's epsilon would count only "
               "its own steps, not the source's on the same records")
        chain = " <- ".join(o.path for o in source.origins[:depth + 1])
        which = "" if depth == 0 else f" (through the chain of sources: {chain})"
        what = (f"{shared} of this run's records" if shared
                else f"this run's private dataset ({dataset} with the same records)")
        raise ConfigError(
            f"Expected model.init_from={source.path!r} not to be trained on this run's "
            f"private records; {origin.path!r}{which} was trained on {what} {how}. Start "
            "from a run on public data (e.g. experiment=lm_pretrain on pydoc_text).")
