from __future__ import annotations

import json

import numpy as np
import pytest
import train_helpers
from tokenizers import Tokenizer

from camelid.errors import CamelidError
from camelid.train import data as data_mod
from camelid.train.data import Document, TokenShards, prepare, read_documents, split_pieces, token_dtype


def test_prepare_round_trips_text(small_data, small_corpus, small_tokenizer) -> None:
    tok = Tokenizer.from_file(str(small_tokenizer))  # the `tokenizers` library itself
    meta = json.loads((small_data / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["train_docs"] == 2 and meta["val_docs"] == 1
    shards = TokenShards(small_data)
    train = np.asarray(shards.streams["train"])
    # documents are separated (ended) by EOS; decoding each gives back the file exactly
    ends = np.flatnonzero(train == meta["eos_id"])
    assert len(ends) == 2 and ends[-1] == len(train) - 1
    docs = np.split(train, ends[:-1] + 1)
    texts = [tok.decode(d[:-1].tolist(), skip_special_tokens=False) for d in docs]
    assert texts == [(small_corpus / n).read_text() for n in ("emma.txt", "pride_and_prejudice.txt")]
    # and the ids are what the tokenizer gives for the whole document at once
    whole = tok.encode((small_corpus / "emma.txt").read_text(), add_special_tokens=False).ids
    assert docs[0][:-1].tolist() == whole
    val_text = (small_corpus / "persuasion.txt").read_text()
    assert tok.decode(np.asarray(shards.streams["val"])[:-1].tolist()) == val_text
    assert meta["val_bytes"] == len(val_text.encode())
    assert (small_data / "tokenizer.json").read_bytes() == small_tokenizer.read_bytes()


def test_long_documents_split_only_where_encoding_is_unchanged(small_corpus, small_tokenizer) -> None:
    tok = Tokenizer.from_file(str(small_tokenizer))  # the `tokenizers` library itself
    text = (small_corpus / "emma.txt").read_text()
    pieces = split_pieces(text, size=3000)
    assert len(pieces) > 10 and "".join(pieces) == text
    joined = [i for p in pieces for i in tok.encode(p, add_special_tokens=False).ids]
    assert joined == tok.encode(text, add_special_tokens=False).ids


def test_jsonl_field_and_random_split(tmp_path, small_tokenizer) -> None:
    lines = [json.dumps({"text": f"Document number {i}: Mr. Darcy walked.", "id": i}) for i in range(40)]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    docs = read_documents([tmp_path / "docs.jsonl"], field="text", val_fraction=0.1, seed=3)
    assert len(docs) == 40 and sum(d.val for d in docs) == 4
    meta = prepare(docs, small_tokenizer, tmp_path / "out", workers=1, progress=False)
    assert meta["train_docs"] == 36 and meta["val_docs"] == 4
    with pytest.raises(CamelidError, match="no field 'body'"):
        read_documents([tmp_path / "docs.jsonl"], field="body")
    one = read_documents([tmp_path / "docs.jsonl"], field="text")
    assert not any(d.val for d in one)


def test_single_document_holds_out_its_tail() -> None:
    text = "".join(f"line {i}\n" for i in range(100))
    docs = data_mod.split_documents([Document(text, False)], 0.1, 0)
    assert [d.val for d in docs] == [False, True] and docs[0].text + docs[1].text == text
    assert docs[1].text.startswith("line 90")


def test_token_dtype_follows_vocab_size() -> None:
    assert token_dtype(50_000) == np.uint16 and token_dtype(65_536) == np.uint16
    assert token_dtype(65_537) == np.uint32 and token_dtype(128_256) == np.uint32


def test_interrupted_prepare_reruns_cleanly(tmp_path, small_corpus, small_tokenizer, small_data, monkeypatch) -> None:
    docs = read_documents([small_corpus], val_files=["persuasion.txt"])
    out = tmp_path / "data"
    monkeypatch.setattr(data_mod, "_encode", train_helpers.dying_encode)
    monkeypatch.setattr(data_mod, "_PIECE_CHARS", 4000)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare(docs, small_tokenizer, out, workers=1, progress=False)
    assert (out / ".train.bin.partial").exists()  # it died half-way through writing
    assert not (out / "meta.json").exists()  # not mistaken for a finished folder
    with pytest.raises(CamelidError, match="not a prepared data folder"):
        TokenShards(out)
    monkeypatch.undo()
    meta = prepare(docs, small_tokenizer, out, workers=2, progress=False)
    assert not list(out.glob(".*.partial"))
    for f in ("train.bin", "val.bin"):
        assert (out / f).read_bytes() == (small_data / f).read_bytes()
    # a second run with the same inputs finds the finished folder and leaves it alone
    mtime = (out / "train.bin").stat().st_mtime_ns
    assert prepare(docs, small_tokenizer, out, workers=2, progress=False) == meta
    assert (out / "train.bin").stat().st_mtime_ns == mtime


def test_shards_of_the_wrong_size_are_rejected(tmp_path, small_data) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(small_data, bad)
    with open(bad / "train.bin", "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(CamelidError, match="wrong size"):
        TokenShards(bad)


def test_batches_depend_only_on_seed_step_and_index(small_data) -> None:
    shards = TokenShards(small_data)
    x1, y1 = shards.batch(7, 3, 1, 4, 16)
    x2, y2 = shards.batch(7, 3, 1, 4, 16)
    assert x1.equal(x2) and y1.equal(y2) and x1[:, 1:].equal(y1[:, :-1])
    assert not shards.batch(7, 3, 0, 4, 16)[0].equal(x1)
    windows = list(shards.val_windows(16))
    covered = sum(y.numel() for _, y in windows)
    assert covered == shards.meta["val_tokens"] - 1


def test_hugging_face_dataset_from_local_files(tmp_path, small_tokenizer, monkeypatch) -> None:
    """`datasets` (json builder on a local file) yields the same documents as reading the jsonl ourselves."""
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    lines = [json.dumps({"body": f"Chapter {i}. Anne Elliot walked to Uppercross."}) for i in range(12)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    ours = read_documents([tmp_path / "d.jsonl"], field="body")
    theirs = data_mod.hf_documents("json", "train", "body", data_files=[str(tmp_path / "d.jsonl")])
    assert [d.text for d in theirs] == [d.text for d in ours]
    with pytest.raises(CamelidError, match="no column 'text'"):
        data_mod.hf_documents("json", "train", "text", data_files=[str(tmp_path / "d.jsonl")])
