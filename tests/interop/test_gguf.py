"""GGUF in and out, checked against references we did not write: transformers' GGUF loader and llama.cpp.

The real model is SmolLM2-135M-Instruct (Q4_1 + Q8_0 + F32 tensors); it is loaded once per module.
"""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import camelid
from camelid import CamelidError, Llama, LlamaConfig
from camelid.generate import SamplingParams, generate
from camelid.interop.gguf import _rope_freqs, load_gguf, read_metadata, rope_scaling_from_freqs, save_gguf
from camelid.interop.hf import save_hf_dir

transformers = pytest.importorskip("transformers")

# our own words, so the test needs no data files; repeated until it is long enough
TEXT = (
    "The llama is a domesticated South American camelid, widely used as a meat and pack animal by Andean "
    "cultures since the pre-Columbian era. Llamas are social animals and live with others as a herd. Their "
    "wool is soft and contains only a small amount of lanolin. Llamas can learn simple tasks after a few "
    "repetitions. When using a pack, they can carry about 25 to 30 percent of their body weight for several "
    "miles. The name llama was adopted by European settlers from native Peruvians. "
)
N_PROMPT, N_NEW = 256, 64
LOGIT_ATOL = 1e-3


# ---------------------------------------------------------------------------------------------------
# fixtures: the real model, loaded once


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The CI box has 2 cores shared with other jobs; oversubscribed OpenMP threads spin and make decoding ~15x
    slower, while one thread per process keeps this module to a few minutes. Results do not depend on it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ours(smollm2_gguf: Path) -> Llama:
    return load_gguf(smollm2_gguf)[1].eval()


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_gguf: Path):
    return transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="module")
def prompt(hf_tokenizer) -> list[int]:
    ids: list[int] = []
    while len(ids) < N_PROMPT:
        ids += hf_tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    return ids[:N_PROMPT]


def _camelid_logits_and_greedy(model: Llama, prompt: list[int]) -> tuple[torch.Tensor, list[int]]:
    with torch.no_grad():
        logits = model(torch.tensor([prompt]))[0]
    return logits, generate(model, prompt, N_NEW, SamplingParams())


@pytest.fixture(scope="module")
def ours_out(ours: Llama, prompt: list[int]) -> tuple[torch.Tensor, list[int]]:
    return _camelid_logits_and_greedy(ours, prompt)


@pytest.fixture(scope="module")
def written(ours: Llama, smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The real model written back out by camelid: an HF dir, and GGUF files at f32 and q8_0 whose vocabulary
    camelid's Tokenizer wrote (`write_gguf`), so llama.cpp also checks what our tokenizer writes."""
    from camelid.tokenizer import Tokenizer

    d = tmp_path_factory.mktemp("written")
    tok = Tokenizer.from_gguf(smollm2_gguf)
    out = {"hf": save_hf_dir(ours, d / "hf")}
    out["f32"] = save_gguf(ours, d / "smollm2-f32.gguf", qtype="f32", tokenizer=tok, progress=False)
    out["q8_0"] = save_gguf(ours, d / "smollm2-q8_0.gguf", qtype="q8_0", tokenizer=tok, progress=False)
    return out


def _hf_logits_and_greedy(model, prompt: list[int]) -> tuple[torch.Tensor, list[int]]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N_NEW, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return logits, out[0, len(prompt):].tolist()


def _assert_agree(ref_logits: torch.Tensor, ref_tokens: list[int], logits: torch.Tensor, tokens: list[int]) -> None:
    diff = (ref_logits - logits).abs().max().item()
    assert diff < LOGIT_ATOL, f"max |logit difference| {diff:.2e} over {N_PROMPT} positions"
    assert len(tokens) == N_NEW and tokens == ref_tokens


# ---------------------------------------------------------------------------------------------------
# 1. the real GGUF: camelid vs transformers


@pytest.mark.slow
def test_real_gguf_matches_transformers(smollm2_gguf: Path, ours: Llama, prompt: list[int], ours_out) -> None:
    assert ours.config.n_layers == 30 and ours.config.n_kv_heads == 3 and ours.config.tie_embeddings
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                           torch_dtype=torch.float32).eval()
    _assert_agree(*_hf_logits_and_greedy(hf, prompt), *ours_out)


# ---------------------------------------------------------------------------------------------------
# 2. what camelid writes, transformers reads


@pytest.mark.slow
def test_our_hf_dir_loads_in_transformers(written: dict[str, Path], prompt: list[int], ours_out) -> None:
    hf = transformers.AutoModelForCausalLM.from_pretrained(written["hf"], torch_dtype=torch.float32).eval()
    _assert_agree(*_hf_logits_and_greedy(hf, prompt), *ours_out)


@pytest.mark.slow
def test_our_f32_gguf_loads_in_transformers_and_camelid(written: dict[str, Path], ours: Llama, prompt: list[int],
                                                        ours_out) -> None:
    f = written["f32"]
    meta = read_metadata(f)
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["llama.attention.head_count_kv"] == 3 and "tokenizer.chat_template" in meta
    hf = transformers.AutoModelForCausalLM.from_pretrained(f.parent, gguf_file=f.name, torch_dtype=torch.float32)
    _assert_agree(*_hf_logits_and_greedy(hf.eval(), prompt), *ours_out)
    back = load_gguf(f)[1]
    for (name, a), b in zip(ours.state_dict().items(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # f32 round trip is exact


# q8_0 vs the fp32 model it came from (weights re-quantised: ~0.6% relative error per matrix): logits over the
# 256 positions differ by at most Q8_MAX and on average by Q8_MEAN (measured: see the report)
Q8_MAX, Q8_MEAN = 4.0, 0.3


@pytest.fixture(scope="module")
def q8_out(written: dict[str, Path], prompt: list[int]) -> tuple[torch.Tensor, list[int]]:
    return _camelid_logits_and_greedy(camelid.load(written["q8_0"], tokenizer=False).model, prompt)


@pytest.mark.slow
def test_our_q8_0_gguf(written: dict[str, Path], prompt: list[int], ours_out, q8_out) -> None:
    f = written["q8_0"]
    types = {t.tensor_type.name for t in gguf.GGUFReader(f).tensors}
    assert types == {"Q8_0", "F32"}
    assert f.stat().st_size < written["f32"].stat().st_size / 3
    q8_logits, q8_tokens = q8_out
    # transformers dequantises the same blocks: logits agree as tightly as for f32
    hf = transformers.AutoModelForCausalLM.from_pretrained(f.parent, gguf_file=f.name, torch_dtype=torch.float32)
    with torch.no_grad():
        hf_logits = hf.eval()(torch.tensor([prompt])).logits[0]
    assert (hf_logits - q8_logits).abs().max() < LOGIT_ATOL
    # against the model it came from: a stated tolerance, and the first 16 greedy tokens identical
    ref_logits, ref_tokens = ours_out
    diff = (q8_logits - ref_logits).abs()
    same = next((i for i, (a, b) in enumerate(zip(q8_tokens, ref_tokens, strict=True)) if a != b), N_NEW)
    print(f"\nq8_0 vs f32 logits: max |diff| {diff.max():.3f}, mean {diff.mean():.4f}; greedy equal for {same}")
    assert diff.max() < Q8_MAX and diff.mean() < Q8_MEAN, (diff.max(), diff.mean())
    assert q8_tokens[:16] == ref_tokens[:16]


# ---------------------------------------------------------------------------------------------------
# 4. llama.cpp runs what camelid writes


def _llama_cpp_logits_and_greedy(path: Path, prompt: list[int], n_new: int,
                                 monkeypatch: pytest.MonkeyPatch) -> tuple[np.ndarray, list[int]]:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    # On this VM (the CPU reports AMX) llama.cpp's repacked/AMX buffers for quantised weights crash with a general
    # protection fault, even on the original Q4_1 file; the plain CPU buffers are the reference we want anyway.
    default_params = llama_cpp.llama_cpp.llama_model_default_params

    def plain_buffers():
        params = default_params()
        params.use_extra_bufts = False
        return params

    monkeypatch.setattr(llama_cpp.llama_cpp, "llama_model_default_params", plain_buffers)
    # f32 KV cache (llama.cpp's default is f16), so f32 weights are compared with f32 arithmetic throughout
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, logits_all=True, verbose=False, n_threads=1, seed=0,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    llm.eval(prompt)
    logits = np.array(llm.scores[: len(prompt)], dtype=np.float32)
    tokens = []
    for _ in range(n_new):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        tokens.append(tok)
        llm.eval([tok])
    llm.close()
    return logits, tokens


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["f32", "q8_0"])
def test_llama_cpp_runs_our_gguf(written: dict[str, Path], qtype: str, prompt: list[int],
                                 request: pytest.FixtureRequest, capsys: pytest.CaptureFixture,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    n_new = 16
    cpp_logits, cpp_tokens = _llama_cpp_logits_and_greedy(written[qtype], prompt, n_new, monkeypatch)
    ref_logits, ref_tokens = request.getfixturevalue("ours_out" if qtype == "f32" else "q8_out")
    ref = ref_logits.numpy()
    diff = np.abs(cpp_logits - ref)
    rel, mean = diff.max() / np.abs(ref).max(), diff.mean()
    with capsys.disabled():
        print(f"\nllama.cpp vs camelid, {qtype}: max |diff| / max |logit| = {rel:.2e}, mean |diff| = {mean:.2e}, "
              f"greedy {sum(a == b for a, b in zip(cpp_tokens, ref_tokens[:n_new], strict=True))}/{n_new} equal")
    if qtype == "f32":
        assert rel < 1e-4, rel  # same weights, f32 arithmetic (f32 KV cache): only summation order differs
    else:
        # llama.cpp's q8_0 kernels also quantise the activations to 8 bits (camelid dequantises the weights and
        # multiplies in f32), so the logits differ more: measured 4.6e-2 max relative, 0.20 mean, see the report
        assert rel < 0.1 and mean < 0.4, (rel, mean)
    assert cpp_tokens == ref_tokens[:n_new]


# ---------------------------------------------------------------------------------------------------
# tiny models: exact round trips for the features the real model does not have


@pytest.mark.parametrize("name", ["tiny-gqa", "tiny-llama3", "qwen2"])
def test_tiny_round_trip(tmp_path: Path, name: str) -> None:
    if name == "qwen2":
        cfg = LlamaConfig.from_name("tiny-gqa", qkv_bias=True).replace(name="tiny-qwen2")
    else:
        cfg = LlamaConfig.from_name(name)
    model = Llama(cfg).eval()
    if cfg.qkv_bias:
        for block in model.layers:
            for proj in (block.attention.wq, block.attention.wk, block.attention.wv):
                torch.nn.init.normal_(proj.bias)
    f = save_gguf(model, tmp_path / "m.gguf", progress=False)
    assert not list(tmp_path.glob("*.tmp"))
    config, back = load_gguf(f)
    assert config.replace(name=cfg.name) == cfg
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(back(ids), model(ids), atol=0, rtol=0)
    # transformers reads the same file (llama: undoing the q/k permutation the same way; qwen2: biases)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", torch_dtype=torch.float32)
    if cfg.rope_scaling is None:  # transformers' GGUF loader ignores rope_freqs
        with torch.no_grad():
            torch.testing.assert_close(hf.eval()(ids).logits, model(ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["llama3.1-8b", "llama3.2-1b"])
def test_rope_scaling_recovered_from_llama_cpp_rope_freqs(name: str) -> None:
    # llama.cpp's converter writes only the rope_freqs tensor; the parameters must come back from it
    cfg = LlamaConfig.from_name(name)
    assert rope_scaling_from_freqs(_rope_freqs(cfg), cfg, "x.gguf") == cfg.rope_scaling
    with pytest.raises(CamelidError, match="not Llama 3.1-style"):
        rope_scaling_from_freqs(np.linspace(1, 8, cfg.head_dim // 2), cfg, "x.gguf")


def test_f16_round_trip_is_close(tmp_path: Path) -> None:
    model = Llama(LlamaConfig.from_name("tiny-mqa")).eval()
    f = save_gguf(model, tmp_path / "m.gguf", qtype="f16", progress=False)
    back = load_gguf(f, dtype=torch.float16)[1]
    assert back.layers[0].attention.wq.weight.dtype == torch.float16
    assert {t.tensor_type.name for t in gguf.GGUFReader(f).tensors} == {"F16", "F32"}
    torch.testing.assert_close(back.float().layers[1].feed_forward.w2.weight, model.layers[1].feed_forward.w2.weight,
                               atol=1e-3, rtol=1e-3)


def test_camelid_load_dispatches_gguf(tmp_path: Path) -> None:
    model = Llama(LlamaConfig.from_name("tiny-gqa")).eval()
    f = save_gguf(model, tmp_path / "m.gguf", progress=False)
    llm = camelid.load(f, tokenizer=False)
    ids = torch.randint(0, 320, (1, 9))
    with torch.no_grad():
        assert torch.equal(llm.model(ids), model(ids))


# ---------------------------------------------------------------------------------------------------
# 5. bad input: one line naming the problem and the fix


def _one_line(path: Path, match: str) -> str:
    with pytest.raises(CamelidError, match=match) as e:
        load_gguf(path)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> Path:
    return save_gguf(Llama(LlamaConfig.from_name("tiny-gqa")), tmp_path / "tiny.gguf", progress=False)


@pytest.mark.parametrize("keep", [0.5, 0.02])  # cut in the tensor data, and in the header
def test_truncated_gguf(tiny_gguf: Path, keep: float) -> None:
    data = tiny_gguf.read_bytes()
    tiny_gguf.write_bytes(data[: int(len(data) * keep)])
    assert str(tiny_gguf) in _one_line(tiny_gguf, "corrupt or truncated GGUF")


def test_not_a_gguf(tmp_path: Path) -> None:
    f = tmp_path / "x.gguf"
    f.write_bytes(b"PK\x03\x04 a zip file")
    _one_line(f, "not a GGUF file")


def test_unsupported_architecture(tmp_path: Path) -> None:
    w = gguf.GGUFWriter(path=None, arch="mamba")
    w.add_tensor("token_embd.weight", np.zeros((8, 16), dtype=np.float32))
    f = tmp_path / "mamba.gguf"
    w.write_header_to_file(f)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _one_line(f, "GGUF architecture 'mamba' is not supported; camelid loads llama, qwen2")


def test_unsupported_quant_type(tiny_gguf: Path) -> None:
    # rewrite one tensor's type to Q8_1 (same 32-value blocks; gguf-py cannot dequantise it) in the header
    reader = gguf.GGUFReader(tiny_gguf)
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
    end = t.field.offset + sum(p.nbytes for p in t.field.parts)
    type_offset = end - 8 - 4  # a tensor info ends with its type (u32) and data offset (u64)
    data = bytearray(tiny_gguf.read_bytes())
    assert struct.unpack_from("<I", data, type_offset)[0] == gguf.GGMLQuantizationType.F32
    struct.pack_into("<I", data, type_offset, gguf.GGMLQuantizationType.Q8_1)
    tiny_gguf.write_bytes(bytes(data))
    msg = _one_line(tiny_gguf, "blk.0.ffn_up.weight uses quantisation type Q8_1")
    assert "re-quantise" in msg


def test_unknown_qtype_for_writing(tmp_path: Path) -> None:
    with pytest.raises(CamelidError, match="unknown GGUF type 'q3'"):
        save_gguf(Llama(LlamaConfig.from_name("tiny-gqa")), tmp_path / "x.gguf", qtype="q3")
