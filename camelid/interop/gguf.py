"""GGUF (llama.cpp's file format) in and out, through the `gguf` package that llama.cpp maintains.

Reading: the config comes from the `{arch}.*` metadata (llama, qwen2, qwen3, phi3), each tensor is dequantised
on its own (F32, F16, BF16, Q4_0 ... Q8_0, the K-quants and every other type `gguf.quants` knows) and handed to
`interop.hf.build_model` under its Hugging Face name, so peak memory is the model plus one tensor.
llama.cpp's converter stores llama's wq/wk rows in Meta's interleaved rotary order; we undo that (the other
architectures are stored unpermuted; Phi-3's fused qkv and gate/up tensors are split by build_model).
Writing is the reverse: f32, f16 or q8_0 (1-D tensors stay f32, as llama.cpp does), as llama, qwen2 (q/k/v
biases) or qwen3 (q/k norms).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from camelid.config import ConfigError, LlamaConfig, RopeScaling
from camelid.errors import CamelidError
from camelid.fileio import atomic_write
from camelid.formats import gguf_module, gguf_value, open_gguf
from camelid.interop.hf import build_model, hf_state_dict, hf_to_camelid_name
from camelid.interop.meta import from_interleaved, to_interleaved
from camelid.model import Llama, rope_inv_freq
from camelid.ops import native

gguf = gguf_module()  # the reader's part: loading needs no more (the writer's names import the rest)

# the llama layout, with q/k/v biases (qwen2), q/k norms (qwen3), or fused qkv and gate/up tensors (phi3)
ARCHITECTURES = ("llama", "qwen2", "qwen3", "phi3")
QTYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
          "q8_0": gguf.GGMLQuantizationType.Q8_0}
# llama.cpp's LLAMA_FTYPE for the file as a whole ("general.file_type")
_FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
               "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}

_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
          "attn_qkv": "self_attn.qkv_proj"}
_REV_TOP = {v: k for k, v in _TOP.items()}
_REV_BLOCK = {v: k for k, v in _BLOCK.items()}


def gguf_to_hf_name(name: str, arch: str = "llama") -> str | None:
    """GGUF tensor name (blk.3.attn_q.weight) -> HF name (model.layers.3.self_attn.q_proj.weight)."""
    if name in _TOP:
        return _TOP[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _BLOCK:
        module = "mlp.gate_up_proj" if arch == "phi3" and parts[2] == "ffn_up" else _BLOCK[parts[2]]
        return f"model.layers.{parts[1]}.{module}.{parts[3]}"
    return None


def hf_to_gguf_name(name: str) -> str:
    if name in _REV_TOP:
        return _REV_TOP[name]
    parts = name.split(".")  # model.layers.N.<module>.<proj>.<weight|bias>
    return f"blk.{parts[2]}.{_REV_BLOCK['.'.join(parts[3:-1])]}.{parts[-1]}"


# ---------------------------------------------------------------------------------------------------
# reading


def _f32(x: Any) -> Any:
    """GGUF stores floats as float32: print them back as the decimal they were written from (1e-05, not 9.99e-06).
    Anything but a number is passed on for LlamaConfig to refuse."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return x
    return float(f"{float(x):.7g}")


# LlamaConfig fields under their GGUF keys ({arch}. in front), to name the file's own key in errors
GGUF_FIELD_NAMES = {"dim": "embedding_length", "n_layers": "block_count", "n_heads": "attention.head_count",
                    "n_kv_heads": "attention.head_count_kv", "head_dim": "attention.key_length",
                    "intermediate_size": "feed_forward_length", "norm_eps": "attention.layer_norm_rms_epsilon",
                    "rope_theta": "rope.freq_base", "max_seq_len": "context_length"}


def rope_scaling_from_freqs(factors: np.ndarray, config: LlamaConfig, source: str,
                            given: RopeScaling | None = None) -> RopeScaling:
    """llama.cpp stores Llama 3.1 scaling as a `rope_freqs` tensor of per-frequency divisors. camelid also writes
    the four parameters (camelid.rope.scaling.*); files from llama.cpp's converter get them recovered from the
    smooth band (low_freq_factor fixed at Meta's 1.0). Either way they must reproduce the tensor."""
    factors = factors.astype(np.float64).reshape(-1)
    factor = _f32(factors.max())
    base = rope_inv_freq(config.replace(rope_scaling=None)).double().numpy()
    wavelen = 2 * np.pi / base
    band = (factors > 1 + 1e-5) & (factors < factor - 1e-5)
    if given is not None:
        guess = given
    elif band.sum() >= 2:
        # in the band 1/f = 1/F + s (1 - 1/F), with s = orig/(high-low) / wavelen - low/(high-low)
        s = (1 / factors[band] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(1 / wavelen[band], s, 1)
        high = 1.0 - 1.0 / intercept
        guess = RopeScaling(factor=factor, low_freq_factor=1.0, high_freq_factor=float(f"{high:.4g}"),
                            original_max_seq_len=int(round(slope * (high - 1.0))))
    else:
        guess = RopeScaling(factor=factor)  # Meta's published 1 / 4 / 8192
    not_llama31 = CamelidError(f"{source}: rope_freqs are not Llama 3.1-style frequency scaling; camelid cannot "
                               "run this rotary variant")
    try:
        mine = base / rope_inv_freq(config.replace(rope_scaling=guess)).double().numpy()
    except CamelidError:  # the fit gave parameters no Llama 3.1 scaling has
        raise not_llama31 from None
    if not np.allclose(mine, factors, rtol=1e-4):
        raise not_llama31
    return guess


def config_from_gguf(reader: gguf.GGUFReader, source: str) -> LlamaConfig:
    arch = gguf_value(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise CamelidError(f"{source}: GGUF architecture {arch!r} is not supported; camelid loads "
                           f"{', '.join(ARCHITECTURES)}")

    def need(key: str) -> Any:
        value = gguf_value(reader, f"{arch}.{key}")
        if value is None:
            raise CamelidError(f"{source}: missing GGUF metadata {arch}.{key}; the file is incomplete, re-convert it")
        return value

    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise CamelidError(f"{source}: no token_embd.weight tensor; the file is incomplete, re-convert it")
    kind = gguf_value(reader, f"{arch}.rope.scaling.type", "none")
    if kind not in ("none", None):
        raise CamelidError(f"{source}: rope scaling type {kind!r} is not supported; camelid runs unscaled RoPE "
                           "and Llama 3.1 scaling")
    n_heads = need("attention.head_count")
    kv = gguf_value(reader, f"{arch}.attention.head_count_kv", n_heads)
    if isinstance(kv, list) or isinstance(n_heads, list):
        raise CamelidError(f"{source}: per-layer head counts are not supported")
    if any(name.startswith("rope_factors_") for name in tensors):
        raise CamelidError(f"{source}: LongRoPE frequency factors (rope_factors_long/short, Phi-3 128k) are not "
                           "supported; use the model's 4k-context version")
    try:
        config = LlamaConfig(
            name=source and Path(source).stem,
            vocab_size=int(tensors["token_embd.weight"].shape[-1]),  # ggml shape is [dim, vocab]
            dim=need("embedding_length"),
            n_layers=need("block_count"),
            n_heads=n_heads,
            n_kv_heads=kv,
            head_dim=gguf_value(reader, f"{arch}.attention.key_length"),
            intermediate_size=need("feed_forward_length"),
            norm_eps=_f32(need("attention.layer_norm_rms_epsilon")),
            rope_theta=_f32(gguf_value(reader, f"{arch}.rope.freq_base", 10000.0)),
            max_seq_len=gguf_value(reader, f"{arch}.context_length", 2048),
            tie_embeddings="output.weight" not in tensors,
            qkv_bias=arch == "qwen2",
            qk_norm=arch == "qwen3",
            sliding_window=gguf_value(reader, f"{arch}.attention.sliding_window") or None,
            bos_token_id=gguf_value(reader, "tokenizer.ggml.bos_token_id"),
            eos_token_id=gguf_value(reader, "tokenizer.ggml.eos_token_id"),
        )
    except ConfigError as e:  # name the file's own key
        key = f"{arch}.{GGUF_FIELD_NAMES[e.field]}" if e.field in GGUF_FIELD_NAMES else e.field
        raise CamelidError(f"{source}: {key} {e.problem}") from None
    rot = gguf_value(reader, f"{arch}.rope.dimension_count")
    if rot is not None and rot != config.head_dim:
        raise CamelidError(f"{source}: rotary embedding on {rot} of {config.head_dim} head dims (partial RoPE) is not "
                           "supported by camelid's llama model")
    if "rope_freqs.weight" in tensors:
        given = None
        key = "camelid.rope.scaling"
        if gguf_value(reader, f"{key}.factor") is not None:
            given = RopeScaling(*(_f32(gguf_value(reader, f"{key}.{k}"))
                                  for k in ("factor", "low_freq_factor", "high_freq_factor")),
                                original_max_seq_len=gguf_value(reader, f"{key}.original_context_length"))
            try:
                config.replace(rope_scaling=given)  # checked like every other field
            except CamelidError as e:
                raise CamelidError(f"{source}: {key}: {e}") from None
        config.rope_scaling = rope_scaling_from_freqs(_dequantize(tensors["rope_freqs.weight"], source), config,
                                                      source, given)
    return config


def _dequantize(t: Any, source: str) -> np.ndarray:
    qtype = gguf.GGMLQuantizationType(t.tensor_type)
    try:
        data = gguf.quants.dequantize(t.data, qtype)
    except NotImplementedError:
        raise _unknown_type(t, source) from None
    shape = tuple(int(d) for d in reversed(t.shape))  # ggml lists the fastest-varying dimension first
    try:
        return np.asarray(data, dtype=np.float32).reshape(shape)
    except ValueError:
        raise CamelidError(f"{source}: tensor {t.name} holds {data.size} values but its shape is {list(shape)}; "
                           "the file is corrupt or truncated") from None


def _unknown_type(t: Any, source: str) -> CamelidError:
    return CamelidError(f"{source}: tensor {t.name} uses quantisation type {t.tensor_type.name}, which camelid cannot "
                        "dequantise; re-quantise the model to e.g. Q8_0, Q4_K or F16")


_Q4 = (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1)
# smaller F32 tensors (norms, biases) are copied: a mapped one costs the kernel's fault-around of file pages
# (64 KiB of resident memory for a 2 KiB norm, 4 MiB for SmolLM2's 61 norms)
MAP_AT_LEAST = 1 << 20
INT4_BYTES_AT_ONCE = 1 << 20  # Q4_0/Q4_1 bytes taken into int4 at a time


def _built_kernels() -> Any:
    """camelid's C++ kernels where they are already built for this CPU (a load never waits for a build)."""
    mod = native.loaded()
    if mod is None and (native.build_dir() / "ready").is_file():
        mod = native.module()
    return mod


class TensorFile:
    """The tensors of one GGUF file, read with plain reads (the pages of the file never stay mapped into the
    process, so a converted tensor costs its result only) or, for F32 tensors used as stored, memory-mapped
    copy-on-write (shared with the page cache, never copied)."""

    def __init__(self, reader: Any, source: str) -> None:
        self.path, self.source = Path(reader.data.filename), source
        self.native_order = reader.byte_order == "I"
        self._file = open(self.path, "rb", buffering=0)  # noqa: SIM115 - closed with the last tensor read
        self._map: np.ndarray | None = None
        self._scratch = np.empty(0, dtype=np.uint8)
        self._buffers: dict[tuple[str, torch.dtype], Tensor] = {}  # see `buffer`
        self.kernels = _built_kernels()  # decided once per file (finding the build hashes the kernels' sources)

    def read(self, offset: int, size: int, scratch: bool = False) -> np.ndarray:
        """`size` bytes at `offset`; scratch=True: into a buffer reused by the next such read (for bytes that are
        converted at once: fresh pages for every slice of an 8 GB file cost more than reading it)."""
        if scratch:
            if self._scratch.size < size:
                self._scratch = np.empty(size, dtype=np.uint8)
            out = self._scratch[:size]
        else:
            out = np.empty(size, dtype=np.uint8)
        view, done = memoryview(out), 0
        while done < size:  # one read returns at most ~2 GiB
            self._file.seek(offset + done)
            n = self._file.readinto(view[done:])
            if not n:
                raise CamelidError(f"{self.source}: corrupt or truncated GGUF file (it ends inside a tensor); "
                                   "re-download or re-convert it")
            done += n
        return out

    def buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """A `dtype` buffer of `shape` reused by the next call with the same name and dtype: its pages are faulted
        in once per file, not once per slice."""
        n = math.prod(shape)
        buf = self._buffers.get((name, dtype))
        if buf is None or buf.numel() < n:
            buf = self._buffers[name, dtype] = torch.empty(n, dtype=dtype)
        return buf[:n].view(shape)

    def mapped(self, offset: int, count: int) -> np.ndarray:
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="c")
        return self._map[offset:offset + 4 * count].view(np.float32)

    def close(self) -> None:
        self._file.close()  # the memory map stays while tensors use it


class GGUFTensor:
    """Rows [row0, row0 + shape[0]) of one tensor of a GGUF file, converted on demand
    (camelid.variants.quantized.StoredWeight): fp32 rows, the exact int4 form of Q4_0/Q4_1 blocks, or a memory
    map of an F32 tensor. `heads`: llama's q/k rows are stored in Meta's interleaved rotary order; undone here."""

    def __init__(self, file: TensorFile, t: Any, heads: int | None = None, row0: int = 0,
                 rows: int | None = None) -> None:
        self.file, self.t, self.heads, self.row0 = file, t, heads, row0
        self.qtype = gguf.GGMLQuantizationType(t.tensor_type)
        full = tuple(int(d) for d in reversed(t.shape))  # ggml lists the fastest-varying dimension first
        self.full_rows = full[0] if len(full) > 1 else 1
        self.shape = (rows if rows is not None else full[0], *full[1:]) if len(full) > 1 else full
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        width = full[-1]
        if width % block:
            raise CamelidError(f"{file.source}: tensor {t.name} of shape {list(full)} does not fit its "
                               f"{self.qtype.name} blocks; the file is corrupt")
        self.row_bytes = width // block * size

    def rows_of(self, start: int, stop: int, scratch: bool = False) -> np.ndarray:
        """Stored bytes of rows [start, stop) (of this slice) as uint8 [rows, row_bytes] (scratch: TensorFile.read)."""
        a = self.row0 + start
        data = self.file.read(int(self.t.data_offset) + a * self.row_bytes, (stop - start) * self.row_bytes, scratch)
        return data.reshape(stop - start, self.row_bytes)

    def _dequantize(self, a: int, b: int, scratch: bool = False) -> Tensor:
        if self.qtype == gguf.GGMLQuantizationType.Q8_0 and len(self.shape) == 2 and self.file.native_order:
            mod = self.file.kernels
            if mod is not None:  # the same values as the gguf library's, in one pass
                out = self.file.buffer("dequantised", (b - a, self.shape[1]), torch.float32) if scratch else None
                return mod.dequant_q8_0(torch.from_numpy(self.rows_of(a, b, scratch=True)), self.shape[1], out=out)
        try:
            return torch.from_numpy(np.asarray(gguf.quants.dequantize(self.rows_of(a, b), self.qtype), np.float32))
        except NotImplementedError:
            raise _unknown_type(self.t, self.file.source) from None

    def _rows(self, start: int, stop: int | None, read: Callable[[int, int], Tensor], scratch: bool) -> Tensor:
        """Rows [start, stop) through `read(a, b)` of stored rows, whole heads read and put back in order (into a
        reused buffer with `scratch`)."""
        stop = self.shape[0] if stop is None else stop
        a, b = start, stop
        if self.heads is not None:  # whole heads, so that their rows can be put back in order
            per = self.full_rows // self.heads
            a, b = a // per * per, -(-b // per) * per
        w = read(a, b)
        if self.heads is not None:
            out = self.file.buffer("ordered", tuple(w.shape), w.dtype) if scratch else None
            w = from_interleaved(w, (b - a) // (self.full_rows // self.heads), out)[start - a:stop - a]
        return w if w.is_contiguous() else w.contiguous()

    def fp32(self, start: int = 0, stop: int | None = None, scratch: bool = False) -> Tensor:
        if len(self.shape) == 1:  # a vector (a norm, a bias) is one stored row
            w = self._dequantize(0, 1).reshape(self.shape)
            return w if self.heads is None else from_interleaved(w, self.heads)
        return self._rows(start, stop, lambda a, b: self._dequantize(a, b, scratch), scratch)

    def f16(self, start: int = 0, stop: int | None = None) -> Tensor | None:
        if self.qtype != gguf.GGMLQuantizationType.F16 or len(self.shape) != 2 or not self.file.native_order:
            return None
        return self._rows(start, stop, lambda a, b: torch.from_numpy(self.rows_of(a, b, True).view(np.float16)), True)

    def mapped(self) -> Tensor | None:
        if self.qtype != gguf.GGMLQuantizationType.F32 or self.heads is not None or not self.file.native_order:
            return None
        count = int(np.prod(self.shape))
        if 4 * count < MAP_AT_LEAST:
            return None
        data = self.file.mapped(int(self.t.data_offset) + self.row0 * self.row_bytes, count)
        return torch.from_numpy(data).view(self.shape)

    def int4(self, out: tuple[Tensor, Tensor, Tensor]) -> bool:
        """Q4_1 blocks are (fp16 scale d, fp16 minimum m, 16 bytes of codes: byte j = code j | code j+16 << 4),
        weight = q d + m: Int4Linear's format exactly. Q4_0 is the same with m = -8 d (exact in fp16). Written into
        `out` (packed codes [N, K/2], scale and minimum [N, K/32]) a slice of rows at a time from the reused read
        buffer; False, with `out` partly written, where that is not exact."""
        if self.qtype not in _Q4 or len(self.shape) != 2 or not self.file.native_order:
            return False
        n, k = self.shape
        per = self.full_rows // self.heads if self.heads is not None else 1  # slices of whole heads
        step = max(per, INT4_BYTES_AT_ONCE // self.row_bytes // per * per)
        for a in range(0, n, step):
            b = min(n, a + step)
            blocks = self.rows_of(a, b, scratch=True).reshape(b - a, k // 32, -1)
            scale = blocks[..., 0:2].view(np.float16)[..., 0]
            if self.qtype == gguf.GGMLQuantizationType.Q4_1:
                minimum, codes = blocks[..., 2:4].view(np.float16)[..., 0], blocks[..., 4:]
            else:
                with np.errstate(over="ignore"):
                    minimum = scale * np.float16(-8)
                if not np.isfinite(minimum).all():  # |d| > 8188: re-quantise from the values instead
                    return False
                codes = blocks[..., 2:]
            for part, dest in zip((codes, scale, minimum), out, strict=True):
                rows = dest[a:b].view(part.shape)
                if self.heads is None:
                    rows.copy_(torch.from_numpy(part))
                else:
                    from_interleaved(torch.from_numpy(part), (b - a) // per, out=rows)
        return True


def _stored_tensors(reader: gguf.GGUFReader, config: LlamaConfig, source: str) -> Iterator[tuple[str, GGUFTensor]]:
    """The file's tensors under Hugging Face names, unconverted; Phi-3's fused qkv and gate/up tensors as row
    slices of the stored tensor."""
    arch = gguf_value(reader, "general.architecture")
    permuted = arch == "llama"  # llama.cpp permutes llama's q/k rows (and biases), no other architecture's
    file = TensorFile(reader, source)
    q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    # a progress bar on terminals only (disable=None): an 8B model takes a minute to convert
    for t in tqdm(reader.tensors, desc=f"loading {Path(source).name}", unit="tensor", disable=None, leave=False):
        if t.name == "rope_freqs.weight":
            continue
        hf_name = gguf_to_hf_name(t.name, arch)
        if permuted and hf_name is not None and ".qkv_proj." in hf_name:
            raise CamelidError(f"{source}: a fused {t.name} in a llama-architecture file is not supported; "
                               "convert the model with separate attn_q/attn_k/attn_v tensors")
        if hf_name is None:
            raise CamelidError(f"{source}: unexpected tensor {t.name!r} for a {config.n_layers}-layer llama model; "
                               "the file holds another architecture's weights")
        heads = None
        if permuted and ".q_proj." in hf_name:
            heads = config.n_heads
        elif permuted and ".k_proj." in hf_name:
            heads = config.n_kv_heads
        rows = int(t.shape[-1]) if len(t.shape) > 1 else 0
        if hf_name.endswith(".self_attn.qkv_proj.weight") and rows == q + 2 * kv:
            for part, (a, n) in zip(("q_proj", "k_proj", "v_proj"), ((0, q), (q, kv), (q + kv, kv)), strict=True):
                yield hf_name.replace("qkv_proj", part), GGUFTensor(file, t, None, a, n)
        elif hf_name.endswith(".mlp.gate_up_proj.weight") and rows == 2 * config.intermediate_size:
            n = config.intermediate_size
            yield hf_name.replace("gate_up_proj", "gate_proj"), GGUFTensor(file, t, None, 0, n)
            yield hf_name.replace("gate_up_proj", "up_proj"), GGUFTensor(file, t, None, n, n)
        else:
            yield hf_name, GGUFTensor(file, t, heads)
    file.close()


def _gguf_tensors(reader: gguf.GGUFReader, config: LlamaConfig, source: str) -> Iterator[tuple[str, Tensor]]:
    """The file's tensors under Hugging Face names, one at a time in fp32 (F32 ones memory-mapped), each
    dequantised a block of rows at a time into its fp32 tensor (gguf's numpy dequantisation makes several
    temporaries of its input's size: for the embedding, hundreds of MB at once)."""
    for name, w in _stored_tensors(reader, config, source):
        t = w.mapped()
        if t is None and len(w.shape) == 2 and w.shape[0] > _ROWS_AT_A_TIME:
            t = torch.empty(tuple(w.shape), dtype=torch.float32)
            for a in range(0, w.shape[0], _ROWS_AT_A_TIME):
                b = min(a + _ROWS_AT_A_TIME, w.shape[0])
                t[a:b] = w.fp32(a, b)
        yield name, t if t is not None else w.fp32()


_ROWS_AT_A_TIME = 4096


def _head_mode(reader: gguf.GGUFReader, config: LlamaConfig, quantize: str) -> str | None:
    """An untied Q4_0/Q4_1 output head stays int4 in int4 mode: its blocks are taken as they are (exact, and 0.63
    bytes per weight to read each token instead of 1), where the default int8 head would round them again. None:
    the default."""
    if quantize != "int4" or config.tie_embeddings:
        return None
    head = next((t for t in reader.tensors if t.name == "output.weight"), None)
    return "int4" if head is not None and head.tensor_type in _Q4 else None


def load_gguf(path: str | os.PathLike, *, dtype: torch.dtype | None = None,
              device: torch.device | str = "cpu", quantize: str | None = None) -> tuple[LlamaConfig, Llama]:
    """Read a llama/qwen2/qwen3/phi3 GGUF file into a camelid model: the reference model (dequantised to fp32,
    or to `dtype`), or with `quantize` ("fp32", "fp16", "int8", "int4") the model `quantize_model` makes, built
    tensor by tensor without an fp32 copy (Q4_0/Q4_1 blocks become int4 and F16 tensors fp16 as they are; F32
    tensors are memory-mapped)."""
    path = Path(path)
    reader = open_gguf(path)
    source = str(path)
    try:
        config = config_from_gguf(reader, source)
        for key in [k for k in reader.fields if k.startswith("tokenizer.")]:
            del reader.fields[key]  # the vocabulary's parsed arrays (tens of MiB): not needed for the weights
        direct = quantize is not None and torch.device(device).type == "cpu" and dtype in (None, torch.float32)
        if direct:
            from camelid.variants.quantized import load_stored

            tensors = ((hf_to_camelid_name(n), w) for n, w in _stored_tensors(reader, config, source))
            model = load_stored(config, quantize, tensors, source, head=_head_mode(reader, config, quantize))
        else:
            model = build_model(config, _gguf_tensors(reader, config, source), source, dtype=dtype, device=device)
            if quantize is not None:
                from camelid.variants.quantized import quantize_model

                quantize_model(model, quantize)
    except CamelidError:
        raise
    except (ValueError, IndexError, OSError, OverflowError, TypeError) as e:
        detail = " ".join(str(e).split())[:200]
        raise CamelidError(f"{source}: corrupt or truncated GGUF file ({type(e).__name__}: {detail}); "
                           "re-download or re-convert it") from None
    return config, model


def read_gguf_tensors(path: str | os.PathLike) -> tuple[LlamaConfig, Iterator[tuple[str, Tensor]]]:
    """The config and a stream of the file's tensors under Hugging Face names, dequantised one at a time to fp32,
    for callers that convert each tensor as it arrives (e.g. a quantised base for QLoRA)."""
    path = Path(path)
    reader = open_gguf(path)
    config = config_from_gguf(reader, str(path))
    for key in [k for k in reader.fields if k.startswith("tokenizer.")]:
        del reader.fields[key]  # the vocabulary's parsed arrays (tens of MiB): not needed for the weights
    return config, _gguf_tensors(reader, config, str(path))


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """All key/values of a GGUF file except the (long) vocabulary arrays, for inspection and tests."""
    reader = open_gguf(path)
    return {k: gguf_value(reader, k) for k in reader.fields
            if k not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                         "tokenizer.ggml.scores")}


# ---------------------------------------------------------------------------------------------------
# writing


def _to_numpy(t: Tensor) -> np.ndarray:
    return t.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()


def _encode(name: str, w: np.ndarray, qtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """One tensor in the requested type; 1-D tensors (norms, biases) and rows that do not fill a q8_0 block stay
    f32/f16 as in llama.cpp's converter."""
    if w.ndim == 1 or qtype == "f32":
        return w, gguf.GGMLQuantizationType.F32
    if qtype == "q8_0" and w.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return w.astype(np.float16), gguf.GGMLQuantizationType.F16


def _rope_freqs(config: LlamaConfig) -> np.ndarray:
    """llama.cpp's form of Llama 3.1 scaling: the divisor of every rotary frequency."""
    base = rope_inv_freq(config.replace(rope_scaling=None))
    return (base / rope_inv_freq(config)).float().numpy()


def save_gguf(model: Llama, path: str | os.PathLike, *, tokenizer: Any = None, qtype: str = "f32",
              progress: bool = True) -> Path:
    """Write `model` as a GGUF file llama.cpp runs (f32, f16 or q8_0), atomically.

    The vocabulary comes from `tokenizer.write_gguf(writer)` (a camelid Tokenizer). llama.cpp refuses files
    without a vocabulary; camelid reads them.
    """
    if qtype not in QTYPES:
        raise CamelidError(f"unknown GGUF type {qtype!r}; choose one of {', '.join(QTYPES)}")
    path = Path(path)
    config = model.config
    tensors = hf_state_dict(model)  # refuses a fused model before anything is written
    if config.qkv_bias and config.qk_norm:
        raise CamelidError("llama.cpp has no architecture with both q/k/v biases and q/k norms; export to hf")
    arch = "qwen3" if config.qk_norm else "qwen2" if config.qkv_bias else "llama"
    writer = gguf.GGUFWriter(path=None, arch=arch)
    writer.add_name(config.name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_file_type(_FILE_TYPES[qtype])
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    if config.sliding_window is not None:
        writer.add_sliding_window(config.sliding_window)
    if tokenizer is not None:
        tokenizer.write_gguf(writer)
    else:
        if config.bos_token_id is not None:
            writer.add_bos_token_id(config.bos_token_id)
        eos = config.eos_token_id
        if eos is not None:
            writer.add_eos_token_id(eos[0] if isinstance(eos, list) else eos)

    permuted = arch == "llama"
    if config.rope_scaling is not None:
        writer.add_tensor("rope_freqs.weight", _rope_freqs(config))  # what llama.cpp applies
        sc = config.rope_scaling  # and the parameters themselves, so camelid reads back the same config
        writer.add_float32("camelid.rope.scaling.factor", sc.factor)
        writer.add_float32("camelid.rope.scaling.low_freq_factor", sc.low_freq_factor)
        writer.add_float32("camelid.rope.scaling.high_freq_factor", sc.high_freq_factor)
        writer.add_uint32("camelid.rope.scaling.original_context_length", sc.original_max_seq_len)
    for hf_name, t in tensors.items():
        w = _to_numpy(t)
        if permuted and ".q_proj." in hf_name:
            w = to_interleaved(torch.from_numpy(w), config.n_heads).numpy()
        elif permuted and ".k_proj." in hf_name:
            w = to_interleaved(torch.from_numpy(w), config.n_kv_heads).numpy()
        data, raw = _encode(hf_name, w, qtype)
        writer.add_tensor(hf_to_gguf_name(hf_name), data, raw_dtype=raw)

    def write(tmp: Path) -> None:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.close()

    atomic_write(path, write)
    return path


__all__ = ["ARCHITECTURES", "QTYPES", "config_from_gguf", "gguf_to_hf_name", "load_gguf", "read_gguf_tensors",
           "read_metadata", "save_gguf"]
