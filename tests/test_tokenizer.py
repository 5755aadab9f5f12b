"""camelid.tokenizer against references we did not write: llama.cpp's tokenisation vectors, transformers,
tiktoken, sentencepiece and gguf-py."""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path

import gguf
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from camelid import hub
from camelid.errors import CamelidError
from camelid.tokenizer import PRE_TOKENIZER_REGEXES, StreamDecoder, Tokenizer, bytes_to_unicode
from camelid.tokenizer.vocab import read_gguf_metadata

LLAMA_CPP = Path(__file__).parent / "data" / "tokenizers" / "llama.cpp"
VOCABS = ["llama-spm", "llama-bpe", "qwen2", "gpt-2", "phi-3"]

MIXED = [
    "Hello world", " Hello  world ", "def f(x):\n    return x ** 2  # square\n\n\n", "\t\tindent\r\nCRLF",
    "😀🦙👍🏽 emoji, 🇫🇷 flags", "你好，世界！中文文本", "Ünïcödé façade naïve Æsir", "12345 3.14159 1,000,000 007",
    "   leading and trailing   ", "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more", "x<|im_end|>y", "<|im_start|>", "a\u00a0b\u2009c\u3000d", "",
    "I've 'll 'RE we'Ve", "```python\nprint('hi')\n```", "مرحبا بالعالم", "Привет, мир", "<repo_name>camelid",
]


@cache
def vocab(name: str) -> Tokenizer:
    return Tokenizer.from_gguf(LLAMA_CPP / f"ggml-vocab-{name}.gguf")


@cache
def reference_cases(name: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's test-tokenizer-0 format: inputs separated by `\\n__ggml_vocab_test__\\n` lines, expected ids
    one line per input. They were produced with `tokenizer.encode(text, add_special_tokens=False)`, and
    test-tokenizer-0 tokenises without adding BOS."""
    inputs = (LLAMA_CPP / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    assert inputs[-1] == ""
    outputs = (LLAMA_CPP / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").split("\n")
    assert outputs[-1] == ""
    assert len(inputs) == len(outputs)
    return [(x, [int(v) for v in y.split()]) for x, y in zip(inputs[:-1], outputs[:-1], strict=True)]


@pytest.fixture(scope="module")
def smol(smollm2_gguf) -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def hf_smol(smollm2_gguf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="module")
def hf_smol_digits(hf_smol):
    """transformers' GGUF converter ignores `tokenizer.ggml.pre` and gives SmolLM2 a plain ByteLevel
    pre-tokenizer; the model's own tokenizer.json (and llama.cpp's "smollm" pre-tokenizer) first splits every
    digit off. This is transformers' tokenizer with that pre-tokenizer put back, nothing else changed."""
    import copy

    from tokenizers import pre_tokenizers

    hf = copy.deepcopy(hf_smol)
    hf.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return hf


def open_llama_cpp(path: Path):
    """llama.cpp itself (llama-cpp-python), loading only the vocabulary of a GGUF file."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def llama_cpp_encode(llm, text: str) -> list[int]:
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)  # specials parsed, as camelid does


@pytest.fixture(scope="module")
def smol_llama_cpp(smollm2_gguf):
    llm = open_llama_cpp(smollm2_gguf)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def llama3() -> Tokenizer:
    return Tokenizer.from_file(hub.pull("llama3-tokenizer", quiet=True))


@pytest.fixture(scope="module")
def llama2_json() -> Tokenizer:
    return Tokenizer.from_file(hub.pull("llama2-tokenizer", quiet=True))


# ---- 1. llama.cpp's reference tokenisations ------------------------------------------------------------------


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
def test_fast_gguf_reader_matches_gguf_py(name):
    """Our header reader (no per-element numpy views) reads the same values as gguf-py's GGUFReader."""
    path = LLAMA_CPP / f"ggml-vocab-{name}.gguf"
    ours = read_gguf_metadata(path)
    reader = gguf.GGUFReader(str(path))
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        assert ours[key] == field.contents(), key


# ---- 2. SmolLM2 from its GGUF against transformers -----------------------------------------------------------


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


# ---- the other file formats: tiktoken (Llama 3), tokenizer.json (Llama 2), sentencepiece ----------------------


def test_llama3_tiktoken_file(llama3):
    assert llama3._tt is not None  # the tiktoken backend
    wrong = [x for x, ids in reference_cases("llama-bpe") if llama3.encode(x) != ids]
    assert not wrong
    assert (llama3.bos_id, llama3.eos_id, llama3.add_bos, llama3.vocab_size) == (128000, 128001, True, 128256)
    assert {llama3.id_of(t) for t in ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")} <= llama3.stop_ids
    assert llama3.id_of("<|start_header_id|>") == 128006 and llama3.id_of("<|eot_id|>") == 128009
    # the same 128000 byte-level pieces as llama.cpp's Llama 3 vocabulary
    assert llama3._pieces[:128000] == vocab("llama-bpe")._pieces[:128000]
    assert llama3.decode(llama3.encode("<|start_header_id|>user<|end_header_id|>\n\nhé 😀")) == \
        "<|start_header_id|>user<|end_header_id|>\n\nhé 😀"


def test_llama3_tiktoken_converted_to_tokenizers(llama3):
    """The merges recovered from tiktoken ranks give a tokenizers BPE that tokenises like tiktoken."""
    hf = llama3.hf_tokenizer()
    for x, ids in reference_cases("llama-bpe"):
        assert hf.encode(x, add_special_tokens=False).ids == ids


def test_llama2_tokenizer_json(llama2_json):
    wrong = [x for x, ids in reference_cases("llama-spm") if llama2_json.encode(x) != ids]
    assert not wrong
    assert (llama2_json.kind, llama2_json.bos_id, llama2_json.eos_id, llama2_json.add_bos) == ("spm", 1, 2, True)


def test_from_dir_reads_tokenizer_config(tmp_path, llama2_json):
    (tmp_path / "tokenizer.json").write_bytes(Path(hub.MODELS["llama2-tokenizer"].path).read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "add_bos_token": False, "chat_template": "X"}))
    tok = Tokenizer.from_dir(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.chat_template) == (1, 2, False, "X")


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


# ---- 4. writing: save_pretrained -> transformers, write_gguf -> from_gguf ------------------------------------


@pytest.mark.parametrize("source", ["smollm2", "llama-spm", "llama3-tiktoken"])
def test_save_pretrained_loads_in_transformers(tmp_path, source, smol, request):
    from transformers import AutoTokenizer

    tok = {"smollm2": lambda: smol, "llama-spm": lambda: vocab("llama-spm"),
           "llama3-tiktoken": lambda: request.getfixturevalue("llama3")}[source]()
    tok.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"tokenizer.json", "tokenizer_config.json",
                                                     "special_tokens_map.json"}
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf.bos_token == tok.bos_token and hf.eos_token == tok.eos_token
    assert hf.chat_template == tok.chat_template
    for text in MIXED + [x for x, _ in reference_cases("llama-bpe")[:20]]:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text), text
        assert hf.encode(text) == tok.encode(text, add_bos=tok.add_bos), text
    # and camelid reads its own output back
    again = Tokenizer.from_dir(tmp_path)
    assert (again.bos_id, again.eos_id, again.add_bos, again.chat_template) == \
        (tok.bos_id, tok.eos_id, tok.add_bos, tok.chat_template)
    assert all(again.encode(t) == tok.encode(t) for t in MIXED)


def _write_vocab_gguf(tok: Tokenizer, path: Path) -> Path:
    """A vocabulary-only GGUF, with the few hyper-parameters llama.cpp reads before it reads the vocabulary."""
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_name("camelid-vocab")
    writer.add_block_count(1)
    writer.add_context_length(2048)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(1)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(64)
    tok.write_gguf(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("source", ["smollm2", "llama-spm", "phi-3", "llama3-tiktoken", "llama2-json"])
def test_write_gguf_round_trip(tmp_path, source, smol, request):
    """llama2-json has no scores (a tokenizer.json): write_gguf derives them, and llama.cpp's score-ordered
    merging must still give the reference ids."""
    tok = {"smollm2": lambda: smol, "llama-spm": lambda: vocab("llama-spm"), "phi-3": lambda: vocab("phi-3"),
           "llama3-tiktoken": lambda: request.getfixturevalue("llama3"),
           "llama2-json": lambda: request.getfixturevalue("llama2_json")}[source]()
    back = Tokenizer.from_gguf(_write_vocab_gguf(tok, tmp_path / "vocab.gguf"))
    assert back._pieces == tok._pieces and back._types == tok._types
    assert (back.kind, back.pre, back.bos_id, back.eos_id, back.add_bos, back.chat_template) == \
        (tok.kind, tok.pre, tok.bos_id, tok.eos_id, tok.add_bos, tok.chat_template)
    assert back.special_tokens == tok.special_tokens and back.stop_ids == tok.stop_ids
    reference = {"llama-spm": "llama-spm", "phi-3": "phi-3", "llama3-tiktoken": "llama-bpe",
                 "llama2-json": "llama-spm"}.get(source)
    cases = reference_cases(reference) if reference else [(t, tok.encode(t)) for t in MIXED]
    for text, ids in cases:
        assert back.encode(text) == ids, text
    # the keys llama.cpp looks for (gguf-py's reader is slow on big vocabularies: ours there)
    path = tmp_path / "vocab.gguf"
    fields = gguf.GGUFReader(str(path)).fields if tok.vocab_size < 40000 else read_gguf_metadata(path)
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token"):
        assert key in fields, key
    assert ("tokenizer.ggml.merges" in fields) == (tok.kind == "bpe")
    assert ("tokenizer.ggml.scores" in fields) == (tok.kind == "spm")


@pytest.mark.parametrize("source", ["smollm2", "llama-spm", "llama3-tiktoken", "llama2-json"])
def test_written_gguf_tokenises_the_same_in_llama_cpp(tmp_path, source, smol, request):
    """llama.cpp loads the vocabulary write_gguf wrote and tokenises exactly as camelid does."""
    tok = {"smollm2": lambda: smol, "llama-spm": lambda: vocab("llama-spm"),
           "llama3-tiktoken": lambda: request.getfixturevalue("llama3"),
           "llama2-json": lambda: request.getfixturevalue("llama2_json")}[source]()
    llm = open_llama_cpp(_write_vocab_gguf(tok, tmp_path / "vocab.gguf"))
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
    path = _write_vocab_gguf(tok, tmp_path / f"gpt2-{pre}.gguf")
    ours = Tokenizer.from_gguf(path)
    assert ours.pre == pre
    llm = open_llama_cpp(path)
    try:
        for text in MIXED + [x for x, _ in reference_cases("gpt-2")]:
            assert ours.encode(text) == llama_cpp_encode(llm, text), text
    finally:
        llm.close()


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


# ---- errors --------------------------------------------------------------------------------------------------


def _gguf_with(path: Path, **kv) -> Path:
    writer = gguf.GGUFWriter(str(path), arch="llama")
    for key, value in kv.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path


def test_errors_are_one_line(tmp_path):
    with pytest.raises(CamelidError, match="no such tokenizer file"):
        Tokenizer.from_file(tmp_path / "missing.json")
    with pytest.raises(CamelidError, match="has neither tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(CamelidError, match="no embedded vocabulary"):
        Tokenizer.from_gguf(_gguf_with(tmp_path / "empty.gguf"))
    with pytest.raises(CamelidError, match="'rwkv'"):
        Tokenizer.from_gguf(_gguf_with(tmp_path / "rwkv.gguf", **{"tokenizer.ggml.model": "rwkv",
                                                                   "tokenizer.ggml.tokens": ["a", "b"]}))
    with pytest.raises(CamelidError, match="'mystery'"):
        Tokenizer.from_gguf(_gguf_with(tmp_path / "pre.gguf", **{
            "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "mystery", "tokenizer.ggml.tokens": ["a", "b"]}))
    (tmp_path / "junk.gguf").write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(CamelidError, match="not a GGUF file"):
        Tokenizer.from_gguf(tmp_path / "junk.gguf")
    (tmp_path / "junk.model").write_bytes(b"\x00\xff" * 50)
    with pytest.raises(CamelidError, match="neither a tokenizer.json"):
        Tokenizer.from_file(tmp_path / "junk.model")
    tok = vocab("llama-spm")
    with pytest.raises(CamelidError, match="outside the vocabulary"):
        tok.decode([1, 40000])
    with pytest.raises(CamelidError, match="not a token"):
        tok.id_of("<|nope|>")
    with pytest.raises(CamelidError, match="expects a str"):
        tok.encode(b"bytes")  # type: ignore[arg-type]
