"""Shared by the tokenizer tests (imported as `from tokenizer_helpers import ...`): llama.cpp's reference
vocabularies and vectors, llama.cpp itself, and texts that exercise every corner of a pre-tokenizer."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import gguf
import pytest

from camelid.tokenizer import Tokenizer

LLAMA_CPP = Path(__file__).parent / "data" / "llama.cpp"
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
    """One of llama.cpp's vocabulary-only GGUF files, read by camelid."""
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


def open_llama_cpp(path: Path):
    """llama.cpp itself (llama-cpp-python), loading only the vocabulary of a GGUF file."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def llama_cpp_encode(llm, text: str) -> list[int]:
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)  # specials parsed, as camelid does


def write_vocab_gguf(tok: Tokenizer, path: Path) -> Path:
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
