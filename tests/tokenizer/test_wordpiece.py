"""WordPiece against references we did not write: transformers' pure-Python BertTokenizer and llama.cpp's vectors."""

from __future__ import annotations

from pathlib import Path

import pytest
import transformers

from camelid import CamelidError
from camelid.tokenizer.wordpiece import WordPiece

DATA = Path(__file__).parent / "data" / "llama.cpp"
TEXTS = [
    "Hello world",
    "  Héllo, WORLD!!!  naïve café — déjà vu",
    "unaffable antidisestablishmentarianism supercalifragilisticexpialidocious",
    "中文字符 and 日本語 mixed with English",
    "tabs\tand\nnewlines\r\n and \x00control chars",
    "e-mail: someone@example.com, price $3.14 (approx.)",
    "🦙 llamas 🐪 camels",
    "Paris is the [MASK] of France.",
    "",
]


@pytest.fixture(scope="module")
def wp(minilm_dir) -> WordPiece:
    return WordPiece.from_vocab(Path(minilm_dir) / "vocab.txt")


@pytest.fixture(scope="module")
def slow_ref(minilm_dir):
    # the slow tokenizer is transformers' own Python implementation, independent of the `tokenizers` library
    return transformers.BertTokenizer(str(Path(minilm_dir) / "vocab.txt"), do_lower_case=True)


def test_single_texts_match_transformers_python_tokenizer(wp, slow_ref):
    for text in TEXTS:
        assert wp.encode(text, add_bos=True) == slow_ref(text)["input_ids"], text
        assert wp.tokenize(text) == slow_ref.tokenize(text), text


def test_pairs_and_batches_match_transformers(wp, slow_ref, minilm_dir):
    a, b = TEXTS[:4], TEXTS[4:8]
    ref = slow_ref(a, b, padding=True, return_tensors="pt")
    ours = wp(a, b)
    for k in ("input_ids", "token_type_ids", "attention_mask"):
        assert ours[k].tolist() == ref[k].tolist(), k
    # truncation to a budget: longest sequence first, as HF does
    ref = slow_ref(a, b, padding=True, truncation="longest_first", max_length=12, return_tensors="pt")
    ours = wp(a, b, max_len=12)
    assert ours["input_ids"].tolist() == ref["input_ids"].tolist()
    # tokenizer.json (the fast tokenizer's file) gives the same as vocab.txt
    assert WordPiece.from_dir(minilm_dir)(a, b)["input_ids"].tolist() == wp(a, b)["input_ids"].tolist()


def test_llama_cpp_reference_vectors(wp):
    """llama.cpp's bert-bge vectors (uncased BERT vocabulary): ids without [CLS]/[SEP]."""
    inputs = (DATA / "ggml-vocab-bert-bge.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    expected = (DATA / "ggml-vocab-bert-bge.gguf.out").read_text(encoding="utf-8").split("\n")
    inputs[-1] = inputs[-1].removesuffix("\n__ggml_vocab_test__\n").removesuffix("\n")
    assert len(inputs) >= 30
    for text, line in zip(inputs, expected, strict=False):
        assert wp.encode(text) == [int(x) for x in line.split()], repr(text)


def test_decode_special_ids_and_save(wp, tmp_path):
    ids = wp.encode("The quick brown fox.", add_bos=True)
    assert ids[0] == wp.cls_id and ids[-1] == wp.sep_id
    assert wp.decode(ids, skip_special=True) == "the quick brown fox."
    assert [wp.pad_id, wp.unk_id, wp.cls_id, wp.sep_id, wp.mask_id] == [0, 100, 101, 102, 103]
    wp.save(tmp_path)
    again = WordPiece.from_vocab(tmp_path / "vocab.txt")
    assert again.encode(TEXTS[2]) == wp.encode(TEXTS[2])
    pair = wp.encode(TEXTS[1], True, pair=TEXTS[2])
    assert pair == wp.encode_with_types(TEXTS[1], TEXTS[2])[0] and pair.count(wp.sep_id) == 2
    assert WordPiece.from_file(tmp_path / "tokenizer.json").encode(TEXTS[1], True, pair=TEXTS[2]) == pair
    assert WordPiece.from_dir(tmp_path).max_len == wp.max_len


def test_train_new_vocabulary(tmp_path):
    corpus = ["It is a truth universally acknowledged, that a single man in possession of a good fortune, "
              "must be in want of a wife."] * 20 + ["Emma Woodhouse, handsome, clever, and rich."] * 20
    wp = WordPiece.train(corpus, vocab_size=200, min_frequency=1)
    assert wp.special_ids == [0, 1, 2, 3, 4]
    assert wp.vocab_size <= 200
    text = "a single man, handsome and clever"
    assert wp.decode(wp.encode(text, add_bos=True), skip_special=True) == text
    # a transformers tokenizer reading our saved vocab.txt agrees
    wp.save(tmp_path)
    ref = transformers.BertTokenizer(str(tmp_path / "vocab.txt"), do_lower_case=True)
    assert wp.encode("Emma, a clever wife", add_bos=True) == ref("Emma, a clever wife")["input_ids"]


def test_errors(tmp_path):
    with pytest.raises(CamelidError, match="no such vocabulary"):
        WordPiece.from_vocab(tmp_path / "missing.txt")
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(CamelidError, match="no \\[PAD\\] token"):
        WordPiece.from_vocab(tmp_path / "vocab.txt")
    with pytest.raises(CamelidError, match="not a folder"):
        WordPiece.from_dir(tmp_path / "nowhere")
