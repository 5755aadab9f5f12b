"""camelid.formats: `detect` tells every kind of path apart (files and folders made in the test), and
`open_gguf` reads GGUF files from strangers safely: gguf-py's own values on good files, and on damaged ones
(truncated, bytes flipped, lengths made huge) either a correct load or a one-line CamelidError, quickly."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import gguf
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import camelid
from camelid import CamelidError, Llama, LlamaConfig
from camelid.formats import Format, detect, gguf_value, open_gguf
from camelid.interop.gguf import save_gguf
from camelid.interop.hf import config_to_hf, save_hf_dir
from camelid.tokenizer import Tokenizer

LLAMA_CPP = Path(__file__).parent / "tokenizer" / "data" / "llama.cpp"


@pytest.fixture(scope="module")
def tiny_tokenizer() -> Tokenizer:
    """A small byte-level BPE vocabulary (GPT-2's first 320 tokens), so a tiny model's GGUF carries one."""
    from tokenizers import Tokenizer as HFTokenizer

    full = json.loads(Tokenizer.from_gguf(LLAMA_CPP / "ggml-vocab-gpt-2.gguf").hf_tokenizer().to_str())
    model = full["model"]
    vocab = {t: i for t, i in model["vocab"].items() if i < 320}
    merges = [m for m in model["merges"] if all(p in vocab for p in (m.split(" ") if isinstance(m, str) else m))
              and "".join(m.split(" ") if isinstance(m, str) else m) in vocab]
    full["model"] = {**model, "vocab": vocab, "merges": merges}
    full["added_tokens"] = []
    hf = HFTokenizer.from_str(json.dumps(full))
    return Tokenizer(hf, kind="bpe", pre="gpt-2", bos_id=0, eos_id=1)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_tokenizer) -> Path:
    model = Llama(LlamaConfig.from_name("tiny-gqa")).eval()
    return save_gguf(model, tmp_path_factory.mktemp("gguf") / "tiny.gguf", tokenizer=tiny_tokenizer, qtype="q8_0",
                     progress=False)


# ---- detect ------------------------------------------------------------------------------------------------------


def test_detect_tells_every_kind_apart(tmp_path, tiny_gguf, minilm_dir):
    model = Llama(LlamaConfig.from_name("tiny-gqa"))
    hf = save_hf_dir(model, tmp_path / "hf")
    assert detect(hf) is Format.HF
    assert detect(minilm_dir) is Format.BERT
    assert detect(tiny_gguf) is Format.GGUF
    from camelid.interop.meta import save_meta_dir

    assert detect(save_meta_dir(model, tmp_path / "meta")) is Format.META
    from camelid.variants.quantized import quantize_model, save_quantized

    save_quantized(quantize_model(Llama(LlamaConfig.from_name("tiny-gqa")), "int8"), tmp_path / "q.safetensors")
    assert detect(tmp_path / "q.safetensors") is Format.QUANTIZED
    step = tmp_path / "out" / "checkpoints" / "step-000010"
    step.mkdir(parents=True)
    for name in ("model.safetensors", "state.pt", "meta.json"):
        (step / name).write_bytes(b"")
    (step.parent / "latest").write_text("step-000010\n")
    assert detect(step) is Format.CHECKPOINT and detect(tmp_path / "out") is Format.CHECKPOINT
    # tokenizer files and folders
    Tokenizer.from_gguf(LLAMA_CPP / "ggml-vocab-llama-spm.gguf").save_pretrained(tmp_path / "tok")
    assert detect(tmp_path / "tok") is Format.TOKENIZER_DIR
    assert detect(tmp_path / "tok" / "tokenizer.json") is Format.TOKENIZER_JSON
    assert detect(minilm_dir / "vocab.txt") is Format.WORDPIECE_VOCAB
    assert detect(camelid.hub.pull("llama3-tokenizer", quiet=True)) is Format.TIKTOKEN
    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 50)
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=40,
                                   model_type="bpe", minloglevel=2)
    (tmp_path / "sp.model").rename(tmp_path / "spm.bin")  # recognised by its content, not its name
    assert detect(tmp_path / "spm.bin") is Format.SENTENCEPIECE
    assert {f for f in Format if f.is_llama} == {Format.HF, Format.META, Format.GGUF, Format.QUANTIZED}


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: None, "no such file or directory"),
    (lambda p: p.mkdir(), "a folder camelid cannot read; expected a Hugging Face model folder"),
    (lambda p: p.with_suffix(".gguf").write_bytes(b"GGML" + bytes(20)), "not a GGUF file"),
    (lambda p: p.with_suffix(".png").write_bytes(b"\x89PNG" + bytes(20)), "not a file camelid reads"),
    (lambda p: p.with_suffix(".safetensors").write_bytes(b"\x00" * 40), "not a readable safetensors file"),
    (lambda p: (p.mkdir(), (p / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHead"]}')),
     "architecture 'GPT2LMHead' is not supported"),
    (lambda p: (p.mkdir(), (p / "config.json").write_text("[]")), "holds a JSON list, not an object"),
])
def test_detect_names_what_was_expected(tmp_path, make, message):
    target = tmp_path / "thing"
    make(target)
    path = next(tmp_path.iterdir(), target)
    with pytest.raises(CamelidError, match=message) as e:
        detect(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_a_plain_safetensors_file_is_not_taken_for_a_quantised_model(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CamelidError, match="without camelid's quantisation metadata; pass the folder"):
        detect(tmp_path / "model.safetensors")


def test_camelid_load_refuses_what_is_not_a_llama(tmp_path, minilm_dir):
    with pytest.raises(CamelidError, match="a BERT model"):
        camelid.load(minilm_dir)
    with pytest.raises(CamelidError, match="a tokenizer, not a model"):
        camelid.load(minilm_dir / "vocab.txt")
    (tmp_path / "step").mkdir()
    for name in ("model.safetensors", "state.pt", "meta.json"):
        (tmp_path / "step" / name).write_bytes(b"")
    with pytest.raises(CamelidError, match="a training checkpoint; `camelid pretrain` writes the finished model"):
        camelid.load(tmp_path / "step")


# ---- open_gguf: the one GGUF reader --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["phi-3", "gpt-2"])
def test_open_gguf_reads_what_gguf_py_reads(name):
    path = LLAMA_CPP / f"ggml-vocab-{name}.gguf"
    ours, stock = open_gguf(path), gguf.GGUFReader(str(path))
    assert list(ours.fields) == list(stock.fields)
    for key, field in stock.fields.items():
        assert gguf_value(ours, key) == (v.item() if hasattr(v := field.contents(), "item") else v), key


def test_open_gguf_reads_tensors_like_gguf_py(tiny_gguf):
    ours, stock = open_gguf(tiny_gguf), gguf.GGUFReader(str(tiny_gguf))
    assert [t.name for t in ours.tensors] == [t.name for t in stock.tensors]
    for a, b in zip(ours.tensors, stock.tensors, strict=True):
        assert a.tensor_type == b.tensor_type and list(a.shape) == list(b.shape) and (a.data == b.data).all()


def _arrays_file(path: Path, n_strings: int = 5) -> Path:
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_array("t.strings", ["", "héllo", "<|im_end|>", "Ġworld", *(f"piece{i}" for i in range(n_strings - 4))])
    writer.add_array("t.ints", [3, -1, 7])
    writer.add_array("t.floats", [0.5, -2.25])
    writer.add_array("t.bools", [True, False, True])
    writer.add_array("t.nested", [[1, 2], [3]])
    writer.add_array("t.empty", [])
    writer.add_string("t.text", "plain")
    writer.add_uint32("t.count", 7)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path


def test_open_gguf_reads_arrays_as_gguf_py_does(tmp_path):
    """Arrays of strings and scalars are kept whole (not one numpy view per element); the values are the same,
    whole or by index, and strings that are not UTF-8 still fail as gguf-py's do."""
    path = _arrays_file(tmp_path / "a.gguf")
    ours, stock = open_gguf(path), gguf.GGUFReader(str(path))
    assert list(ours.fields) == list(stock.fields)
    for key, field in stock.fields.items():
        assert gguf_value(ours, key) == (v.item() if hasattr(v := field.contents(), "item") else v), key
        assert ours.fields[key].types == field.types, key
    assert ours.fields["t.strings"].contents(1) == "héllo" and ours.fields["t.ints"].contents(2) == 7
    data = bytearray(path.read_bytes())
    at = data.index("héllo".encode())
    data[at + 1] = 0xFF  # no longer UTF-8
    path.write_bytes(bytes(data))
    with pytest.raises(CamelidError, match="not UTF-8"):
        gguf_value(open_gguf(path), "t.strings")
    assert open_gguf(path).fields["t.strings"].strings(errors="replace")[1] == "h\ufffd\ufffdllo"


def test_open_gguf_keeps_a_vocabulary_small(tmp_path):
    """100k strings (a vocabulary) take a few MiB to index; gguf-py's reader makes ~100 bytes of numpy views per
    string (and leaves the heap fragmented when they are freed)."""
    import tracemalloc

    path = _arrays_file(tmp_path / "v.gguf", n_strings=100_000)
    tracemalloc.start()
    try:
        reader = open_gguf(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(gguf_value(reader, "t.strings")) == 100_000
    assert peak < 4 * 2**20, peak


def test_a_truncated_string_array_is_an_error(tmp_path):
    path = _arrays_file(tmp_path / "t.gguf", n_strings=50)
    data = path.read_bytes()
    path.write_bytes(data[:data.index(b"piece30")])
    with pytest.raises(CamelidError, match="corrupt or truncated GGUF file"):
        open_gguf(path)


def test_a_huge_array_length_is_an_error_not_a_long_loop(tmp_path):
    """gguf-py alone loops once per claimed element (for 2**63 elements: forever); camelid stops at the file's end."""
    writer = gguf.GGUFWriter(str(tmp_path / "v.gguf"), arch="llama")
    writer.add_array("tokenizer.ggml.token_type", [1, 2, 3])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    data = bytearray((tmp_path / "v.gguf").read_bytes())
    at = data.index(b"tokenizer.ggml.token_type") + len("tokenizer.ggml.token_type") + 4 + 4  # type, item type
    data[at:at + 8] = (2**63).to_bytes(8, "little")
    (tmp_path / "v.gguf").write_bytes(bytes(data))
    start = time.perf_counter()
    with pytest.raises(CamelidError, match="corrupt or truncated GGUF file"):
        open_gguf(tmp_path / "v.gguf")
    assert time.perf_counter() - start < 10


def _mutations():
    kind = st.sampled_from(["truncate", "flip", "huge"])
    return st.tuples(kind, st.integers(0, 2**32), st.integers(1, 8))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_mutations())
def test_damaged_gguf_loads_or_fails_in_one_line(tmp_path_factory, tiny_gguf, mutation):
    """Mutations of a real small file (a model with a vocabulary): camelid.load either loads it (a flipped byte in
    the tensor data is a different model, not an error) or raises one CamelidError line, within seconds."""
    kind, seed, n = mutation
    data = bytearray(tiny_gguf.read_bytes())
    rng = random.Random(seed)
    header = 2048 + rng.randrange(4096)  # most mutations where the lengths and counts are
    if kind == "truncate":
        data = data[: rng.randrange(len(data))]
    elif kind == "flip":
        for _ in range(n):
            data[rng.randrange(min(header, len(data)))] ^= 1 << rng.randrange(8)
    else:  # a length or count made huge
        at = rng.randrange(min(header, len(data) - 8))
        data[at:at + 8] = rng.choice([2**63, 2**32 - 1, 2**40, 10**12]).to_bytes(8, "little")
    path = tmp_path_factory.mktemp("fuzz") / "damaged.gguf"
    path.write_bytes(bytes(data))
    start = time.perf_counter()
    try:
        llm = camelid.load(path)
    except CamelidError as e:
        assert "\n" not in str(e)
    else:
        assert isinstance(llm.model, Llama)
        if llm.tokenizer is not None:
            llm.tokenizer.decode(llm.tokenizer.encode("hello world"))
    assert time.perf_counter() - start < 20


def test_an_undamaged_file_loads(tiny_gguf, tiny_tokenizer):
    llm = camelid.load(tiny_gguf)
    assert llm.tokenizer is not None and llm.tokenizer.encode("abc") == tiny_tokenizer.encode("abc")


def test_config_json_in_a_file_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(LlamaConfig.from_name("tiny-gqa"))))
    with pytest.raises(CamelidError, match="a model's config.json; pass the folder that holds it"):
        detect(tmp_path / "config.json")


def test_loading_a_gguf_imports_only_the_reader_part_of_gguf(tiny_gguf):
    """camelid.load of a GGUF file needs gguf-py's reader, constants and quants; the package's writer, vocabulary
    tools, sentencepiece and yaml are imported only when a name of theirs is asked for."""
    import subprocess
    import sys

    code = ("import sys, camelid; camelid.load(sys.argv[1], quantize='int8'); "
            "print(sorted(m for m in ('yaml', 'sentencepiece', 'gguf.gguf_writer', 'gguf.vocab') "
            "if m in sys.modules)); "
            "import gguf; from gguf import GGUFWriter; from gguf.vocab import SpecialVocab; "
            "print(GGUFWriter is gguf.gguf_writer.GGUFWriter, 'yaml' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tiny_gguf)], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["[]", "True True"], out.stdout + out.stderr
