"""The LLaMA-shaped architectures beside llama and qwen2: qwen3 (RMSNorm on q and k), phi3 (fused qkv and
gate/up tensors) and Mistral's sliding window. Each from random-weight Hugging Face folders and GGUF files,
against transformers (logits) and llama.cpp (greedy tokens); and the C++ decode step refusing what it does not
implement."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import camelid
from camelid import CamelidError
from camelid.generate import SamplingParams, generate_tokens
from camelid.interop.gguf import load_gguf, save_gguf
from camelid.interop.hf import config_from_hf, load_hf_dir, save_hf_dir
from camelid.tokenizer import NORMAL, bytes_to_unicode
from camelid.tokenizer.gguf import write_gguf_vocab
from camelid.variants import decode_step
from camelid.variants.quantized import quantize_model

transformers = pytest.importorskip("transformers")

VOCAB = 256  # the byte-level vocabulary below: one token per byte, so llama.cpp can load the files
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=10000.0,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
WINDOW = 5  # Mistral's window in these tests: shorter than the sequences, so it matters
PROMPT = [3, 17, 200, 45, 99, 5, 61, 128, 7, 250, 33, 12]


def _hf_model(kind: str):
    """A transformers model of each architecture, random weights large enough that every difference shows."""
    torch.manual_seed(0)
    if kind == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**COMMON, head_dim=32))  # != 64 / 4
    elif kind == "phi3":
        model = transformers.Phi3ForCausalLM(transformers.Phi3Config(**COMMON, sliding_window=None, pad_token_id=0))
    else:
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**COMMON, sliding_window=WINDOW))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


@pytest.fixture(scope="module", params=["qwen3", "phi3", "mistral"])
def arch(request, tmp_path_factory) -> tuple[str, object, Path]:
    kind = request.param
    model = _hf_model(kind)
    folder = tmp_path_factory.mktemp(kind)
    model.save_pretrained(folder)
    return kind, model, folder


def _reference(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def _camelid_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]


def _greedy(model, ids: list[int], n: int) -> list[int]:
    """Greedy tokens, recomputing the whole sequence each step (no cache: the plainest reference)."""
    ids = list(ids)
    for _ in range(n):
        ids.append(int(_camelid_logits(model, ids)[-1].argmax()))
    return ids[-n:]


def test_hf_folder_logits_equal_transformers(arch) -> None:
    kind, hf, folder = arch
    config, ours = load_hf_dir(folder)
    assert (config.qk_norm, config.sliding_window) == (kind == "qwen3", WINDOW if kind == "mistral" else None)
    ref = _reference(hf, PROMPT)
    assert torch.allclose(_camelid_logits(ours, PROMPT), ref, atol=1e-5, rtol=0), kind
    # through camelid.load (formats.detect + the fused fp32 model) as a user runs it
    llm = camelid.load(folder, tokenizer=False, quantize="fp32")
    assert torch.allclose(_camelid_logits(llm.model, PROMPT), ref, atol=1e-4, rtol=0), kind


def test_hf_folder_written_back_loads_in_transformers(arch, tmp_path) -> None:
    """camelid's export: qwen3 as Qwen3ForCausalLM, Mistral with its window, phi3 as plain LLaMA tensors."""
    kind, hf, folder = arch
    _, ours = load_hf_dir(folder)
    save_hf_dir(ours, tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    expected = {"qwen3": "Qwen3ForCausalLM", "phi3": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}[kind]
    assert type(back).__name__ == expected
    assert torch.allclose(_reference(back, PROMPT), _reference(hf, PROMPT), atol=1e-5, rtol=0)


def _byte_vocabulary(writer: gguf.GGUFWriter) -> None:
    """A byte-level BPE vocabulary of 256 tokens (255 bytes and one merge): enough for llama.cpp to load a model."""
    space = bytes_to_unicode()[32]
    tokens = [bytes_to_unicode()[b] for b in range(VOCAB - 1)] + [space + space]
    write_gguf_vocab(writer, kind="bpe", pre="gpt-2", tokens=tokens, token_types=[NORMAL] * VOCAB, scores=[],
                     merges=[f"{space} {space}"], ids={"bos": 1, "eos": 2}, add_bos=False, add_space_prefix=False,
                     chat_template=None)


class _ByteVocabulary:
    def write_gguf(self, writer: gguf.GGUFWriter) -> None:
        _byte_vocabulary(writer)


def _phi3_gguf(hf, path: Path) -> Path:
    """A GGUF file in llama.cpp's phi3 layout (convert_hf_to_gguf.py's Phi3MiniModel): attn_qkv and a fused
    ffn_up of gate and up, q/k unpermuted."""
    c = hf.config
    writer = gguf.GGUFWriter(str(path), arch="phi3")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_rope_freq_base(COMMON["rope_theta"])  # transformers 5 keeps it in rope_parameters
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    _byte_vocabulary(writer)
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    block = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.qkv_proj": "attn_qkv",
             "self_attn.o_proj": "attn_output", "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, t in hf.state_dict().items():
        stem = name.rsplit(".", 1)[0]
        if stem.startswith("model.layers."):
            _, _, i, module = stem.split(".", 3)
            gguf_name = f"blk.{i}.{block[module]}"
        else:
            gguf_name = names[stem]
        writer.add_tensor(f"{gguf_name}.weight", t.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def arch_gguf(arch, tmp_path_factory) -> tuple[str, object, Path]:
    """The architecture's GGUF: llama.cpp's phi3 layout for phi3; camelid's own writer for qwen3 (arch qwen3)
    and Mistral (arch llama with llama.attention.sliding_window)."""
    kind, hf, folder = arch
    path = tmp_path_factory.mktemp(f"{kind}-gguf") / f"{kind}.gguf"
    if kind == "phi3":
        _phi3_gguf(hf, path)
    else:
        save_gguf(load_hf_dir(folder)[1], path, tokenizer=_ByteVocabulary(), progress=False)
    return kind, hf, path


def test_gguf_logits_equal_transformers(arch_gguf) -> None:
    kind, hf, path = arch_gguf
    fields = gguf.GGUFReader(str(path)).fields
    assert fields["general.architecture"].contents() == {"qwen3": "qwen3", "phi3": "phi3", "mistral": "llama"}[kind]
    config, ours = load_gguf(path)
    assert (config.qk_norm, config.sliding_window) == (kind == "qwen3", WINDOW if kind == "mistral" else None)
    assert torch.allclose(_camelid_logits(ours, PROMPT), _reference(hf, PROMPT), atol=1e-5, rtol=0), kind


@pytest.mark.parametrize("mode", ["fp32", "int4"])
def test_gguf_quantized_as_it_loads(arch_gguf, mode: str) -> None:
    """camelid.load(gguf, quantize=...) builds the quantised model tensor by tensor (phi3: q/k/v and gate/up as
    row slices of the fused tensors; qwen3: the unfused attention with q/k norms) to the same bytes as
    quantize_model over the fp32 model."""
    kind, _, path = arch_gguf
    direct = camelid.load(path, tokenizer=False, quantize=mode).model
    old = quantize_model(load_gguf(path)[1], mode).eval()
    theirs = old.state_dict()
    assert direct.state_dict().keys() == theirs.keys()
    for k, t in direct.state_dict().items():
        assert torch.equal(t, theirs[k]), (kind, k)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        assert torch.equal(direct(ids), old(ids)), kind


def _llama_cpp(path: Path, prompt: list[int], n_new: int, monkeypatch: pytest.MonkeyPatch
               ) -> tuple[np.ndarray, list[int]]:
    """llama.cpp's logits for the prompt and its greedy continuation (plain CPU buffers, f32 KV cache)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    default_params = llama_cpp.llama_cpp.llama_model_default_params

    def plain_buffers():
        params = default_params()
        params.use_extra_bufts = False
        return params

    monkeypatch.setattr(llama_cpp.llama_cpp, "llama_model_default_params", plain_buffers)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=1, seed=0,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    try:
        llm.eval(prompt)
        logits = np.array(llm.scores[: len(prompt)], dtype=np.float32)
        tokens = []
        for _ in range(n_new):
            tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([tokens[-1]])
    finally:
        llm.close()
    return logits, tokens


def test_llama_cpp_greedy_tokens_equal_camelid(arch_gguf, monkeypatch) -> None:
    """llama.cpp runs the same file to the same greedy tokens. llama.cpp has no sliding window for llama-architecture
    files (it reads no window for them), so for Mistral the prompt and continuation stay within one window of
    camelid's: there both compute plain causal attention."""
    kind, _, path = arch_gguf
    _, ours = load_gguf(path)
    prompt, n_new = (PROMPT[:2], WINDOW - 2) if kind == "mistral" else (PROMPT, 12)
    cpp_logits, cpp_tokens = _llama_cpp(path, prompt, n_new, monkeypatch)
    ref = _camelid_logits(ours, prompt).numpy()
    assert np.abs(cpp_logits - ref).max() / np.abs(ref).max() < 1e-4, kind
    assert cpp_tokens == _greedy(ours, prompt, n_new), kind


# ---- the fused/quantised inference model and the C++ decode step -----------------------------------------------


def test_decode_step_refuses_what_it_does_not_implement(arch) -> None:
    """qk_norm and sliding_window are not in the C++ step: refused in one line (the per-layer path runs instead),
    and the fused fp32 model still computes the reference's function. Phi-3 is plain LLaMA once split."""
    kind, hf, folder = arch
    _, ours = load_hf_dir(folder)
    fast = quantize_model(load_hf_dir(folder)[1], "fp32")
    why = decode_step.refusal(fast)
    if kind == "phi3":
        assert why is None
    else:
        assert why is not None and "\n" not in why
        assert ("qk_norm=True" if kind == "qwen3" else f"sliding_window={WINDOW}") in why
    assert torch.allclose(_camelid_logits(fast, PROMPT), _camelid_logits(ours, PROMPT), atol=1e-4, rtol=0)
    # generation with a KV cache through the fused model (and, for phi3, the C++ step) = the plain reference
    tokens = list(generate_tokens(fast, PROMPT, 10, SamplingParams(temperature=0.0)))
    assert tokens == _greedy(ours, PROMPT, 10), kind


def test_qwen2_biases_are_refused_by_the_decode_step() -> None:
    model = quantize_model(camelid.Llama(camelid.LlamaConfig.from_name("tiny-gqa", qkv_bias=True)), "fp32")
    assert "qkv_bias=True" in decode_step.refusal(model)


# ---- configs: what is read, what is refused ------------------------------------------------------------------


@pytest.mark.parametrize(("changes", "match"), [
    ({"model_type": "qwen2", "use_sliding_window": True}, "use_sliding_window=true"),
    ({"model_type": "qwen3", "attention_bias": True}, "attention_bias=true"),
    ({"model_type": "phi3", "partial_rotary_factor": 0.75}, "partial_rotary_factor"),
    ({"model_type": "phi3", "rope_scaling": {"type": "longrope", "long_factor": [1.0], "short_factor": [1.0]}},
     "'longrope' is not supported"),
])
def test_unsupported_variants_are_one_line_errors(changes, match) -> None:
    d = {**COMMON, "architectures": None, **changes}
    with pytest.raises(CamelidError, match=match) as e:
        config_from_hf(d)
    assert "\n" not in str(e.value)


def test_qwen_window_is_ignored_unless_used() -> None:
    """Qwen configs carry sliding_window even when use_sliding_window is false: no window then, as in transformers."""
    for model_type in ("qwen2", "qwen3"):
        config = config_from_hf({**COMMON, "model_type": model_type, "sliding_window": 4096,
                                 "use_sliding_window": False})
        assert config.sliding_window is None


def test_window_and_qk_norm_are_checked() -> None:
    with pytest.raises(CamelidError, match="sliding_window"):
        camelid.LlamaConfig.from_name("tiny-gqa", sliding_window=0)
    with pytest.raises(CamelidError, match="qk_norm"):
        camelid.LlamaConfig.from_name("tiny-gqa", qk_norm="yes")
    config = camelid.LlamaConfig.from_name("tiny-gqa", qk_norm=True)
    assert camelid.Llama(config).num_params() == sum(p.numel() for p in camelid.Llama(config).parameters())
