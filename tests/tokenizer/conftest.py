"""Tokenizers the tokenizer tests share, each loaded once per session."""

from __future__ import annotations

import pytest
from tokenizer_helpers import open_llama_cpp

from camelid import hub
from camelid.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def smol(smollm2_gguf) -> Tokenizer:
    """SmolLM2's vocabulary, read from the default model's GGUF file."""
    return Tokenizer.from_gguf(smollm2_gguf)


@pytest.fixture(scope="session")
def hf_smol(smollm2_gguf):
    """transformers' tokenizer for the same GGUF file."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="session")
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


@pytest.fixture(scope="session")
def smol_llama_cpp(smollm2_gguf):
    llm = open_llama_cpp(smollm2_gguf)
    yield llm
    llm.close()


@pytest.fixture(scope="session")
def llama3() -> Tokenizer:
    """Meta's Llama 3 tokenizer.model (a tiktoken rank file)."""
    return Tokenizer.from_file(hub.pull("llama3-tokenizer", quiet=True))


@pytest.fixture(scope="session")
def llama2_json() -> Tokenizer:
    """A Llama 2 tokenizer.json (SentencePiece-style BPE with byte fallback)."""
    return Tokenizer.from_file(hub.pull("llama2-tokenizer", quiet=True))
