"""camelid.tokenizer.gguf: GGUF vocabularies against references we did not write: llama.cpp's tokenisation
vectors, llama.cpp itself (llama-cpp-python) and transformers' GGUF loader."""

from __future__ import annotations

import copy
from pathlib import Path

import gguf
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizer_helpers import (
    MIXED,
    VOCABS,
    llama_cpp_encode,
    open_llama_cpp,
    reference_cases,
    vocab,
    write_vocab_gguf,
)

from camelid.errors import CamelidError
from camelid.formats import gguf_value, open_gguf
from camelid.tokenizer import PRE_TOKENIZER_REGEXES, Tokenizer, bytes_to_unicode

# ---- llama.cpp's reference tokenisations ---------------------------------------------------------------------


@pytest.mark.parametrize("name", VOCABS)
def test_llama_cpp_reference_tokenisations(name):
    tok, cases = vocab(name), reference_cases(name)
    assert len(cases) == 46
    wrong = [(x, tok.encode(x), ids) for x, ids in cases if tok.encode(x) != ids]
    assert not wrong, f"{len(wrong)} of {len(cases)} differ, first: {wrong[0]}"


@pytest.mark.parametrize("name", VOCABS)
def test_llama_cpp_inputs_decode_back(name):
    tok = vocab(name)
    for x, ids in reference_cases(name):
        assert tok.decode(ids) == x


def test_gguf_vocab_metadata():
    spm, l3 = vocab("llama-spm"), vocab("llama-bpe")
    assert (spm.kind, spm.bos_id, spm.eos_id, spm.unk_id, spm.add_bos, spm.vocab_size) == ("spm", 1, 2, 0, True, 32000)
    assert spm.token_to_piece(13) == "<0x0A>" and spm.id_of("▁Hello") == 15043
    assert spm.encode("Hello", add_bos=True) == [1, 15043]
    assert (l3.kind, l3.pre, l3.bos_id, l3.add_bos) == ("bpe", "llama-bpe", 128000, True)
    assert {l3.id_of("<|eot_id|>"), l3.id_of("<|end_of_text|>")} <= l3.stop_ids
    assert vocab("phi-3").id_of("<|end|>") in vocab("phi-3").stop_ids
    # specials in the text are parsed as specials
    assert l3.encode("<|begin_of_text|>hi") == [128000, 6151]
    assert spm.decode([1, 15043, 2], skip_special=True) == "Hello"


@pytest.mark.parametrize("name", ["phi-3", "gpt-2"])
def test_vocabulary_arrays_are_gguf_pys(name):
    """What camelid reads is what gguf-py's own reader (unmodified) reads."""
    path = Path(__file__).parent / "data" / "llama.cpp" / f"ggml-vocab-{name}.gguf"
    reference = gguf.GGUFReader(str(path)).fields
    tok = vocab(name)
    assert tok._pieces == reference["tokenizer.ggml.tokens"].contents()
    assert tok._types == reference["tokenizer.ggml.token_type"].contents()
    assert tok.bos_id == reference["tokenizer.ggml.bos_token_id"].contents()


# ---- SmolLM2 from its GGUF against transformers and llama.cpp ------------------------------------------------


def test_smollm2_metadata(smol):
    assert (smol.kind, smol.pre, smol.vocab_size, smol.add_bos) == ("bpe", "smollm", 49152, False)
    assert smol.id_of("<|im_end|>") == 2 and 2 in smol.stop_ids and smol.id_of("<|endoftext|>") in smol.stop_ids
    assert smol.special_tokens["<|im_start|>"] == 1
    assert smol.chat_template and "<|im_start|>" in smol.chat_template


@pytest.mark.parametrize("text", MIXED)
def test_smollm2_matches_transformers(smol, hf_smol, text):
    ids = smol.encode(text)
    assert ids == hf_smol.encode(text, add_special_tokens=False)
    assert smol.decode(ids) == text
    assert smol.decode(ids, skip_special=True) == hf_smol.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("text", MIXED)
def test_smollm2_matches_llama_cpp(smol, smol_llama_cpp, text):
    ids = smol.encode(text)
    assert ids == llama_cpp_encode(smol_llama_cpp, text)
    assert smol.decode(ids).encode() == smol_llama_cpp.detokenize(ids, special=True)


def test_smollm2_digits_after_whitespace(smol, hf_smol, hf_smol_digits, smol_llama_cpp):
    """The one place transformers' GGUF loading differs (see hf_smol_digits): whitespace before a digit.
    llama.cpp and the model's own pre-tokenizer agree with camelid."""
    text = "x  0\n\n3"
    assert [smol.token_to_piece(i) for i in smol.encode(text)] == ["x", "ĠĠ", "0", "ĊĊ", "3"]
    assert smol.encode(text) == hf_smol_digits.encode(text, add_special_tokens=False)
    assert smol.encode(text) == llama_cpp_encode(smol_llama_cpp, text)
    assert hf_smol.convert_ids_to_tokens(hf_smol.encode(text, add_special_tokens=False)) == \
        ["x", "Ġ", "Ġ", "0", "Ċ", "Ċ", "3"]


_chunks = st.one_of(st.characters(codec="utf-8"), st.sampled_from(
    [" ", "  ", "\n", "\t", "0", "7", "😀", "🦙", "中", "文", "'s", "<|im_start|>", "<|im_end|>", "é", "\u200d"]))
_random_text = st.lists(_chunks, max_size=40).map("".join)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_random_text)
def test_smollm2_matches_transformers_on_random_text(smol, hf_smol_digits, smol_llama_cpp, text):
    ids = smol.encode(text)
    assert ids == hf_smol_digits.encode(text, add_special_tokens=False)
    # SmolLM2's vocabulary has no token for a few bytes (0x04, 0x06, 0x13, 0x14, 0x16, 0x1d, 0xf1, 0xf2, ...:
    # some control characters and code points >= U+40000). Such bytes are dropped; `tokenizers` (camelid and
    # transformers alike) then merges the text around the gap ('/\x16<' -> one token '/<'), llama.cpp does not
    # ('/', '<'). Text made of the other bytes tokenises exactly as llama.cpp does and comes back exactly.
    if all(bytes_to_unicode()[b] in smol._ids for b in text.encode()):
        assert ids == llama_cpp_encode(smol_llama_cpp, text)
        assert smol.decode(ids) == text


def test_unrepresentable_bytes_are_dropped_like_transformers(smol, hf_smol_digits, smol_llama_cpp) -> None:
    text = "/\x16<"
    assert smol.encode(text) == hf_smol_digits.encode(text, add_special_tokens=False) == [smol.id_of("/<")]
    assert llama_cpp_encode(smol_llama_cpp, text) == [smol.id_of("/"), smol.id_of("<")]


# ---- writing: write_gguf -> from_gguf, and llama.cpp reading what camelid wrote -------------------------------


def _source(name: str, smol: Tokenizer, request) -> Tokenizer:
    return {"smollm2": lambda: smol, "llama-spm": lambda: vocab("llama-spm"), "phi-3": lambda: vocab("phi-3"),
            "llama3-tiktoken": lambda: request.getfixturevalue("llama3"),
            "llama2-json": lambda: request.getfixturevalue("llama2_json")}[name]()


@pytest.mark.parametrize("source", ["smollm2", "llama-spm", "phi-3", "llama3-tiktoken", "llama2-json"])
def test_write_gguf_round_trip(tmp_path, source, smol, request):
    """llama2-json has no scores (a tokenizer.json): write_gguf derives them, and llama.cpp's score-ordered
    merging must still give the reference ids."""
    tok = _source(source, smol, request)
    path = write_vocab_gguf(tok, tmp_path / "vocab.gguf")
    back = Tokenizer.from_gguf(path)
    assert back._pieces == tok._pieces and back._types == tok._types
    assert (back.kind, back.pre, back.bos_id, back.eos_id, back.add_bos, back.chat_template) == \
        (tok.kind, tok.pre, tok.bos_id, tok.eos_id, tok.add_bos, tok.chat_template)
    assert back.special_tokens == tok.special_tokens and back.stop_ids == tok.stop_ids
    reference = {"llama-spm": "llama-spm", "phi-3": "phi-3", "llama3-tiktoken": "llama-bpe",
                 "llama2-json": "llama-spm"}.get(source)
    cases = reference_cases(reference) if reference else [(t, tok.encode(t)) for t in MIXED]
    for text, ids in cases:
        assert back.encode(text) == ids, text
    # the keys llama.cpp looks for
    fields = open_gguf(path).fields
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token"):
        assert key in fields, key
    assert ("tokenizer.ggml.merges" in fields) == (tok.kind == "bpe")
    assert ("tokenizer.ggml.scores" in fields) == (tok.kind == "spm")


@pytest.mark.parametrize("source", ["smollm2", "llama-spm", "llama3-tiktoken", "llama2-json"])
def test_written_gguf_tokenises_the_same_in_llama_cpp(tmp_path, source, smol, request):
    """llama.cpp loads the vocabulary write_gguf wrote and tokenises exactly as camelid does."""
    tok = _source(source, smol, request)
    llm = open_llama_cpp(write_vocab_gguf(tok, tmp_path / "vocab.gguf"))
    try:
        for text in MIXED + [x for x, _ in reference_cases("llama-bpe")]:
            assert llama_cpp_encode(llm, text) == tok.encode(text), text
        assert llm.token_bos() == tok.bos_id and llm.token_eos() == tok.eos_id
    finally:
        llm.close()


@pytest.mark.parametrize("pre", sorted(PRE_TOKENIZER_REGEXES))
def test_every_pre_tokenizer_matches_llama_cpp(tmp_path, pre):
    """GPT-2's vocabulary written with each `tokenizer.ggml.pre` we know: llama.cpp splits the text the same way."""
    tok = copy.copy(vocab("gpt-2"))
    tok.pre = pre
    path = write_vocab_gguf(tok, tmp_path / f"gpt2-{pre}.gguf")
    ours = Tokenizer.from_gguf(path)
    assert ours.pre == pre
    llm = open_llama_cpp(path)
    try:
        for text in MIXED + [x for x, _ in reference_cases("gpt-2")]:
            assert ours.encode(text) == llama_cpp_encode(llm, text), text
    finally:
        llm.close()


# ---- damaged and unsupported vocabularies: one line each ------------------------------------------------------


def _gguf_with(path: Path, **kv) -> Path:
    writer = gguf.GGUFWriter(str(path), arch="llama")
    for key, value in kv.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_array(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(("kv", "match"), [
    ({}, "no embedded vocabulary"),
    ({"tokenizer.ggml.model": "rwkv", "tokenizer.ggml.tokens": ["a", "b"]}, "kind 'rwkv'"),
    ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "mystery", "tokenizer.ggml.tokens": ["a", "b"]},
     "pre-tokenizer 'mystery'"),
    ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.token_type": [1]},
     "token_type has 1 entries for 2 tokens"),
    ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.eos_token_id": 7},
     "eos_token_id 7 is outside the vocabulary of 2 tokens"),
    ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": [1, 2]}, "not an array of strings"),
    ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.merges": ["ab"]},
     "not two pieces"),
])
def test_bad_vocabularies_are_one_line_errors(tmp_path, kv, match):
    path = _gguf_with(tmp_path / "v.gguf", **kv)
    with pytest.raises(CamelidError, match=match) as e:
        Tokenizer.from_gguf(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_a_vocabulary_only_gguf_reads_back_its_keys(tmp_path):
    path = _gguf_with(tmp_path / "v.gguf", **{"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
                                              "tokenizer.ggml.tokens": ["a", "b", "ab"],
                                              "tokenizer.ggml.merges": ["a b"]})
    tok = Tokenizer.from_gguf(path)
    assert tok.encode("ab") == [2] and tok.encode("ba") == [1, 0]
    assert gguf_value(open_gguf(path), "tokenizer.ggml.pre") == "gpt-2"
