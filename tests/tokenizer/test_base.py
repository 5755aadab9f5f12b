"""camelid.tokenizer.base: the one interface (loading by format, streaming, errors), the same for every backend."""

from __future__ import annotations

import pytest
from tokenizer_helpers import LLAMA_CPP, MIXED, vocab

from camelid import hub
from camelid.errors import CamelidError
from camelid.tokenizer import StreamDecoder, Tokenizer, WordPiece

# ---- loading: every format through Tokenizer.load ------------------------------------------------------------


def test_load_dispatches_every_format(tmp_path, smollm2_gguf, minilm_dir, llama2_json):
    assert Tokenizer.load(smollm2_gguf).pre == "smollm"  # a GGUF file
    assert Tokenizer.load("llama3-tokenizer").vocab_size == 128256  # a registered name (tiktoken file)
    assert Tokenizer.load(hub.MODELS["llama2-tokenizer"].path).kind == "spm"  # a tokenizer.json by another name
    llama2_json.save_pretrained(tmp_path / "folder")
    assert Tokenizer.load(tmp_path / "folder").encode("Hello world") == llama2_json.encode("Hello world")
    # BERT: a folder, its vocab.txt alone, or through WordPiece (which adds the pair/batch API)
    bert = Tokenizer.load(minilm_dir)
    assert type(bert) is Tokenizer and bert.kind == "wordpiece"
    assert bert.encode("Hello world", add_bos=True) == [101, 7592, 2088, 102]
    assert Tokenizer.load(minilm_dir / "vocab.txt").encode("Hello world") == [7592, 2088]
    wp = WordPiece.load(minilm_dir)
    assert isinstance(wp, WordPiece) and wp.encode("Hello world") == bert.encode("Hello world")
    with pytest.raises(CamelidError, match="not WordPiece"):
        WordPiece.load(smollm2_gguf)


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(CamelidError, match="no such tokenizer file"):
        Tokenizer.from_file(tmp_path / "missing.json")
    with pytest.raises(CamelidError, match="has no tokenizer.json, tokenizer.model or vocab.txt"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(CamelidError, match="a folder camelid cannot read"):
        Tokenizer.load(tmp_path)
    (tmp_path / "junk.gguf").write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(CamelidError, match="not a GGUF file"):
        Tokenizer.from_gguf(tmp_path / "junk.gguf")
    (tmp_path / "picture.png").write_bytes(b"\x89PNG\r\n" + bytes(100))
    with pytest.raises(CamelidError, match="not a file camelid reads") as e:
        Tokenizer.load(tmp_path / "picture.png")
    assert str(tmp_path / "picture.png") in str(e.value)
    (tmp_path / "ckpt").mkdir()
    for name in ("model.safetensors", "state.pt", "meta.json"):
        (tmp_path / "ckpt" / name).write_bytes(b"")
    with pytest.raises(CamelidError, match="training checkpoint holds no tokenizer"):
        Tokenizer.load(tmp_path / "ckpt")


def test_interface_errors_are_one_line():
    tok = vocab("llama-spm")
    with pytest.raises(CamelidError, match="outside the vocabulary"):
        tok.decode([1, 40000])
    with pytest.raises(CamelidError, match="not a token"):
        tok.id_of("<|nope|>")
    with pytest.raises(CamelidError, match="expects a str"):
        tok.encode(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(CamelidError, match="expects str"):
        tok.encode_batch(["ok", b"bytes"])  # type: ignore[list-item]


@pytest.mark.parametrize("name", ["llama-spm", "qwen2"])
def test_encode_batch_is_encode(name):
    tok = vocab(name)
    assert tok.encode_batch(MIXED, add_bos=True) == [tok.encode(t, add_bos=True) for t in MIXED]


def test_every_backend_has_the_same_interface(smol, llama3, llama2_json, minilm_dir):
    for tok in (smol, llama3, llama2_json, vocab("llama-spm"), Tokenizer.load(minilm_dir)):
        ids = tok.encode("Hello, world", add_bos=True)
        assert tok.decode(ids, skip_special=True).lower().replace(" ,", ",") == "hello, world"
        assert tok.bos_id is None or ids[0] == tok.bos_id
        assert "".join(tok.stream(ids)) == tok.decode(ids)
        assert all(isinstance(p, str) for p in map(tok.token_to_piece, ids))


# ---- streaming -----------------------------------------------------------------------------------------------


def test_stream_never_splits_a_character(smol):
    text = "Emoji 😀🦙👍🏽 and 中文汉字 mixed, then ASCII."
    ids = smol.encode(text)
    broken = [i for i in ids if "\ufffd" in smol.decode([i])]
    assert broken, "the text should contain tokens that are partial UTF-8 sequences"
    pieces = list(smol.stream(ids))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert len(pieces) < len(ids)  # partial characters were held back and joined
    dec = StreamDecoder(smol)
    first_partial = ids.index(broken[0])
    out = [dec.push(i) for i in ids[:first_partial + 1]]
    assert out[-1] == ""  # a partial character is held back
    assert "".join(out) + "".join(dec.push(i) for i in ids[first_partial + 1:]) + dec.flush() == text


def test_stream_spm_spaces_and_bytes():
    tok = vocab("llama-spm")
    text = "Hello world, 🦙 llamas and 日本語"
    ids = tok.encode(text)
    assert "".join(tok.stream(ids)) == tok.decode(ids) == text
    # a truncated stream flushes what it has (the replacement character) instead of losing it
    dec = StreamDecoder(tok)
    partial = tok.encode("🦙")[:-1]
    assert "".join(dec.push(i) for i in partial) == ""
    assert dec.flush().endswith("\ufffd")


def test_reference_files_are_present():
    assert (LLAMA_CPP / "LICENSE").is_file() and (LLAMA_CPP / "ATTRIBUTION.md").is_file()
