"""`camelid.load(gguf, quantize=...)` builds the quantised model tensor by tensor, without the fp32 model.

The reference is the path it replaces: dequantise the whole file to fp32 (`load_gguf`), then `quantize_model`.
int8 and int4 codes are computed per row (int8) or per group of 32 in a row (int4), so quantising a tensor in
slices of rows, or q/k/v one at a time instead of concatenated, gives the same bytes: wherever the direct path
re-quantises (Q8_0 -> int8, K-quants -> int8/int4, F32 -> anything) the model must be identical. Q4_0/Q4_1 ->
int4 is the one place where it differs, on purpose: the blocks are taken as they are (Int4Linear's format is
Q4_1's), so the weights are exactly the file's, where the old path re-quantised them (a second rounding).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import camelid
from camelid import CamelidError, Llama, LlamaConfig, hugepages
from camelid.interop import gguf as gguf_io
from camelid.interop.gguf import load_gguf, save_gguf
from camelid.interop.meta import from_interleaved
from camelid.ops import linear, native
from camelid.variants import quantized
from camelid.variants.quantized import Int4Linear, quantize_model

Q = gguf.GGMLQuantizationType
# widths that tile K-quant super-blocks (256) and int4 groups (32); GQA; a head that is not tied, and one that is
CONFIG = LlamaConfig(name="tiny-256", vocab_size=320, dim=256, n_layers=2, n_heads=4, n_kv_heads=2,
                     intermediate_size=512, max_seq_len=64, tie_embeddings=False)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _random_kquant(shape: tuple[int, ...], qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """Random Q4_K / Q6_K blocks (gguf-py cannot quantise K-quants) with small fp16 super-block scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, width = shape
    data = rng.integers(0, 256, (rows, width // block, size), dtype=np.uint8)
    d = np.frombuffer(np.float16(2e-3).tobytes(), np.uint8)
    if qtype == Q.Q4_K:  # d, dmin, scales[12], qs[128]
        data[..., 0:2] = d
        data[..., 2:4] = d
    else:  # Q6_K: ql[128], qh[64], scales[16], d
        data[..., size - 2:] = d
    return data.reshape(rows, -1)


def _write(tmp_path: Path, qtype: Q, tied: bool = False, seed: int = 0, model: Llama | None = None) -> Path:
    """A tiny random model (or `model`) as a GGUF whose 2-D tensors are all of `qtype` (1-D ones F32, as llama.cpp
    writes)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = model if model is not None else Llama(CONFIG.replace(tie_embeddings=tied)).eval()

    def encode(name: str, w: np.ndarray, _: str) -> tuple[np.ndarray, Q]:
        if w.ndim == 1 or qtype == Q.F32:
            return w, Q.F32
        if qtype in (Q.Q4_K, Q.Q6_K):
            return _random_kquant(w.shape, qtype, rng), qtype
        return gguf.quants.quantize(w, qtype), qtype

    mp = pytest.MonkeyPatch()
    mp.setattr(gguf_io, "_encode", encode)
    try:
        return save_gguf(model, tmp_path / f"{qtype.name}{'-tied' if tied else ''}.gguf", progress=False)
    finally:
        mp.undo()


def _old_path(path: Path, mode: str, head: str | None = None) -> Llama:
    return quantize_model(load_gguf(path)[1], mode, head=head).eval()


def _logits(model: Llama) -> torch.Tensor:
    ids = torch.arange(3, 43).remainder(CONFIG.vocab_size)[None]
    with torch.no_grad():
        return torch.cat([model(ids), model(ids[:, :1])], dim=1)  # a prompt (GEMM) and one row (GEMV)


@pytest.mark.parametrize(("qtype", "mode", "tied"), [
    (Q.Q8_0, "int8", False), (Q.Q8_0, "int4", True), (Q.Q4_K, "int8", True), (Q.Q6_K, "int4", False),
    (Q.F32, "fp32", True), (Q.F32, "int8", False), (Q.Q4_1, "int8", False), (Q.Q4_0, "int8", True),
    (Q.Q8_0, "fp32", False), (Q.F16, "fp16", True), (Q.F16, "fp16", False), (Q.Q4_0, "fp16", False),
])
def test_direct_load_equals_dequantise_then_quantise(tmp_path: Path, qtype: Q, mode: str, tied: bool) -> None:
    path = _write(tmp_path, qtype, tied)
    direct = camelid.load(path, quantize=mode, tokenizer=False).model
    old = _old_path(path, mode)
    assert direct.quantized == old.quantized == mode
    mine, theirs = direct.state_dict(), old.state_dict()
    assert mine.keys() == theirs.keys()
    for k in theirs:
        assert mine[k].dtype == theirs[k].dtype and torch.equal(mine[k], theirs[k]), k
    assert torch.equal(_logits(direct), _logits(old))
    if tied and mode != "fp32":  # the int8/fp16 embedding reads the head's matrix, as quantize_model sets it up
        assert direct.tok_embeddings.table is direct.output
    if qtype == Q.F16:  # fp16 mode holds an F16 file's weights exactly
        file = _file_weights(path)
        assert torch.equal(direct.layers[0].feed_forward.w2.weight.float(), file["blk.0.ffn_down.weight"])


@pytest.mark.parametrize(("qtype", "mode"), [(Q.Q8_0, "int8"), (Q.F16, "fp16"), (Q.Q6_K, "int4"), (Q.Q4_1, "int4"),
                                           (Q.Q4_0, "int4")])
def test_slices_through_reused_buffers_give_the_same_model(tmp_path: Path, qtype: Q, mode: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # a few rows per slice (and q/k slices that cut through heads or hold one head): every slice read through
    # the file's reused buffers, each consumed before the next read
    path = _write(tmp_path, qtype)
    whole = camelid.load(path, quantize=mode, tokenizer=False).model.state_dict()
    monkeypatch.setattr(quantized, "ROWS_PER_SLICE", 3 * CONFIG.dim)
    monkeypatch.setattr(gguf_io, "INT4_BYTES_AT_ONCE", 1)
    sliced = camelid.load(path, quantize=mode, tokenizer=False).model.state_dict()
    for k in whole:
        assert torch.equal(sliced[k], whole[k]), k


def test_q4_0_scales_past_fp16_minimums_are_quantised_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Q4_0's minimum is -8 d: for |d| > 8188 that is no fp16, so the tensor is quantised from its values instead,
    # also when the first slices were already taken as they are
    torch.manual_seed(0)
    model = Llama(CONFIG).eval()
    with torch.no_grad():
        w2 = model.layers[0].feed_forward.w2.weight  # its last row's outer groups: d up to -2.5e4 (fp16 holds it)
        w2[-1] = torch.linspace(-2e5, 2e5, w2.shape[1])
    path = _write(tmp_path, Q.Q4_0, model=model)
    monkeypatch.setattr(gguf_io, "INT4_BYTES_AT_ONCE", 1)
    direct = camelid.load(path, quantize="int4", tokenizer=False).model
    old = _old_path(path, "int4", head="int4")
    w2, want = direct.layers[0].feed_forward.w2, old.layers[0].feed_forward.w2
    for part in ("qweight", "scale", "minimum"):
        assert torch.equal(getattr(w2, part), getattr(want, part)), part
    w1 = direct.layers[0].feed_forward.w13  # other tensors stay the file's blocks
    file = _file_weights(path)
    got = linear.dequantize_reference("int4", w1.qweight, w1.scale, w1.minimum)
    assert torch.equal(got, torch.cat([file["blk.0.ffn_gate.weight"], file["blk.0.ffn_up.weight"]]))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_qkv_biases_filled_in_place(tmp_path: Path, mode: str) -> None:
    # qwen2: the fused qkv product keeps its biases (an fp32 nn.Linear), filled row block by row block
    model = Llama(LlamaConfig.from_name("tiny-gqa", qkv_bias=True).replace(name="tiny-qwen2")).eval()
    for block in model.layers:
        for proj in (block.attention.wq, block.attention.wk, block.attention.wv):
            torch.nn.init.normal_(proj.bias)
    path = save_gguf(model, tmp_path / "qwen2.gguf", qtype="q8_0", progress=False)
    direct = camelid.load(path, quantize=mode, tokenizer=False).model
    old = _old_path(path, mode)
    theirs = old.state_dict()
    for k, t in direct.state_dict().items():
        assert torch.equal(t, theirs[k]), k
    ids = torch.arange(3, 20)[None]
    with torch.no_grad():
        assert torch.equal(direct(ids), old(ids))


def _file_weights(path: Path) -> dict[str, torch.Tensor]:
    """gguf-py's own dequantisation of the file's 2-D tensors, q/k rows in Hugging Face order."""
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), np.float32))
        heads = {"attn_q": CONFIG.n_heads, "attn_k": CONFIG.n_kv_heads}.get(t.name.split(".")[-2])
        out[t.name] = from_interleaved(w, heads) if heads else w
    return out


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1])
def test_q4_blocks_become_int4_exactly(tmp_path: Path, qtype: Q) -> None:
    path = _write(tmp_path, qtype)
    direct = camelid.load(path, quantize="int4", tokenizer=False).model
    file = _file_weights(path)
    for i, block in enumerate(direct.layers):
        att, ffn = block.attention, block.feed_forward
        parts = {"wqkv": ["attn_q", "attn_k", "attn_v"], "wo": ["attn_output"], "w13": ["ffn_gate", "ffn_up"],
                 "w2": ["ffn_down"]}
        for module, names in parts.items():
            lin = getattr(att, module, None) or getattr(ffn, module)
            assert isinstance(lin, Int4Linear)
            # q d + m in fp32 both ways: the products of 4-bit codes and fp16 scales are exact in fp32
            want = torch.cat([file[f"blk.{i}.{n}.weight"] for n in names])
            got = linear.dequantize_reference("int4", lin.qweight, lin.scale, lin.minimum)
            assert torch.equal(got, want), (i, module)
    # the untied Q4 head is taken as it is too, not rounded again to int8
    head = direct.output
    assert isinstance(head, Int4Linear)
    got = linear.dequantize_reference("int4", head.qweight, head.scale, head.minimum)
    assert torch.equal(got, file["output.weight"])
    # so the logits differ from the file's fp32 model only by the int8 embedding (measured 0.012 max at a logit
    # std of 0.31 with an int8 head as well)
    ref = _logits(load_gguf(path)[1])
    logits = _logits(direct)
    torch.testing.assert_close(logits, ref, atol=0.05, rtol=0)
    # the old path re-quantised the blocks from their values (group min/max -> a new scale and minimum). A Q4_1
    # group from gguf-py's quantiser holds codes 0 and 15, so that finds the same scale and minimum again; a
    # Q4_0 group (minimum -8 d, codes rarely reaching 15) does not, and gains a second rounding: measured 12x
    # the direct path's mean logit error
    old = _logits(_old_path(path, "int4", head="int4"))
    if qtype == Q.Q4_1:
        torch.testing.assert_close(logits, old, atol=1e-4, rtol=0)
    else:
        assert (old - ref).abs().mean() > 3 * (logits - ref).abs().mean()


def _in_mapping_of(t: torch.Tensor, path: Path) -> bool:
    """Whether the tensor's memory lies in a memory map of `path` (Linux's /proc/self/maps)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[5] == str(path.resolve()):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= t.data_ptr() < hi:
                return True
    return False


def test_weights_mapped_from_the_file_are_copy_on_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, Q.F32)
    before = path.read_bytes()
    model = camelid.load(path, quantize="fp32", tokenizer=False).model
    # a tiny model's tensors are all below the size that is mapped: copied, not mapped
    assert not _in_mapping_of(model.layers[0].attention.wo.weight, path)
    assert not _in_mapping_of(model.norm.weight, path)
    del model
    monkeypatch.setattr(gguf_io, "MAP_AT_LEAST", 0)
    model = camelid.load(path, quantize="fp32", tokenizer=False).model
    assert _in_mapping_of(model.layers[0].attention.wo.weight, path)  # left mapped, not moved to huge pages
    if hugepages.available():  # the fused products are built, not mapped: they are moved
        assert hugepages.huge_bytes(model.layers[0].attention.wqkv.weight) >= hugepages.HUGE_PAGE
    with torch.no_grad():
        model.layers[0].attention.wo.weight.add_(1.0)  # memory-mapped: the change stays in this process
        model.norm.weight.zero_()
    del model
    assert path.read_bytes() == before
    again = camelid.load(path, tokenizer=False).model
    with torch.no_grad():
        again.layers[1].feed_forward.w2.weight.mul_(2.0)
    assert path.read_bytes() == before


def test_missing_tensor_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    add = gguf.GGUFWriter.add_tensor

    def add_but_one(self: gguf.GGUFWriter, name: str, *args: object, **kwargs: object) -> None:
        if name != "blk.1.ffn_up.weight":
            add(self, name, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "add_tensor", add_but_one)
    path = _write(tmp_path, Q.Q8_0)
    with pytest.raises(CamelidError, match=r"missing tensor\(s\) layers.1.feed_forward.w3.weight") as e:
        camelid.load(path, quantize="int4", tokenizer=False)
    assert "\n" not in str(e.value)


def test_q8_0_rows_dequantise_as_the_gguf_library_does() -> None:
    """The C++ Q8_0 pass the loader uses gives the gguf library's values bit for bit: random codes and scales
    (subnormal, negative, +-inf and NaN scales included)."""
    mod = native.module()
    if mod is None:
        pytest.skip(f"no C++ kernels: {native.reason()}")
    rng = np.random.default_rng(3)
    rows, width = 37, 160
    blocks = rng.integers(0, 256, (rows, width // 32, 34), dtype=np.uint8)
    scales = np.array([1e-3, -2.5, 6e-8, 65504, np.inf, -np.inf, np.nan, 0.0], np.float16)
    blocks[:8, 0, :2] = scales.view(np.uint8).reshape(8, 2)
    data = blocks.reshape(rows, -1)
    want = torch.from_numpy(np.asarray(gguf.quants.dequantize(data, Q.Q8_0), np.float32))
    got = mod.dequant_q8_0(torch.from_numpy(data), width)
    assert got.shape == want.shape
    assert torch.equal(got.view(torch.int32)[~want.isnan()], want.view(torch.int32)[~want.isnan()])
    assert torch.equal(got.isnan(), want.isnan())


@pytest.mark.skipif(not hugepages.available(), reason="transparent huge pages are off (or not Linux)")
@pytest.mark.parametrize("qtype", [Q.F16, Q.Q8_0])
def test_fp16_matrices_are_written_into_huge_pages(tmp_path: Path, qtype: Q,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Written there in place, not copied afterwards (which would hold two copies at once)."""
    moved: list[int] = []
    move = hugepages.move_to_huge_pages
    monkeypatch.setattr(hugepages, "move_to_huge_pages", lambda *a, **k: moved.append(move(*a, **k)) or moved[-1])
    path = _write(tmp_path, qtype)
    model = camelid.load(path, quantize="fp16", tokenizer=False).model
    matrix = model.layers[0].feed_forward.w13.weight
    assert hugepages.huge_bytes(matrix) >= hugepages.HUGE_PAGE
    assert matrix.data_ptr() % hugepages.ALIGN == 0
    assert sum(moved) == 0  # (the layout on the meta device calls it, and it moves nothing)
