"""Shared by the tokenizer tests (imported as `from tokenizer_helpers import ...`): llama.cpp's reference
vocabularies and vectors, llama.cpp itself, and texts that exercise every corner of a pre-tokenizer."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from functools import cache
from pathlib import Path

import gguf
import pytest

from camelid import hub
from camelid.fileio import atomic_write_text
from camelid.tokenizer import Tokenizer

LLAMA_CPP = Path(__file__).parent / "data" / "llama.cpp"
# every vocabulary with reference vectors in llama.cpp's models/ folder: copied ones, and two fetched ones (large)
COPIED = ["llama-spm", "llama-bpe", "qwen2", "qwen35", "gpt-2", "phi-3", "bert-bge", "deepseek-llm",
          "deepseek-coder", "falcon", "mpt", "refact", "starcoder"]
FETCHED = ["command-r", "gemma-4"]
VOCABS = COPIED + FETCHED
# vocabularies in llama.cpp's models/ folder without reference vectors (compared with llama.cpp itself), fetched;
# nomic-bert-moe is a unigram ("t5") vocabulary
UNCHECKED = ["aquila", "baichuan", "gpt-neox", "nomic-bert-moe"]
LLAMA_CPP_PYTHON = "0.3.36"  # the llama-cpp-python whose vendored llama.cpp the vectors and the tests speak for

MIXED = [
    "Hello world", " Hello  world ", "def f(x):\n    return x ** 2  # square\n\n\n", "\t\tindent\r\nCRLF",
    "😀🦙👍🏽 emoji, 🇫🇷 flags", "你好，世界！中文文本", "Ünïcödé façade naïve Æsir", "12345 3.14159 1,000,000 007",
    "   leading and trailing   ", "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more", "x<|im_end|>y", "<|im_start|>", "a\u00a0b\u2009c\u3000d", "",
    "I've 'll 'RE we'Ve", "```python\nprint('hi')\n```", "مرحبا بالعالم", "Привет, мир", "<repo_name>camelid",
]


@cache
def llama_cpp_source() -> Path:
    """llama.cpp as llama-cpp-python's sdist vendors it, fetched with pip the way a user would, once, into
    camelid's cache; only what the tests read is kept (models/ggml-vocab-{command-r,gemma-4}.gguf*, the
    vocabularies without vectors, src/llama-vocab.cpp). Skips the test where the package index cannot be reached."""
    dest = hub.cache_dir() / "test-data" / f"llama.cpp-{LLAMA_CPP_PYTHON}"
    wanted = [f"models/ggml-vocab-{n}.gguf{ext}" for n in FETCHED for ext in ("", ".inp", ".out")]
    wanted += [f"models/ggml-vocab-{n}.gguf" for n in UNCHECKED]
    wanted.append("src/llama-vocab.cpp")
    complete = dest / "complete"
    if complete.is_file() and complete.read_text(encoding="utf-8").split() == wanted:
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", tmp,
               f"llama-cpp-python=={LLAMA_CPP_PYTHON}"]
        if subprocess.run(cmd, capture_output=True).returncode != 0:
            pytest.skip(f"could not download the llama-cpp-python {LLAMA_CPP_PYTHON} sdist with pip")
        (sdist,) = Path(tmp).glob("*.tar.gz")
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar:
            for member in wanted:
                info = tar.getmember(prefix + member)
                data = tar.extractfile(info).read()  # type: ignore[union-attr]
                (dest / member).parent.mkdir(parents=True, exist_ok=True)
                (dest / member).write_bytes(data)
    atomic_write_text(dest / "complete", "\n".join(wanted) + "\n")
    return dest


def vocab_file(name: str) -> Path:
    fetched = name in FETCHED or name in UNCHECKED
    return (llama_cpp_source() / "models" if fetched else LLAMA_CPP) / f"ggml-vocab-{name}.gguf"


@cache
def vocab(name: str) -> Tokenizer:
    """One of llama.cpp's vocabulary-only GGUF files, read by camelid."""
    return Tokenizer.from_gguf(vocab_file(name))


@cache
def reference_cases(name: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's test-tokenizer-0 format: inputs separated by `\\n__ggml_vocab_test__\\n` lines, expected ids
    one line per input. They were produced with `tokenizer.encode(text, add_special_tokens=False)`, and
    test-tokenizer-0 tokenises without adding BOS."""
    path = vocab_file(name)
    inputs = Path(f"{path}.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    if inputs[-1] == "":  # most files end with a separator; gemma-4's does not
        inputs.pop()
    outputs = Path(f"{path}.out").read_text(encoding="utf-8").split("\n")
    assert outputs[-1] == ""
    assert len(inputs) == len(outputs) - 1
    return [(x, [int(v) for v in y.split()]) for x, y in zip(inputs, outputs[:-1], strict=True)]


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
