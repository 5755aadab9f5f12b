"""camelid.tokenizer.sentencepiece: .model files against the sentencepiece library itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from camelid.errors import CamelidError
from camelid.tokenizer import Tokenizer
from camelid.tokenizer.sentencepiece import trainer_spec


def _train_sentencepiece(tmp_path: Path, **options) -> Path:
    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"
    lines = ["The quick brown fox jumps over the lazy dog.", "Pack my box with five dozen liquor jugs!",
             "How vexingly quick daft zebras jump; 12 34 567.", "camelid tokenizers read sentencepiece models",
             "  two spaces   three spaces\ttab", "Llamas and alpacas are camelids from South America."]
    corpus.write_text("\n".join(lines * 20), encoding="utf-8")
    prefix = tmp_path / "tiny"
    options = {"normalization_rule_name": "identity", "remove_extra_whitespaces": False, **options}
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), character_coverage=1.0, byte_fallback=True,
        user_defined_symbols=["<tool>"], minloglevel=2, **options)
    return prefix.with_suffix(".model")


@pytest.mark.parametrize("whitespace_pieces", [False, True])
def test_sentencepiece_model_matches_sentencepiece(tmp_path, whitespace_pieces):
    import sentencepiece as spm

    path = _train_sentencepiece(tmp_path, model_type="bpe", vocab_size=400,
                                allow_whitespace_only_pieces=whitespace_pieces)
    sp = spm.SentencePieceProcessor(model_file=str(path))
    tok = Tokenizer.from_file(path)
    assert tok.kind == "spm" and tok.vocab_size == sp.vocab_size() and tok.add_bos
    assert (tok.bos_id, tok.eos_id, tok.unk_id) == (sp.bos_id(), sp.eos_id(), sp.unk_id())
    assert "<tool>" in tok.special_tokens
    # no text right after "<tool>": there camelid puts the dummy space as llama.cpp does, SentencePiece does not
    texts = ["The quick brown fox", "  two  spaces\tand a tab", "unseen: 🦙 zürich ЖЖ 9", "a<tool>", "Pack my box",
             " leading", "trailing ", "x\ny", "   "]
    for text in texts:
        assert tok.encode(text) == sp.encode(text), text
        assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text))


def test_sentencepiece_nfkc_is_refused(tmp_path):
    path = _train_sentencepiece(tmp_path, model_type="bpe", vocab_size=400, normalization_rule_name="nmt_nfkc")
    with pytest.raises(CamelidError, match="'nmt_nfkc' normalizer"):
        Tokenizer.from_file(path)


def test_sentencepiece_unigram_is_refused(tmp_path):
    path = _train_sentencepiece(tmp_path, model_type="unigram", vocab_size=320)
    with pytest.raises(CamelidError, match="unigram"):
        Tokenizer.from_file(path)


def test_damaged_header_is_one_line(tmp_path):
    data = _train_sentencepiece(tmp_path, model_type="bpe", vocab_size=400).read_bytes()
    assert trainer_spec(data)["model_type"] == 2
    for cut in (len(data) // 3, len(data) - 7):
        with pytest.raises(CamelidError, match="damaged SentencePiece model"):
            trainer_spec(data[:cut], "cut.model")
    (tmp_path / "junk.model").write_bytes(b"\x00\xff" * 50)
    with pytest.raises(CamelidError, match="neither a tokenizer.json"):
        Tokenizer.from_file(tmp_path / "junk.model")
