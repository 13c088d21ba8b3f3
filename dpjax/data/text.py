"""Text corpora for language models: records, byte-level tokens, one record per row.

A *record* (one paragraph, one synthetic note, one line of the user's file) is
the unit of privacy. Each record becomes exactly one row of token ids
``[BOS, utf-8 bytes..., EOS, PAD...]``: a record longer than the row is cut
(``overflow="truncate"``) or spread over up to ``max_windows`` context windows
of the same row whose losses the model sums (``overflow="windows"``, see
:func:`dpjax.models.transformer.lm_loss`). No record ever spans two rows and no
row holds two records, so per-example clipping bounds one record's contribution.

Corpora (nothing is downloaded):

- ``pydoc_topics`` (:func:`load_pydoc_text`): the English prose paragraphs of
  the standard library's ``pydoc_data.topics`` (public; depends on the Python
  version, hence its SHA-256 in :attr:`TextDataset.corpus_hash`);
- ``synthetic_private`` (:func:`load_private_text`): seeded fake clinical notes
  and bank messages from :mod:`dpjax.data.synthetic_text`;
- ``text`` (:func:`load_text`): the user's UTF-8 files, one record per line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import platform
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import dpjax.data._checks as _checks
from dpjax.data.canaries import CanarySet, insert_canaries
from dpjax.data.synthetic_text import KINDS, generator_version, private_records

BOS = 256
EOS = 257
PAD = 258
VOCAB_SIZE = 259
"""Byte values 0..255, then BOS, EOS and PAD."""

OVERFLOWS = ("truncate", "windows")
SPLITS = ("train", "validation", "test")
TEXT_FILES = {split: f"{split}.txt" for split in SPLITS}
_MIN_PROSE_CHARS = 40
_RULE = re.compile(r"[*=\-~^]+")


def encode(text: str) -> np.ndarray:
    """``[BOS, utf-8 bytes of text..., EOS]`` as ``int32``."""
    body = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
    return np.concatenate([[BOS], body, [EOS]]).astype(np.int32)


def decode(tokens: Sequence[int] | np.ndarray) -> str:
    """The text of one row: the bytes before the first EOS/PAD, BOS skipped.

    Invalid UTF-8 (a truncated multi-byte character) becomes U+FFFD.
    """
    out = bytearray()
    for t in np.asarray(tokens).tolist():
        if t in (EOS, PAD):
            break
        if t < 256:
            out.append(t)
    return out.decode("utf-8", errors="replace")


def corpus_hash(records: Sequence[str]) -> str:
    """SHA-256 (hex) of the records joined with ``"\\n"``, UTF-8 encoded."""
    return hashlib.sha256("\n".join(records).encode("utf-8")).hexdigest()


def row_width(context_length: int, overflow: str, max_windows: int) -> int:
    """Tokens per row: ``windows * context_length + 1`` (inputs and shifted targets).

    ``windows`` is 1 for ``"truncate"`` and ``max_windows`` for ``"windows"``: a
    declared option, never the longest record's length, which would make a
    shape depend on one private record.
    """
    _checks.int_at_least("context_length", context_length, 1)
    if overflow not in OVERFLOWS:
        raise ValueError(f"Expected overflow={overflow!r} to be one of {list(OVERFLOWS)}.")
    _checks.int_at_least("max_windows", max_windows, 1)
    windows = 1 if overflow == "truncate" else max_windows
    return windows * context_length + 1


def tokenize_records(
    records: Sequence[str], *, context_length: int, overflow: str = "truncate", max_windows: int = 4
) -> tuple[np.ndarray, np.ndarray, int]:
    """One row per record: ``(tokens [N, W], lengths [N], num_truncated)``.

    ``W = row_width(context_length, overflow, max_windows)``; ``lengths`` counts
    the row's real tokens (BOS and, unless cut, EOS included); the rest is PAD.
    ``num_truncated`` records did not fit and lost their tail (and EOS).
    """
    width = row_width(context_length, overflow, max_windows)
    tokens = np.full((len(records), width), PAD, np.int32)
    lengths = np.zeros(len(records), np.int32)
    truncated = 0
    for i, record in enumerate(records):
        ids = encode(record)
        n = min(len(ids), width)
        tokens[i, :n] = ids[:n]
        lengths[i] = n
        truncated += len(ids) > width
    return tokens, lengths, truncated


@dataclasses.dataclass(frozen=True, eq=False)
class TextDataset:
    """A tokenized text corpus: one row per record in each of three splits.

    Attributes:
      train_tokens, validation_tokens, test_tokens: ``int32 [N, W]`` rows
        ``[BOS, bytes..., EOS, PAD...]`` with ``W = windows * context_length + 1``.
      train_lengths, validation_lengths, test_lengths: ``int32 [N]`` real tokens per row.
      context_length: the model's context; ``windows = (W - 1) // context_length``.
      name: the corpus (``pydoc_topics``, ``synthetic_private``, ``text``).
      corpus_hash: SHA-256 of the corpus records before splitting (:func:`corpus_hash`);
        canary records are not included.
      hash_is_public: whether ``corpus_hash`` may be published. True when the
        text is a function of public inputs only (pydoc; the synthetic corpus,
        fixed by its seed and the faker version); False for the user's text,
        whose hash would let anyone confirm a guess of the private records.
      generator_version: what produced the text (Python version for pydoc,
        ``faker==...`` for the synthetic corpus, ``""`` for the user's files).
      vocab_size: 259 (bytes, BOS, EOS, PAD).
      num_truncated: records (all splits) that did not fit in a row.
      num_canary_records: canary records inserted into the training split.
      train_digests: :func:`record_digests` of the training records (canaries included):
        unkeyed hashes of private text, for checkpoints only (``model.init_from``'s check).
    """

    train_tokens: np.ndarray
    train_lengths: np.ndarray
    validation_tokens: np.ndarray
    validation_lengths: np.ndarray
    test_tokens: np.ndarray
    test_lengths: np.ndarray
    context_length: int
    name: str
    corpus_hash: str
    generator_version: str
    hash_is_public: bool = False
    vocab_size: int = VOCAB_SIZE
    num_truncated: int = 0
    num_canary_records: int = 0
    train_digests: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _checks.int_at_least("context_length", self.context_length, 1)
        _checks.int_at_least("vocab_size", self.vocab_size, VOCAB_SIZE)
        _checks.int_at_least("num_truncated", self.num_truncated, 0)
        _checks.int_at_least("num_canary_records", self.num_canary_records, 0)
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Expected name={self.name!r} to be a non-empty string.")
        if not isinstance(self.corpus_hash, str) or not re.fullmatch(r"[0-9a-f]{64}",
                                                                       self.corpus_hash):
            raise ValueError(f"Expected corpus_hash={self.corpus_hash!r} to be a SHA-256 hex "
                             "digest (64 lowercase hex characters).")
        if not isinstance(self.hash_is_public, bool):
            raise ValueError(f"Expected hash_is_public={self.hash_is_public!r} to be a bool.")
        if not isinstance(self.generator_version, str):
            raise ValueError(f"Expected generator_version={self.generator_version!r} to be a "
                             "string.")
        width = None
        for split in SPLITS:
            tokens, lengths = getattr(self, f"{split}_tokens"), getattr(self, f"{split}_lengths")
            _check_rows(split, tokens, lengths, self.vocab_size)
            if width is None:
                width = tokens.shape[1]
            elif tokens.shape[1] != width:
                raise ValueError(f"Expected {split}_tokens rows of width {width} like "
                                 f"train_tokens; got {tokens.shape[1]}.")
        if (width - 1) % self.context_length or width < 2:
            raise ValueError(f"Expected the row width {width} to be windows * context_length "
                             f"+ 1 with context_length={self.context_length}.")
        if self.num_train == 0:
            raise ValueError("Expected at least one record in the training split; got 0.")

    @property
    def windows(self) -> int:
        """Context windows per row (1 when records are truncated to one context)."""
        return (self.train_tokens.shape[1] - 1) // self.context_length

    @property
    def num_train(self) -> int:
        return int(self.train_tokens.shape[0])

    @property
    def num_validation(self) -> int:
        return int(self.validation_tokens.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.test_tokens.shape[0])


def _check_rows(split: str, tokens: np.ndarray, lengths: np.ndarray, vocab_size: int) -> None:
    """Each row is one record: BOS first, no BOS/PAD inside, EOS only last, PAD after."""
    if not isinstance(tokens, np.ndarray) or tokens.dtype != np.int32 or tokens.ndim != 2:
        raise ValueError(f"Expected {split}_tokens to be a 2-D int32 numpy array; got "
                         f"{type(tokens).__name__} {getattr(tokens, 'dtype', None)} "
                         f"{getattr(tokens, 'shape', None)}.")
    if not isinstance(lengths, np.ndarray) or lengths.dtype != np.int32 or lengths.ndim != 1:
        raise ValueError(f"Expected {split}_lengths to be a 1-D int32 numpy array; got "
                         f"{type(lengths).__name__} {getattr(lengths, 'dtype', None)} "
                         f"{getattr(lengths, 'shape', None)}.")
    if tokens.shape[0] != lengths.shape[0]:
        raise ValueError(f"Expected as many {split}_lengths as {split}_tokens rows; got "
                         f"{lengths.shape[0]} and {tokens.shape[0]}.")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"Expected {split}_tokens in [0, {vocab_size}); got min="
                         f"{int(tokens.min())}, max={int(tokens.max())}.")
    if lengths.size and (lengths.min() < 2 or lengths.max() > tokens.shape[1]):
        raise ValueError(f"Expected {split}_lengths in [2, {tokens.shape[1]}] (BOS and at "
                         f"least one byte or EOS); got min={int(lengths.min())}, "
                         f"max={int(lengths.max())}.")
    pos = np.arange(tokens.shape[1])[None, :]
    inside = pos < lengths[:, None]
    if np.any(tokens[~inside] != PAD):
        raise ValueError(f"Expected {split}_tokens to be PAD after each row's length.")
    if np.any(tokens[:, 0][lengths > 0] != BOS):
        raise ValueError(f"Expected every {split}_tokens row to start with BOS.")
    body = inside & (pos > 0)
    if np.any(body & ((tokens == BOS) | (tokens == PAD))):
        raise ValueError(f"Expected no BOS or PAD inside a {split} row: one record per row, "
                         "no packing.")
    if np.any(body & (tokens == EOS) & (pos != lengths[:, None] - 1)):
        raise ValueError(f"Expected EOS only as the last real token of a {split} row: one "
                         "record per row, no packing.")


def split_records(
    records: Sequence[str], *, validation_fraction: float, test_fraction: float, seed: int
) -> tuple[list[str], list[str], list[str]]:
    """Shuffles whole records with ``seed`` and splits them: no record is in two splits.

    ``round(n * fraction)`` records go to validation and to test, the rest to train.
    """
    _checks.seed("seed", seed)
    for name, value in (("validation_fraction", validation_fraction),
                        ("test_fraction", test_fraction)):
        _checks.finite_non_negative(name, value)
    n = len(records)
    num_val, num_test = round(n * validation_fraction), round(n * test_fraction)
    if num_val + num_test >= n:
        raise ValueError(f"Expected validation_fraction={validation_fraction!r} and "
                         f"test_fraction={test_fraction!r} to leave at least one of the {n} "
                         f"records for training; they take {num_val} + {num_test}.")
    order = np.random.default_rng(seed).permutation(n)
    pick = [records[i] for i in order]
    return pick[num_val + num_test:], pick[:num_val], pick[num_val:num_val + num_test]


def make_text_dataset(
    splits: tuple[Sequence[str], Sequence[str], Sequence[str]],
    *,
    name: str,
    corpus_hash: str,
    generator_version: str,
    hash_is_public: bool,
    context_length: int,
    overflow: str,
    max_windows: int,
    canaries: CanarySet | None = None,
) -> TextDataset:
    """Tokenizes ``(train, validation, test)`` records; canaries go into train only."""
    train, validation, test = (list(s) for s in splits)
    num_canary_records = 0
    if canaries is not None:
        before = len(train)
        train = insert_canaries(train, canaries)
        num_canary_records = len(train) - before
    arrays, truncated = {}, 0
    for split, records in zip(SPLITS, (train, validation, test), strict=True):
        tokens, lengths, cut = tokenize_records(
            records, context_length=context_length, overflow=overflow, max_windows=max_windows
        )
        arrays[f"{split}_tokens"], arrays[f"{split}_lengths"] = tokens, lengths
        truncated += cut
    return TextDataset(**arrays, context_length=context_length, name=name,
                       corpus_hash=corpus_hash, generator_version=generator_version,
                       hash_is_public=hash_is_public, num_truncated=truncated,
                       num_canary_records=num_canary_records,
                       train_digests=record_digests(train))


DIGEST_CHARS = 16  # hex characters kept of each record's SHA-256 (64 bits)


def record_digests(records: Sequence[str]) -> tuple[str, ...]:
    """The first 64 bits (hex) of the SHA-256 of each record's whole UTF-8 text, sorted and
    distinct: the same record gives the same digest whatever the context length, overflow
    mode, file, path or split it came from. Byte-identical records only (an edit of one
    character, or other whitespace, gives another digest)."""
    return tuple(sorted({hashlib.sha256(r.encode("utf-8")).hexdigest()[:DIGEST_CHARS]
                         for r in records}))


def pydoc_records() -> list[str]:
    """The prose paragraphs of ``pydoc_data.topics``, in sorted topic order.

    A paragraph (text between blank lines) is kept when it does not start
    with whitespace (indented blocks are code, grammar or examples), heading
    underlines (``****``, ``====``) are dropped, whitespace is collapsed to
    single spaces, and paragraphs shorter than 40 characters are dropped.
    """
    from pydoc_data.topics import topics

    records = []
    for key in sorted(topics):
        for block in re.split(r"\n[ \t]*\n", topics[key]):
            if not block.strip() or block[0].isspace():
                continue
            lines = [line for line in block.splitlines() if not _RULE.fullmatch(line.strip())]
            text = " ".join(" ".join(lines).split())
            if len(text) >= _MIN_PROSE_CHARS:
                records.append(text)
    return records


def load_pydoc_text(
    *,
    context_length: int = 128,
    overflow: str = "truncate",
    max_windows: int = 4,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> TextDataset:
    """The public corpus: prose of the standard library's ``pydoc_data`` topics.

    About 1,050 paragraphs / 252 KB on Python 3.11 (more on later versions);
    the text depends on the Python version, which ``generator_version`` names
    and ``corpus_hash`` pins. Records are split by ``seed``.
    """
    row_width(context_length, overflow, max_windows)
    records = pydoc_records()
    splits = split_records(records, validation_fraction=validation_fraction,
                           test_fraction=test_fraction, seed=seed)
    return make_text_dataset(
        splits, name="pydoc_topics", corpus_hash=corpus_hash(records),
        generator_version=f"python-{platform.python_version()}", hash_is_public=True,
        context_length=context_length, overflow=overflow, max_windows=max_windows,
    )


def load_private_text(
    *,
    num_records: int = 2000,
    kind: str = "mixed",
    seed: int = 0,
    context_length: int = 128,
    overflow: str = "truncate",
    max_windows: int = 4,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    canaries: CanarySet | None = None,
) -> TextDataset:
    """The private corpus: ``num_records`` fake clinical notes / bank messages.

    Generated from ``seed`` with the pinned ``faker`` (its version is in
    ``generator_version``); the same seed and version give the same records.
    ``canaries`` (if any) are inserted into the training split only.
    """
    row_width(context_length, overflow, max_windows)
    _checks.int_at_least("num_records", num_records, 2)
    if kind not in KINDS:
        raise ValueError(f"Expected kind={kind!r} to be one of {list(KINDS)}.")
    records = private_records(num_records, kind=kind, seed=seed)
    splits = split_records(records, validation_fraction=validation_fraction,
                           test_fraction=test_fraction, seed=seed)
    return make_text_dataset(
        splits, name="synthetic_private", corpus_hash=corpus_hash(records),
        generator_version=generator_version(), hash_is_public=True,
        context_length=context_length, overflow=overflow, max_windows=max_windows,
        canaries=canaries,
    )


def read_records(path: str | os.PathLike[str], *, allow_empty: bool = False) -> list[str]:
    """The non-blank lines of a UTF-8 file, line endings stripped: one record per line.

    Raises:
      FileNotFoundError: ``path`` does not exist (the message says what to put there).
      ValueError: the file is not UTF-8, or has no non-blank line and not ``allow_empty``.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"Expected a text file at {path}: UTF-8 text with one record (one unit of "
            "privacy, e.g. one message or one document) per line."
        )
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ValueError(f"Expected {path} to be UTF-8 text; line {line} is not "
                         f"({err.reason}).") from None
    text = text.removeprefix("\ufeff")  # a byte-order mark is not part of the first record
    lone_cr = re.search(r"\r(?!\n)", text)
    if lone_cr:
        line = text.count("\n", 0, lone_cr.start()) + 1
        raise ValueError(f"Expected {path} to separate records by newlines (\\n or \\r\\n); "
                         f"line {line} holds a carriage return not followed by a newline, "
                         "which would join several records into one row (classic Mac line "
                         "endings: convert them, e.g. with tr '\\r' '\\n').")
    records = [line.rstrip("\r") for line in text.split("\n")]
    records = [r for r in records if r.strip()]
    if not records and not allow_empty:
        raise ValueError(f"Expected at least one non-blank line (one record per line) in "
                         f"{path}; it has none.")
    return records


def load_text(
    *,
    path: str | os.PathLike[str],
    context_length: int = 128,
    overflow: str = "truncate",
    max_windows: int = 4,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    canaries: CanarySet | None = None,
) -> TextDataset:
    """The user's text: one record per line of UTF-8 files (blank lines skipped).

    ``path`` is either one file, split by record with the fractions and
    ``seed``, or a directory holding ``train.txt``, ``validation.txt`` and
    ``test.txt`` (used as given, the fractions ignored; validation and test may be
    empty).
    ``corpus_hash`` is over the records in train, validation, test order; it is
    a function of the private text, so ``hash_is_public`` is False: keep it out
    of anything published (a run summary), or it confirms guesses of the data.

    Raises:
      FileNotFoundError: ``path`` or one of the three files is missing.
      ValueError: a file is not UTF-8, has no record, or an option is invalid.
    """
    row_width(context_length, overflow, max_windows)
    root = Path(path).expanduser()
    if root.is_dir():
        missing = [f for f in TEXT_FILES.values() if not (root / f).is_file()]
        if missing:
            raise FileNotFoundError(
                f"Expected {', '.join(missing)} in {root}: a directory for dataset 'text' "
                "holds train.txt, validation.txt and test.txt, UTF-8 with one record per line "
                "(or pass the path of a single file to split it by record)."
            )
        splits = tuple(read_records(root / TEXT_FILES[s], allow_empty=s != "train")
                       for s in SPLITS)
        records = [r for split in splits for r in split]
    else:
        records = read_records(root)
        splits = split_records(records, validation_fraction=validation_fraction,
                               test_fraction=test_fraction, seed=seed)
    return make_text_dataset(
        splits, name="text", corpus_hash=corpus_hash(records), generator_version="",
        hash_is_public=False, context_length=context_length, overflow=overflow,
        max_windows=max_windows, canaries=canaries,
    )
