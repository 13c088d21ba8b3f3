"""The language-model task: a text corpus, a decoder LM and the one partition of what trains.

    data      = load_dataset(pydoc_text | private_text | text)   one record per row
    model     = DecoderLM(model.options); context and vocabulary from the corpus
    start     = init(train.seed), overlaid with model.init_from's parameters (dpjax.init_from)
    trainable, frozen = split_params(start, trainable_mask(start, trainable))
    task.params   = trainable      what the step differentiates, clips, noises and updates
    task.loss_fn  = the per-record next-token loss of merge(trainable, frozen)
    task.evaluate = bits per byte and next-token accuracy of the merged model

One declared mask (``model.options.trainable``: ``full``, ``lora``, ``last_layer``;
:func:`dpjax.models.transformer.trainable_mask`) decides both what is clipped and
what gets noise: the task's parameters ARE the trainable leaves, the frozen ones
are closed over by the loss, so the mechanism's parameter count (the noise's
dimension) is the trainable size. A batch is ``(tokens, lengths)``: ``x_train``
holds the token rows, ``y_train`` their lengths, gathered by the same row indices
as a classifier's ``(x, y)``.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import dpjax.init_from as init_from
from dpjax.checkpoint import CheckpointError
from dpjax.config import ConfigError, RunConfig
from dpjax.data.canaries import CanarySet, make_canaries
from dpjax.data.registry import PUBLIC_TEXT_DATASETS, TEXT_DATASETS, load_dataset
from dpjax.data.text import VOCAB_SIZE, TextDataset, load_pydoc_text
from dpjax.models import LANGUAGE_MODELS, check_no_batch_mixing, get_model
from dpjax.models.lm_eval import make_lm_evaluator
from dpjax.models.lora import merge_params, num_params, split_params, trainable_loss
from dpjax.models.transformer import REDUCTIONS, TRAINABLE, DecoderLM, lm_loss, trainable_mask

PyTree = Any
TASK_OPTIONS = {"trainable": "full", "loss_reduction": "mean"}
"""``model.options`` of a language model that are not :class:`DecoderLM` fields."""
CANARIES_OPTION = "canaries"
"""``dataset.options.canaries``: keyword arguments of :func:`make_canaries`."""
_DEFAULT_CONTEXT = inspect.signature(load_pydoc_text).parameters["context_length"].default


def is_language_task(cfg: RunConfig) -> bool:
    """Whether ``cfg`` asks for a language model, a text corpus or ``model.init_from``."""
    return (cfg.model.name in LANGUAGE_MODELS or cfg.dataset.name in TEXT_DATASETS
            or cfg.model.init_from is not None)


@dataclasses.dataclass(frozen=True)
class LMSettings:
    """A language model and its training choices, from ``model.options``."""

    model: DecoderLM
    trainable: str
    loss_reduction: str


def context_length(dataset_options: dict[str, Any]) -> int:
    """The corpus's context length (``dataset.options.context_length``, default 128)."""
    return dataset_options.get("context_length", _DEFAULT_CONTEXT)


def lm_settings(model_options: dict[str, Any], dataset_options: dict[str, Any]) -> LMSettings:
    """The :class:`DecoderLM` of ``model.options`` (its fields, minus ``trainable`` and
    ``loss_reduction``), with the corpus's context length and the byte vocabulary.

    The row width is the corpus's, so ``model.options.context_length`` may only
    repeat ``dataset.options.context_length``.
    """
    fields = {k: v for k, v in model_options.items() if k not in TASK_OPTIONS}
    task = {k: model_options.get(k, v) for k, v in TASK_OPTIONS.items()}
    if task["trainable"] not in TRAINABLE:
        raise ConfigError(f"Expected model.options.trainable={task['trainable']!r} to be one "
                          f"of {list(TRAINABLE)}.")
    if task["loss_reduction"] not in REDUCTIONS:
        raise ConfigError(f"Expected model.options.loss_reduction={task['loss_reduction']!r} "
                          f"to be one of {list(REDUCTIONS)}.")
    context = context_length(dataset_options)
    if fields.pop("context_length", context) != context:
        raise ConfigError(f"Expected model.options.context_length="
                          f"{model_options['context_length']!r} to equal "
                          f"dataset.options.context_length={context} (the row width) or to "
                          "be unset.")
    if fields.pop("vocab_size", VOCAB_SIZE) != VOCAB_SIZE:
        raise ConfigError(f"Expected model.options.vocab_size={model_options['vocab_size']!r} "
                          f"to be {VOCAB_SIZE} (bytes, BOS, EOS, PAD) or unset.")
    if task["trainable"] == "lora" and not fields.get("lora_rank", 0):
        raise ConfigError(f"Expected model.options.lora_rank={fields.get('lora_rank', 0)!r} to "
                          "be > 0 with model.options.trainable='lora' (the adapters' rank).")
    try:
        model = get_model("transformer", VOCAB_SIZE, context_length=context, **fields)
    except ValueError as err:
        raise ConfigError(f"Expected valid model.options for model=transformer: {err}") from err
    return LMSettings(model, task["trainable"], task["loss_reduction"])


def load_source(path: str, depth: int = 0) -> init_from.Source:
    """The run that wrote ``path`` (``model.init_from``): its parameters and training record."""
    return init_from.read_source(path, rebuild=_rebuild, depth=depth)


def start_params(settings: LMSettings, seed: int,
                 source: init_from.Source | None = None) -> PyTree:
    """The model's parameters before training: ``init(PRNGKey(seed))``, with every
    non-adapter leaf replaced by ``source``'s (if given)."""
    model = settings.model
    dummy = jnp.zeros((1, model.context_length), jnp.int32)
    params = jax.jit(model.init)(jax.random.PRNGKey(seed), dummy)["params"]
    if source is None:
        return params
    return init_from.overlay(params, source.params, source.path)


def _rebuild(fingerprint: dict[str, Any], depth: int, expected: str | None = None) -> PyTree:
    """The starting parameters of the run whose checkpoint has ``fingerprint``; its own
    source must hold the parameters it started from (``expected``, their digest)."""
    settings = lm_settings(dict(fingerprint.get("model.options") or {}),
                           dict(fingerprint.get("dataset.options") or {}))
    path = fingerprint.get("model.init_from")
    source = None if path is None else load_source(path, depth)
    if source is not None and expected is not None \
            and init_from.params_digest(source.params) != expected:
        raise ConfigError(
            f"Expected model.init_from={path!r} (the source of a source of this run) to hold the "
            "parameters its descendant started from; it holds others (it trained on, or was "
            "replaced), so that descendant's frozen base cannot be rebuilt.")
    return start_params(settings, int(fingerprint.get("train.seed", 0)), source)


SOURCE_START = init_from.SOURCE_START  # checkpoint metadata: LMSetup.source_start()


@dataclasses.dataclass(frozen=True)
class LMSetup:
    """What a language-model task holds besides the :class:`~dpjax.task.Task` fields: the
    model, the frozen leaves, the corpus's public description and the source run."""

    settings: LMSettings
    frozen: PyTree
    num_trainable_params: int
    corpus: TextDataset
    source: init_from.Source | None
    canaries: CanarySet | None
    digests: tuple[str, ...] = ()  # the training records' digests (checkpoints only)

    @property
    def model(self) -> DecoderLM:
        return self.settings.model

    def checkpoint_meta(self) -> dict[str, Any]:
        """What this run's checkpoints record for runs that start from them: the chain of
        sources and its training records' digests (private, like the checkpoint)."""
        return {init_from.PROVENANCE: [] if self.source is None
                else self.source.provenance_meta(),
                init_from.RECORD_DIGESTS: "".join(self.digests),
                SOURCE_START: self.source_start()}

    def source_start(self) -> dict[str, Any] | None:
        """The source's checkpoint step and a digest of its parameters (None without one)."""
        if self.source is None:
            return None
        return {"path": self.source.path, "step": self.source.steps,
                "params_sha256": init_from.params_digest(self.source.params)}

    def check_resumed(self, meta: dict[str, Any]) -> None:
        """A resumed run must start from the same source parameters as before: the source
        is read again at every build, and a source that has written another checkpoint
        since would put the trained leaves on another frozen base."""
        before, now = meta.get(SOURCE_START), self.source_start()
        if before is None or now is None or before == now:
            return
        raise CheckpointError(
            f"Expected model.init_from={now['path']!r} to hold the parameters this run started "
            f"from (checkpoint step {before['step']}); it now holds step {now['step']} with "
            "other parameters (it trained on or was replaced, or its own frozen base was "
            "rebuilt differently, e.g. by another jax version), so resuming would train on "
            "another base. Restore the source, or point hydra.run.dir at a new directory to "
            "start afresh from it.")

    def full_params(self, params: PyTree) -> PyTree:
        """The whole model's parameters from the task's (trainable) ``params``."""
        return merge_params(params, self.frozen)


def _dataset_options(cfg: RunConfig) -> tuple[dict[str, Any], CanarySet | None]:
    options = dict(cfg.dataset.options)
    canaries = None
    if CANARIES_OPTION in options:
        spec = dict(options.pop(CANARIES_OPTION) or {})
        try:
            canaries = make_canaries(**spec)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"Expected dataset.options.canaries={spec!r} to be keyword "
                              f"arguments of dpjax.data.canaries.make_canaries: {err}") from err
        options[CANARIES_OPTION] = canaries
    if cfg.dataset.data_dir is not None:
        raise ConfigError(f"Expected dataset.data_dir=null for dataset={cfg.dataset.name!r} "
                          "(the user's text is dataset.options.path).")
    return options, canaries


def _check_kinds(cfg: RunConfig) -> None:
    if cfg.model.name not in LANGUAGE_MODELS:
        what = ("model.init_from", cfg.model.init_from) if cfg.model.init_from is not None \
            else ("dataset.name", cfg.dataset.name)
        raise ConfigError(f"Expected model.name={cfg.model.name!r} to be one of "
                          f"{list(LANGUAGE_MODELS)} with {what[0]}={what[1]!r} (text corpora "
                          "and init_from are for language models).")
    if cfg.dataset.name not in TEXT_DATASETS:
        raise ConfigError(f"Expected dataset.name={cfg.dataset.name!r} to be one of "
                          f"{list(TEXT_DATASETS)} with model.name={cfg.model.name!r}.")


def build_lm_fields(cfg: RunConfig) -> dict[str, Any]:
    """The fields of the :class:`~dpjax.task.Task` of a language-model config.

    Checks the config first (model and dataset kinds, options, the init_from source);
    refuses a DP run whose ``model.init_from`` was trained on its own private records.
    """
    _check_kinds(cfg)
    options, canaries = _dataset_options(cfg)
    settings = lm_settings(dict(cfg.model.options), options)
    source = None if cfg.model.init_from is None else load_source(cfg.model.init_from)
    corpus: TextDataset = load_dataset(cfg.dataset.name, **options)
    if cfg.dataset.name == "text" and Path(str(options.get("path"))).expanduser().is_file():
        logging.getLogger("dpjax").warning(
            "dataset=text from one file: its test split is %d of your records, held out of "
            "training; test_bits_per_byte and test_accuracy are computed on them without "
            "noise and are not covered by epsilon. Publish them only if those records may be "
            "public, or give a directory with a public test.txt.", corpus.num_test)
    digests = corpus.train_digests
    if source is not None:
        public_options = {k: v for k, v in options.items() if k != CANARIES_OPTION}
        init_from.check_source(source, dataset=cfg.dataset.name,
                               dataset_options=public_options, dp_enabled=cfg.dp.enabled,
                               public_datasets=PUBLIC_TEXT_DATASETS, digests=digests)
    if corpus.num_test == 0:
        raise ConfigError(f"Expected a non-empty test split in dataset={cfg.dataset.name!r} "
                          "(test.txt): test_bits_per_byte is measured on it.")
    holdout = (corpus.test_tokens, corpus.test_lengths)
    if cfg.train.eval_split == "validation":
        if corpus.num_validation == 0:
            raise ConfigError("Expected a non-empty validation split with "
                              "train.eval_split='validation'.")
        holdout = (corpus.validation_tokens, corpus.validation_lengths)
    params = start_params(settings, cfg.train.seed, source)
    model = settings.model
    check_no_batch_mixing(model, jnp.asarray(corpus.train_tokens[:2, :model.context_length]))
    trainable, frozen = split_params(params, trainable_mask(params, settings.trainable))
    loss = lm_loss(model.apply, context_length=model.context_length,
                   reduction=settings.loss_reduction)
    setup = LMSetup(settings, frozen, num_params(trainable), corpus, source, canaries, digests)
    largest = max(len(holdout[0]), corpus.num_test)
    return dict(
        x_train=corpus.train_tokens, y_train=corpus.train_lengths, holdout=holdout,
        test_split=(corpus.test_tokens, corpus.test_lengths),
        loss_fn=loss if settings.trainable == "full" else trainable_loss(loss, frozen),
        params=trainable,
        evaluate=_evaluator(setup, min(cfg.train.eval_batch_size, largest)),
        num_classes=VOCAB_SIZE, apply_fn=_apply(setup), lm=setup)


def _evaluator(setup: LMSetup, batch_size: int) -> Callable[..., dict[str, float]]:
    """``evaluate(params, tokens, lengths)``: ``accuracy`` (next-token), ``loss`` (nats per
    predicted token) and ``bits_per_byte`` of the merged model."""
    model = setup.model
    evaluate = make_lm_evaluator(model.apply, context_length=model.context_length,
                                 batch_size=batch_size)

    def run(params: PyTree, tokens: np.ndarray, lengths: np.ndarray) -> dict[str, float]:
        m = evaluate(setup.full_params(params), tokens, lengths)
        return {"accuracy": m["accuracy"], "loss": m["nll"], "bits_per_byte": m["bits_per_byte"]}

    return run


def _apply(setup: LMSetup) -> Callable[..., jax.Array]:
    """``apply_fn({"params": trainable}, tokens) -> logits`` of the merged model."""

    def apply_fn(variables, tokens):
        return setup.model.apply({"params": setup.full_params(variables["params"])}, tokens)

    return apply_fn


def summary_fields(setup: LMSetup | None) -> dict[str, Any]:
    """The language-model fields of ``summary.json`` (classified in :mod:`dpjax.outputs`);
    none for other tasks."""
    if setup is None:
        return {}
    corpus, source = setup.corpus, setup.source
    return {
        "corpus_hash": corpus.corpus_hash if corpus.hash_is_public else None,
        "generator_version": corpus.generator_version,
        "context_length": corpus.context_length,
        "trainable": setup.settings.trainable,
        "num_trainable_params": setup.num_trainable_params,
        "init_from": None if source is None else source.path,
        "init_from_dataset": None if source is None else source.dataset,
        "init_from_dp_enabled": None if source is None else source.dp_enabled,
        "init_from_epsilon": None if source is None else source.epsilon,
        "init_from_randomness": None if source is None else source.origins[0].randomness,
        "init_from_ancestors": None if source is None else [
            o.public() for o in source.origins[1:]],
    }
