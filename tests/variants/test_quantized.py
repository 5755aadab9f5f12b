from __future__ import annotations

import copy

import pytest
import torch
from helpers import peaked_model

from camelid.errors import CamelidError
from camelid.generate import generate
from camelid.model import Llama
from camelid.variants.fused import fuse
from camelid.variants.quantized import (
    FastLinear,
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    load_quantized,
    quantize_model,
    save_quantized,
)


def dequantised_copy(qmodel: torch.nn.Module, base: Llama) -> Llama:
    """The fp32 model the quantised one stands for: every fused linear replaced by its dequantised weight."""
    ref = fuse(copy.deepcopy(base))
    qmods = dict(qmodel.named_modules())
    for name, mod in list(ref.named_modules()):
        if isinstance(mod, torch.nn.Linear):
            mod.weight = torch.nn.Parameter(qmods[name].dequantize().clone())
    if hasattr(qmodel.tok_embeddings, "dequantize"):
        ref.tok_embeddings.weight = torch.nn.Parameter(qmodel.tok_embeddings.dequantize().clone())
    return ref


PROMPT = [1, 5, 9, 42, 7, 100, 3]


def test_quantised_models_keep_their_tensor_names() -> None:
    """The file format of `camelid quantize`: the fused layout's names, the quantised tensors' own suffixes."""
    tied = quantize_model(peaked_model("tiny-llama3"), "int4")
    keys = set(tied.state_dict())
    assert {"layers.0.attention.wqkv.qweight", "layers.0.attention.wqkv.scale", "layers.0.attention.wqkv.minimum",
            "layers.0.attention.wo.qweight", "layers.0.feed_forward.w13.qweight", "layers.1.feed_forward.w2.scale",
            "layers.0.attention_norm.weight", "layers.0.ffn_norm.weight", "norm.weight", "output.qweight",
            "output.scale"} <= keys
    assert not any(k.startswith("tok_embeddings") or "wq." in k or "w1." in k for k in keys)
    untied = quantize_model(peaked_model(), "int8")
    assert {"tok_embeddings.table.qweight", "tok_embeddings.table.scale"} <= set(untied.state_dict())
    fp32 = quantize_model(peaked_model(), "fp32")
    assert isinstance(fp32.layers[0].attention.wqkv, FastLinear)
    assert "layers.0.attention.wqkv.weight" in fp32.state_dict()


def test_fast_fp32_path_equals_plain_greedy() -> None:
    model = peaked_model()
    want = generate(model, PROMPT, 24)
    assert generate(quantize_model(copy.deepcopy(model), "fp32"), PROMPT, 24) == want


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantised_equals_its_dequantised_model(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAMELID_INT8_ACTIVATIONS", "0")  # decode steps with fp32 activations: the same products
    base = peaked_model()
    q = quantize_model(copy.deepcopy(base), mode)
    ref = dequantised_copy(q, base)
    ids = torch.tensor([PROMPT])
    torch.testing.assert_close(q(ids), ref(ids), rtol=1e-4, atol=1e-4)
    assert generate(q, PROMPT, 24) == generate(ref, PROMPT, 24)


@pytest.mark.parametrize("mode,tol", [("int8", 0.05), ("int4", 0.5)])
def test_quantisation_error_is_small(mode: str, tol: float) -> None:
    base = peaked_model()
    q = quantize_model(copy.deepcopy(base), mode)
    ids = torch.tensor([PROMPT])
    want = base(ids)
    err = (q(ids) - want).abs().max() / want.abs().max()
    assert err < tol


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_save_and_load_roundtrip_never_builds_fp32(tmp_path, mode: str) -> None:
    base = peaked_model("tiny-llama3")
    q = quantize_model(copy.deepcopy(base), mode)
    save_quantized(q, tmp_path / "m.safetensors")
    loaded = load_quantized(tmp_path / "m.safetensors")
    assert loaded.config == base.config and loaded.quantized == mode
    assert not any(t.is_meta for t in list(loaded.parameters()) + list(loaded.buffers()))
    ids = torch.tensor([PROMPT])
    assert torch.equal(loaded(ids), q(ids))
    assert generate(loaded, PROMPT, 12) == generate(q, PROMPT, 12)


def test_tied_int8_embedding_shares_the_head_matrix(tmp_path) -> None:
    base = peaked_model("tiny-llama3")  # tied embeddings
    q = quantize_model(copy.deepcopy(base), "int4")
    assert isinstance(q.tok_embeddings, Int8Embedding) and q.tok_embeddings.table is q.output
    assert not [k for k in q.state_dict() if k.startswith("tok_embeddings")]
    ids = torch.tensor([[3, 1, 4]])
    torch.testing.assert_close(q.tok_embeddings(ids)[0], q.output.dequantize()[ids[0]])
    untied = quantize_model(peaked_model("tiny-gqa"), "int8")
    assert isinstance(untied.tok_embeddings, Int8Embedding) and untied.tok_embeddings.table is not untied.output


def test_int4_keeps_the_output_head_in_int8_unless_asked() -> None:
    q = quantize_model(peaked_model(), "int4")
    assert isinstance(q.output, Int8Linear) and isinstance(q.layers[0].attention.wqkv, Int4Linear)
    q4 = quantize_model(peaked_model(), "int4", head="int4")
    assert isinstance(q4.output, Int4Linear)


def test_loading_a_file_without_metadata_is_a_clean_error(tmp_path) -> None:
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CamelidError, match="no camelid quantisation metadata"):
        load_quantized(tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CamelidError, match="not a readable safetensors file"):
        load_quantized(tmp_path / "junk.safetensors")


def test_bad_mode_is_a_camelid_error() -> None:
    with pytest.raises(CamelidError, match="int8"):
        quantize_model(peaked_model(), "int3")


@pytest.mark.parametrize("mode", ["fp32", "int8", "int4"])
def test_fast_decode_step_compiles_without_graph_breaks(mode: str) -> None:
    model = quantize_model(peaked_model(), mode)
    model.setup_cache(1, 16)
    explanation = torch._dynamo.explain(model)(torch.tensor([[5]]), torch.tensor([3]))
    model.clear_cache()
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.slow
def test_compiled_int4_decode_gives_the_eager_greedy_tokens() -> None:
    q = quantize_model(peaked_model(), "int4")
    assert generate(q, PROMPT, 16, compile=True) == generate(q, PROMPT, 16)
