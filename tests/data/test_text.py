"""Text corpora: one record per row, splits by record, reproducible corpora, canaries."""

from __future__ import annotations

import collections
import hashlib
import platform
import re
import tomllib
from pathlib import Path

import faker
import numpy as np
import pytest

from dpjax.data.canaries import index_secret, make_canaries, secret_index
from dpjax.data.synthetic_text import private_records
from dpjax.data.text import (
    BOS,
    EOS,
    PAD,
    TextDataset,
    decode,
    encode,
    load_private_text,
    load_pydoc_text,
    load_text,
    pydoc_records,
    split_records,
    tokenize_records,
)

REPO = Path(__file__).resolve().parents[2]
# SHA-256 of "\n".join(private_records(50, seed=0)) with faker 40.63.0, templates v1.
PRIVATE_SEED0_HASH = "a2cddc329d4802f2a6008eb55a5484ef99dc5b45b238f7874d23bbe86696b0eb"


def _decoded(tokens: np.ndarray) -> list[str]:
    return [decode(row) for row in tokens]


def test_encode_is_bos_utf8_bytes_eos_and_decode_inverts_it():
    text = "Dx: café — 42 €"
    ids = encode(text)
    assert ids.dtype == np.int32
    assert ids[0] == BOS and ids[-1] == EOS
    assert bytes(ids[1:-1].tolist()) == text.encode("utf-8")
    assert decode(np.concatenate([ids, [PAD, PAD]])) == text


def test_truncate_gives_one_row_holding_the_start_of_a_long_record():
    long_record = "x" * 100 + "tail"
    tokens, lengths, truncated = tokenize_records([long_record, "short"], context_length=16)
    assert tokens.shape == (2, 17)  # one row per record, never one per window
    np.testing.assert_array_equal(tokens[0], encode(long_record)[:17])
    assert lengths.tolist() == [17, 7]
    assert truncated == 1
    np.testing.assert_array_equal(tokens[1, 7:], PAD)


def test_windows_keep_a_long_record_in_one_row():
    record = "y" * 40  # 42 tokens: three windows of 16
    tokens, lengths, truncated = tokenize_records([record], context_length=16,
                                                  overflow="windows", max_windows=3)
    assert tokens.shape == (1, 3 * 16 + 1)
    assert lengths.tolist() == [42] and truncated == 0
    assert decode(tokens[0]) == record
    # more than max_windows hold: cut, still one row
    tokens, lengths, truncated = tokenize_records(["z" * 100], context_length=16,
                                                  overflow="windows", max_windows=3)
    assert tokens.shape == (1, 49) and lengths.tolist() == [49] and truncated == 1


def _dataset(**rows) -> TextDataset:
    tokens, lengths, _ = tokenize_records(["abc", "de"], context_length=8)
    fields = dict(train_tokens=tokens, train_lengths=lengths,
                  validation_tokens=tokens[:0], validation_lengths=lengths[:0],
                  test_tokens=tokens[:1], test_lengths=lengths[:1], context_length=8,
                  name="t", corpus_hash="0" * 64, generator_version="")
    fields.update(rows)
    return TextDataset(**fields)


def test_text_dataset_refuses_packed_or_malformed_rows():
    ds = _dataset()
    assert ds.windows == 1 and ds.num_train == 2 and ds.num_validation == 0
    packed = np.concatenate([encode("ab"), encode("c"), [PAD] * 3]).astype(np.int32)[None]
    with pytest.raises(ValueError, match="no packing"):
        _dataset(train_tokens=packed, train_lengths=np.array([7], np.int32))
    eos_inside = np.concatenate([encode("ab"), [97, EOS, PAD, PAD]]).astype(np.int32)[None]
    with pytest.raises(ValueError, match="EOS only"):
        _dataset(train_tokens=eos_inside, train_lengths=np.array([6], np.int32))
    wrong_length = _dataset().train_tokens.copy()
    with pytest.raises(ValueError, match="PAD after"):
        _dataset(train_tokens=wrong_length, train_lengths=np.array([2, 2], np.int32))
    with pytest.raises(ValueError, match="int32"):
        _dataset(train_tokens=wrong_length.astype(np.int64))
    with pytest.raises(ValueError, match="corpus_hash"):
        _dataset(corpus_hash="abc")
    with pytest.raises(ValueError, match="context_length"):
        _dataset(context_length=5)


def test_split_records_is_a_partition_by_record():
    records = [f"record {i}" for i in range(103)]
    train, val, test = split_records(records, validation_fraction=0.1, test_fraction=0.2,
                                     seed=3)
    assert (len(val), len(test), len(train)) == (10, 21, 72)
    assert sorted(train + val + test) == sorted(records)
    assert not (set(train) & set(val) or set(train) & set(test) or set(val) & set(test))
    assert split_records(records, validation_fraction=0.1, test_fraction=0.2, seed=3)[0] == train
    with pytest.raises(ValueError, match="at least one"):
        split_records(records, validation_fraction=0.5, test_fraction=0.5, seed=0)


def test_private_corpus_splits_hold_each_record_once():
    records = private_records(200, seed=5)
    assert len(set(records)) == 200
    ds = load_private_text(num_records=200, seed=5, overflow="windows", max_windows=2)
    assert ds.num_truncated == 0
    splits = [_decoded(t) for t in (ds.train_tokens, ds.validation_tokens, ds.test_tokens)]
    assert [len(s) for s in splits] == [160, 20, 20]
    assert sorted(sum(splits, [])) == sorted(records)
    assert not (set(splits[0]) & set(splits[1]) or set(splits[0]) & set(splits[2])
                or set(splits[1]) & set(splits[2]))


def test_private_corpus_is_reproducible_from_its_seed_and_the_pinned_faker():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    pins = [d for d in pyproject["project"]["dependencies"] if d.lower().startswith("faker")]
    assert pins == [f"faker=={faker.VERSION}"]
    records = private_records(50, seed=0)
    assert hashlib.sha256("\n".join(records).encode()).hexdigest() == PRIVATE_SEED0_HASH
    assert private_records(50, seed=1) != records
    a = load_private_text(num_records=60, seed=2)
    b = load_private_text(num_records=60, seed=2)
    np.testing.assert_array_equal(a.train_tokens, b.train_tokens)
    assert a.corpus_hash == b.corpus_hash
    assert a.generator_version == f"faker=={faker.VERSION};templates=1;locale=en_US"
    texts = private_records(40, kind="clinical", seed=0)
    assert all(re.search(r"\d{4}-\d{2}-\d{2}", t) for t in texts)
    assert all(("Dx" in t) or ("Assessment" in t) or ("Discharge" in t) for t in texts)
    assert all("$" in t for t in private_records(40, kind="bank", seed=0))


def test_public_corpus_hash_matches_the_text_it_holds():
    records = pydoc_records()
    assert len(records) > 500 and all(len(r) >= 40 and "\n" not in r for r in records)
    from pydoc_data.topics import topics

    source = " ".join(" ".join(topics.values()).split())
    assert all(r[:60] in source for r in records)
    ds = load_pydoc_text(context_length=512, overflow="windows", max_windows=10)
    assert ds.num_truncated == 0
    assert ds.generator_version == f"python-{platform.python_version()}"
    expected = hashlib.sha256("\n".join(records).encode("utf-8")).hexdigest()
    assert ds.corpus_hash == expected and ds.hash_is_public
    held = sum((_decoded(t) for t in (ds.train_tokens, ds.validation_tokens, ds.test_tokens)),
               [])
    assert collections.Counter(held) == collections.Counter(records)


def test_text_loader_reads_one_record_per_line(tmp_path):
    lines = [f"message {i}: meet at {i} pm" for i in range(20)]
    path = tmp_path / "notes.txt"
    path.write_text("\n".join(lines[:10]) + "\r\n\n   \n" + "\n".join(lines[10:]) + "\n",
                    encoding="utf-8")
    ds = load_text(path=path, validation_fraction=0.1, test_fraction=0.1, seed=0)
    held = _decoded(ds.train_tokens) + _decoded(ds.validation_tokens) + _decoded(ds.test_tokens)
    assert sorted(held) == sorted(lines)
    assert (ds.num_train, ds.num_validation, ds.num_test) == (16, 2, 2)
    assert ds.corpus_hash == hashlib.sha256("\n".join(lines).encode()).hexdigest()
    assert not ds.hash_is_public  # a hash of private text must not be published
    for split, chosen in (("train", lines[:5]), ("validation", lines[5:7]), ("test", [])):
        (tmp_path / f"{split}.txt").write_text("\n".join(chosen), encoding="utf-8")
    ds = load_text(path=tmp_path)
    assert _decoded(ds.train_tokens) == lines[:5] and ds.num_test == 0


def test_text_loader_errors_name_the_path_and_what_to_put_there(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match=r"nope\.txt.*one record"):
        load_text(path=missing)
    (tmp_path / "train.txt").write_text("a\n", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match=r"validation\.txt, test\.txt in"):
        load_text(path=tmp_path)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\n\xff\xfe broken\n")
    with pytest.raises(ValueError, match=r"bad\.txt to be UTF-8 text; line 2"):
        load_text(path=bad)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="non-blank line"):
        load_text(path=blank)
    with pytest.raises(ValueError, match="overflow='pack'"):
        load_text(path=bad, overflow="pack")
    # classic Mac line endings would join three records into one row (packing): refused
    mac = tmp_path / "mac.txt"
    mac.write_bytes(b"alice 1\r\nbob 2\rcarol 3\r")
    with pytest.raises(ValueError, match=r"mac\.txt .*line 2 holds a carriage return"):
        load_text(path=mac)


def test_a_byte_order_mark_is_not_part_of_the_first_record(tmp_path):
    from dpjax.data.text import read_records

    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffalice 1\r\nbob 2\n".encode())
    assert read_records(path) == ["alice 1", "bob 2"]


def test_canaries_are_inserted_into_train_only_with_their_repetitions():
    canaries = make_canaries(seed=4, repetitions=(1, 4, 16), canaries_per_repetition=2,
                             num_fresh=5, secret_length=4)
    assert make_canaries(seed=4, repetitions=(1, 4, 16), canaries_per_repetition=2,
                         num_fresh=5, secret_length=4) == canaries
    assert [c.repetitions for c in canaries.inserted] == [1, 1, 4, 4, 16, 16]
    assert canaries.space_size == 10**4
    texts = [c.text for c in canaries.inserted + canaries.fresh]
    assert len(set(texts)) == 11 and len({c.prefix for c in canaries.inserted}) == 6
    assert all(re.fullmatch(r"the PIN of .+ is \d{4}", t) for t in texts)
    ds = load_private_text(num_records=100, seed=0, canaries=canaries)
    assert ds.num_canary_records == 2 * (1 + 4 + 16) and ds.num_train == 80 + 42
    counts = collections.Counter(_decoded(ds.train_tokens))
    for c in canaries.inserted:
        assert counts[c.text] == c.repetitions
    held_out = set(_decoded(ds.validation_tokens) + _decoded(ds.test_tokens))
    assert not held_out & set(texts)
    assert not set(counts) & {c.text for c in canaries.fresh}


def test_secret_index_is_the_base_len_alphabet_number():
    assert secret_index("000417", "0123456789") == 417
    assert index_secret(417, "0123456789", 6) == "000417"
    assert secret_index("ba", "ab") == 2 and index_secret(3, "ab", 2) == "bb"
    with pytest.raises(ValueError, match="alphabet"):
        make_canaries(seed=0, alphabet="00")
    with pytest.raises(ValueError, match="at most 100 canaries"):
        make_canaries(seed=0, secret_length=2, num_fresh=100)
