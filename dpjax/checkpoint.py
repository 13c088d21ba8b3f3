"""Checkpoints of a training run with orbax-checkpoint, for a bit-exact resume.

A checkpoint is one orbax step directory ``<run dir>/checkpoints/<step>/`` with
two items, neither of them a pickle:

- ``state``: the whole :class:`dpjax.train.TrainState` (params, optimizer
  state, step, and the run's 256-bit secret), written by orbax's ``StandardSave``.
- ``meta``: JSON: the format version, the accountant's ledger
  (:meth:`dpjax.accounting.Ledger.to_dict`), the run's fingerprint (the config
  values that decide the trajectory), a fingerprint of the training data keyed
  with the secret (HMAC-SHA256: it says nothing about the data without the
  secret), the state's leaf paths, shapes and dtypes, and the loop's host-side
  counters.

Nothing else needs saving: the sampler and the noise of step ``t`` are pure
functions of ``(secret, t)`` and the step is in the state; there is no other
randomness (no dropout, no shuffling state). Restoring refuses, with a
:class:`CheckpointError`, a checkpoint that cannot be read, that another config
wrote, or that was written for other training data (resuming it would reuse
the noise of its steps on different data); it never falls back to a fresh
start.

A checkpoint holds the secret, and whoever has the secret can regenerate and
subtract the noise of every step: it is as private as the training data. The
checkpoint directory is created owner-only (0700) and every file in it is
made owner-only (0600) after each save.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import math
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

FORMAT_VERSION = 3  # 3: TrainState has the privatizer state (noise_state)
CHECKPOINT_DIR = "checkpoints"
MAX_TO_KEEP = 2
DATA_FINGERPRINT = "data_fingerprint"



def data_fingerprint(secret: Any, *arrays: np.ndarray) -> str:
    """HMAC-SHA256 of the arrays (shapes, dtypes and bytes) keyed with the run's secret.

    Equal for the same data and secret; without the secret it reveals nothing
    about the data (it is in the checkpoint, which is private anyway).
    """
    from dpjax.randomness import host_secret_words  # noqa: PLC0415

    mac = hmac.new(host_secret_words(secret).astype("<u4").tobytes(), digestmod=hashlib.sha256)
    for a in arrays:
        a = np.ascontiguousarray(a)
        mac.update(json.dumps([list(a.shape), str(a.dtype)]).encode())
        mac.update(a.tobytes())
    return mac.hexdigest()


def _owner_only(path: Path) -> None:
    """Makes ``path`` and everything below it readable by its owner only."""
    os.chmod(path, 0o700)
    for root, dirs, files in os.walk(path):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o700)
        for name in files:
            os.chmod(os.path.join(root, name), 0o600)


class CheckpointError(ValueError):
    """A checkpoint cannot be read or belongs to another config; the run did not start."""


def fingerprint(config: Any, **resolved: Any) -> dict[str, Any]:
    """The config values that can change a parameter bit (every field not marked
    ``trajectory=False`` in :mod:`dpjax.config`, flattened to ``"dp.noise_multiplier"``
    keys), plus ``resolved`` values computed from them (the mechanism's calibrated noise
    multiplier, SecAgg's scale, ...), which a resumed run must share. JSON-normalized,
    so it compares equal after a round trip."""
    from dpjax.config import trajectory_fields  # noqa: PLC0415

    flat = trajectory_fields(config)
    flat.update({f"resolved.{k}": v for k, v in resolved.items()})
    return json.loads(json.dumps(flat, sort_keys=True))


def tree_signature(tree: Any) -> list[list[Any]]:
    """``[path, shape, dtype]`` of every leaf: what a restore target must match."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return [[jax.tree_util.keystr(p), list(np.shape(x)), str(x.dtype)] for p, x in leaves]


def _differences(saved: dict, current: dict) -> list[str]:
    keys = sorted(set(saved) | set(current))
    missing = object()
    return [
        f"{k} (checkpoint {saved.get(k, '<absent>')!r}, this run {current.get(k, '<absent>')!r})"
        for k in keys
        if not _same(saved.get(k, missing), current.get(k, missing))
    ]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


@dataclasses.dataclass(frozen=True)
class Restored:
    """A restored state and the JSON metadata saved with it."""

    step: int
    state: Any
    meta: dict[str, Any]


class Checkpointer:
    """Saves and restores ``(TrainState, metadata)`` under one directory.

    All processes of a multi-process run call :meth:`save` and
    :meth:`restore_latest` together (orbax coordinates them); saves are
    synchronous, so a checkpoint that :meth:`latest_step` lists is complete.
    """

    def __init__(self, directory: str | Path, run_fingerprint: dict[str, Any]):
        self.directory = Path(directory).absolute()
        self.fingerprint = run_fingerprint
        options = ocp.CheckpointManagerOptions(
            max_to_keep=MAX_TO_KEEP, create=True, enable_async_checkpointing=False
        )
        if jax.process_index() == 0:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.directory, 0o700)
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        except Exception as err:
            raise CheckpointError(
                f"Expected {self.directory} to be a readable checkpoint directory: {err}"
            ) from err

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, state: Any, meta: dict[str, Any]) -> int:
        """Writes a checkpoint at ``state.step``; returns that step."""
        step = int(state.step)
        full_meta = {
            **meta,
            "format_version": FORMAT_VERSION,
            "step": step,
            "fingerprint": self.fingerprint,
            "tree": tree_signature(state),
        }
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(full_meta)
            ),
        )
        self._manager.wait_until_finished()
        if jax.process_index() == 0:
            _owner_only(self.directory)
        return step

    def restore_latest(self, template: Any) -> Restored | None:
        """The latest checkpoint, restored onto ``template``'s shapes, dtypes and shardings.

        Returns ``None`` when the directory holds no checkpoint. Raises
        :class:`CheckpointError` when the latest one is unreadable, was written by
        another format, by a config with a different fingerprint, or for a state
        of another structure.
        """
        step = self.latest_step()
        if step is None:
            return None
        where = f"checkpoint step {step} in {self.directory}"
        advice = ("The run was not started fresh: resume with the config that wrote it, or "
                  "point hydra.run.dir at a new directory.")
        meta = self._read(step, where, advice, meta_only=True).meta
        if meta.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"Expected format_version={FORMAT_VERSION} in {where}; "
                f"found {meta.get('format_version')!r}. {advice}"
            )
        diff = _differences(meta.get("fingerprint", {}), self.fingerprint)
        if diff:
            raise CheckpointError(
                f"Expected {where} to come from this run's config; it differs in "
                f"{'; '.join(diff)}. {advice}"
            )
        if meta.get("tree") != tree_signature(template):
            raise CheckpointError(
                f"Expected {where} to hold a state with this model's parameter and optimizer "
                f"tree (paths, shapes, dtypes); it holds another. {advice}"
            )
        return self._read(step, where, advice, template=template)

    def _read(self, step, where, advice, *, template=None, meta_only=False) -> Restored:
        if meta_only:
            args = ocp.args.Composite(meta=ocp.args.JsonRestore())
        else:
            abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
            args = ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            )
        try:
            restored = self._manager.restore(step, args=args)
            meta = restored.meta
            if not isinstance(meta, dict):
                raise ValueError(f"metadata is {type(meta).__name__}, not a JSON object")
        except Exception as err:
            raise CheckpointError(
                f"Expected a readable {where}; reading it failed with "
                f"{type(err).__name__}: {err}. {advice}"
            ) from err
        return Restored(step, None if meta_only else restored.state, meta)

    def close(self) -> None:
        self._manager.close()


def read_meta(directory: str | Path) -> dict[str, Any]:
    """The metadata of the latest checkpoint under ``directory`` (no state is read).
    Raises :class:`CheckpointError` when there is none or it cannot be read."""
    directory = Path(directory).expanduser().absolute()
    if not directory.is_dir():
        raise CheckpointError(f"Expected the checkpoint directory {directory} to exist.")
    manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(create=False, read_only=True))
    try:
        step = manager.latest_step()
        if step is None:
            raise CheckpointError(f"Expected a checkpoint in {directory}; it holds none.")
        try:
            meta = manager.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore())).meta
        except Exception as err:
            raise CheckpointError(f"Expected a readable checkpoint step {step} in {directory}; "
                                  f"reading it failed with {type(err).__name__}: {err}") from err
    finally:
        manager.close()
    if not isinstance(meta, dict):
        raise CheckpointError(f"Expected checkpoint step {step} in {directory} to hold a JSON "
                              "object of metadata.")
    return meta


def read_params(directory: str | Path) -> tuple[Any, dict[str, Any], int]:
    """``(params, meta, step)`` of the latest checkpoint under ``directory``, read-only.

    For starting another run from this one's parameters (``model.init_from``): the
    state is read without a template and only its ``params`` are returned; the
    secret, the optimizer state and the step counter are dropped here, so the new
    run cannot reuse them. Raises :class:`CheckpointError` when there is no readable
    checkpoint.
    """
    directory = Path(directory).expanduser().absolute()
    where = f"the checkpoint directory {directory}"
    if not directory.is_dir():
        raise CheckpointError(f"Expected {where} to exist: the output directory of an earlier "
                              "run (holding checkpoints/) or its checkpoints/ directory.")
    options = ocp.CheckpointManagerOptions(create=False, read_only=True)
    manager = ocp.CheckpointManager(directory, options=options)
    try:
        step = manager.latest_step()
        if step is None:
            raise CheckpointError(f"Expected a checkpoint in {where}; it holds none.")
        args = ocp.args.Composite(state=ocp.args.StandardRestore(),
                                  meta=ocp.args.JsonRestore())
        try:
            restored = manager.restore(step, args=args)
            params, meta = restored.state["params"], restored.meta
        except Exception as err:
            raise CheckpointError(f"Expected a readable checkpoint step {step} in {where}; "
                                  f"reading it failed with {type(err).__name__}: {err}") from err
    finally:
        manager.close()
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"Expected format_version={FORMAT_VERSION} in checkpoint step "
                              f"{step} of {where}.")
    return jax.tree_util.tree_map(np.asarray, params), meta, step
