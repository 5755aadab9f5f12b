"""The real Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF (491 MB, from six PyPI wheels: camelid.hub) against
transformers' GGUF loader and llama.cpp: logits, greedy tokens, the vocabulary, and a chat reply."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import camelid
from camelid import hub
from camelid.generate import SamplingParams, generate_tokens
from camelid.tokenizer import Tokenizer

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")

N_NEW = 8
LOGIT_ATOL = 1e-3  # the same dequantised weights in fp32; only summation order differs
CODE = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
TEXTS = [CODE, "Hello world", " Hello  world ", "\t\tindent\r\nCRLF", "😀🦙👍🏽 emoji, 🇫🇷 flags",
         "你好，世界！中文文本", "Ünïcödé façade naïve Æsir", "12345 3.14159 1,000,000 007", "I've 'll 'RE we'Ve",
         "مرحبا بالعالم",
         "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "x<|endoftext|>y", "   ", ""]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Two shared cores: one thread per process keeps oversubscribed OpenMP threads from spinning."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def qwen_gguf() -> Path:
    return hub.pull("qwen2.5-coder-0.5b-instruct", quiet=True)


@pytest.fixture(scope="module")
def qwen(qwen_gguf: Path) -> camelid.LLM:
    """Loaded once, as a user loads it (the reference fp32 model, dequantised from Q4_K_M)."""
    return camelid.load("qwen2.5-coder-0.5b-instruct")


@pytest.fixture(scope="module")
def hf_tokenizer(qwen_gguf: Path):
    return transformers.AutoTokenizer.from_pretrained(qwen_gguf.parent, gguf_file=qwen_gguf.name)


def test_logits_and_greedy_tokens_equal_transformers(qwen_gguf: Path, qwen: camelid.LLM, hf_tokenizer,
                                                     capsys) -> None:
    prompt = hf_tokenizer(CODE, add_special_tokens=False)["input_ids"]
    config, ours = qwen.config, qwen.model
    assert (config.qkv_bias, config.n_layers, config.n_heads, config.n_kv_heads, config.vocab_size) == \
        (True, 24, 14, 2, 151936)
    with torch.no_grad():
        logits = ours(torch.tensor([prompt]))[0]
    tokens = prompt + list(generate_tokens(ours, prompt, N_NEW, SamplingParams(temperature=0.0)))
    hf = transformers.AutoModelForCausalLM.from_pretrained(qwen_gguf.parent, gguf_file=qwen_gguf.name,
                                                           dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        ref = hf(ids).logits[0].float()
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N_NEW, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    diff = (ref - logits).abs().max().item()
    with capsys.disabled():
        print(f"\nQwen2.5-Coder-0.5B Q4_K_M, camelid vs transformers: max |logit diff| {diff:.2e} over {len(prompt)} "
              f"positions (max |logit| {ref.abs().max():.1f})")
    assert diff < LOGIT_ATOL, f"max |logit difference| {diff:.2e}"
    assert tokens[len(prompt):] == out[0, len(prompt):].tolist()


def test_vocabulary_equals_transformers_and_llama_cpp(qwen_gguf: Path, hf_tokenizer) -> None:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    tok = Tokenizer.from_gguf(qwen_gguf)
    assert (tok.kind, tok.pre, tok.vocab_size) == ("bpe", "qwen2", 151936)
    llm = llama_cpp.Llama(model_path=str(qwen_gguf), vocab_only=True, verbose=False)
    try:
        for text in TEXTS:
            ids = tok.encode(text)
            assert ids == hf_tokenizer.encode(text, add_special_tokens=False), text
            assert ids == llm.tokenize(text.encode(), add_bos=False, special=True), text
    finally:
        llm.close()


def test_chat_reply_is_sensible(qwen: camelid.LLM, capsys) -> None:
    reply = qwen.chat([{"role": "user", "content": "Write a Python function that returns the sum of a list."}],
                     max_new_tokens=48)
    with capsys.disabled():
        print(f"\nQwen2.5-Coder-0.5B reply: {reply!r}")
    assert "def " in reply and "sum" in reply and "return" in reply, reply
