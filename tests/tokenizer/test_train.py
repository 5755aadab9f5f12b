from __future__ import annotations

import json

import pytest

from camelid.errors import CamelidError
from camelid.tokenizer import Tokenizer
from camelid.tokenizer.train import DEFAULT_SPECIALS, separator_id, train_tokenizer


def test_trained_tokenizer_round_trips_and_keeps_specials(small_tokenizer, small_corpus) -> None:
    tok = Tokenizer.from_file(small_tokenizer)
    assert tok.vocab_size == 512
    # specials are single ids at the start of the vocabulary, the first one ends documents
    assert [tok.id_of(s) for s in DEFAULT_SPECIALS] == [0, 1, 2]
    assert separator_id(tok) == tok.eos_id == 0
    text = (small_corpus / "persuasion.txt").read_text()[:5000] + " naïve café — “quotes” 東京 🙂\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text  # byte-level: any UTF-8, even unseen scripts, survives
    assert len(ids) < len(text.encode()) / 2  # it did learn merges
    chat = "<|im_start|>user\nHello<|im_end|>\n"
    chat_ids = tok.encode(chat)
    assert chat_ids[0] == 1 and 2 in chat_ids


def test_transformers_reads_the_trained_tokenizer(small_tokenizer) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(small_tokenizer.parent)
    ours = Tokenizer.from_file(small_tokenizer)
    text = "It is a truth universally acknowledged, that a single man"
    assert hf.encode(text, add_special_tokens=False) == ours.encode(text)
    assert hf.eos_token == "<|endoftext|>"
    rendered = hf.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert json.loads((small_tokenizer.parent / "tokenizer_config.json").read_text())["eos_token"] == "<|endoftext|>"


def test_bad_inputs_are_one_line_errors(tmp_path, small_corpus) -> None:
    with pytest.raises(CamelidError, match="below the 259"):
        train_tokenizer([small_corpus / "emma.txt"], 100, tmp_path)
    with pytest.raises(CamelidError, match="no such file"):
        train_tokenizer([tmp_path / "missing.txt"], 1000, tmp_path)
    with pytest.raises(CamelidError, match="no such file or directory"):
        Tokenizer.load(tmp_path / "nothing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(CamelidError, match="not a valid tokenizer.json"):
        Tokenizer.load(tmp_path / "bad")
