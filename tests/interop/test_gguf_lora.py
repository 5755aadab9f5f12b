"""GGUF LoRA adapters: the metadata and tensors llama.cpp's loader checks, and llama.cpp itself applying a camelid
adapter to the base GGUF (F32) with camelid's greedy tokens on 20 prompts, as the merged GGUF does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from camelid import Llama, LlamaConfig
from camelid.generate import SamplingParams, generate
from camelid.interop.gguf import read_metadata, save_gguf
from camelid.interop.gguf_lora import read_gguf_adapter
from camelid.interop.meta import to_interleaved
from camelid.variants.lora import apply_lora, lora_disabled, lora_modules, merge_lora, save_gguf_adapter


def _randomize(model: torch.nn.Module, std: float) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=g) * std)


@pytest.mark.parametrize("rslora", [False, True])
def test_adapter_file_is_what_llama_cpp_reads(tmp_path: Path, rslora: bool) -> None:
    """general.type adapter, adapter.type lora, adapter.lora.alpha; blk.N.<tensor>.weight.lora_a [rank, in] and
    .lora_b [out, rank], with wq/wk's lora_b in the interleaved row order of llama.cpp's q/k weights, so that the
    update a GGUF reader computes, alpha / rank * B @ A, is the interleaved camelid update."""
    torch.manual_seed(0)
    model = apply_lora(Llama(LlamaConfig.from_name("tiny-gqa")), rank=4, alpha=8, rslora=rslora)
    _randomize(model, 0.1)
    path = save_gguf_adapter(model, tmp_path / "adapter.gguf")
    meta = read_metadata(path)
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["general.architecture"] == "llama"
    alpha, tensors = read_gguf_adapter(path)
    assert alpha == (0.0 if rslora else 8.0)  # rslora: the scale is folded into lora_b, alpha 0 means scale 1
    assert len(tensors) == 2 * 7 * model.config.n_layers
    for path_, m in lora_modules(model).items():
        layer, kind = path_.split(".")[1], path_.rsplit(".", 1)[1]
        name = {"wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output", "w1": "ffn_gate",
                "w3": "ffn_up", "w2": "ffn_down"}[kind]
        a, b = tensors[f"blk.{layer}.{name}.weight.lora_a"], tensors[f"blk.{layer}.{name}.weight.lora_b"]
        assert a.shape == (4, m.in_features) and b.shape == (m.out_features, 4)
        update = (alpha / 4 if alpha else 1.0) * b @ a
        want = m.delta()
        if kind in ("wq", "wk"):
            want = to_interleaved(want, model.config.n_heads if kind == "wq" else model.config.n_kv_heads)
        assert (update - want).abs().max().item() < 1e-6


# ---------------------------------------------------------------------------------------------------
# llama.cpp applies it (the real SmolLM2, F32)

PROMPTS = [
    "What is the capital of France?", "Name three primary colours.", "Write a haiku about the sea.",
    "How many legs does a spider have?", "What is 12 times 12?", "Give me a synonym for happy.",
    "What does a llama eat?", "Translate 'good morning' into Spanish.", "Who wrote Pride and Prejudice?",
    "What is the boiling point of water?", "Describe a cat in one sentence.", "What is photosynthesis?",
    "Suggest a name for a goldfish.", "Why is the sky blue?", "List two planets.", "What is a prime number?",
    "How do I make tea?", "What colour is a banana?", "Say hello in French.", "What is the opposite of cold?",
]
N_NEW = 12


def _llama_cpp_greedy(model_path: Path, prompts: list[list[int]], monkeypatch: pytest.MonkeyPatch,
                      lora_path: Path | None = None) -> list[list[int]]:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    default_params = llama_cpp.llama_cpp.llama_model_default_params

    def plain_buffers():  # as in tests/interop/test_gguf.py: no repacked/AMX buffers, the plain CPU reference
        params = default_params()
        params.use_extra_bufts = False
        return params

    monkeypatch.setattr(llama_cpp.llama_cpp, "llama_model_default_params", plain_buffers)
    # logits_all: without it llama-cpp-python keeps no scores for scores[n_tokens - 1] to read
    llm = llama_cpp.Llama(model_path=str(model_path), lora_path=str(lora_path) if lora_path else None, n_ctx=256,
                          logits_all=True, verbose=False, n_threads=1, seed=0, type_k=llama_cpp.GGML_TYPE_F32,
                          type_v=llama_cpp.GGML_TYPE_F32)
    out = []
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        tokens = []
        for _ in range(N_NEW):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            tokens.append(tok)
            llm.eval([tok])
        out.append(tokens)
    llm.close()
    return out


@pytest.mark.slow
def test_llama_cpp_applies_our_adapter_and_our_merge(smollm2_gguf: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from camelid.interop.gguf import load_gguf
    from camelid.tokenizer import Tokenizer

    torch.set_num_threads(1)
    tok = Tokenizer.from_gguf(smollm2_gguf)
    base = load_gguf(smollm2_gguf)[1].eval()
    save_gguf(base, tmp_path / "base-f32.gguf", tokenizer=tok, qtype="f32", progress=False)
    torch.manual_seed(0)
    apply_lora(base, rank=8, alpha=16)
    _randomize(base, 0.02)
    save_gguf_adapter(base, tmp_path / "adapter.gguf")
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}])) for p in PROMPTS]
    with torch.no_grad(), lora_disabled(base):
        without = base(torch.tensor([prompts[0]]))
    with torch.no_grad():
        assert (base(torch.tensor([prompts[0]])) - without).abs().max().item() > 1.0, "the adapter changes too little"
    ours = [generate(base, ids, N_NEW, SamplingParams()) for ids in prompts]
    merged = merge_lora(base)
    save_gguf(merged, tmp_path / "merged-f32.gguf", tokenizer=tok, qtype="f32", progress=False)

    assert _llama_cpp_greedy(tmp_path / "base-f32.gguf", prompts, monkeypatch, tmp_path / "adapter.gguf") == ours
    assert _llama_cpp_greedy(tmp_path / "merged-f32.gguf", prompts, monkeypatch) == ours
