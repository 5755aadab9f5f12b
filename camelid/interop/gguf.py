"""GGUF (llama.cpp's file format) in and out, through the `gguf` package that llama.cpp maintains.

Reading: the config comes from the `llama.*` (or `qwen2.*`) metadata, each tensor is dequantised on its
own (F32, F16, BF16, Q4_0 ... Q8_0, the K-quants and every other type `gguf.quants` knows) and handed to
`interop.hf.build_model` under its Hugging Face name, so peak memory is the model plus one tensor.
llama.cpp's converter stores llama's wq/wk rows in Meta's interleaved rotary order; we undo that (Qwen2 is
stored unpermuted). Writing is the reverse: f32, f16 or q8_0 (1-D tensors stay f32, as llama.cpp does).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from camelid.config import ConfigError, LlamaConfig, RopeScaling
from camelid.errors import CamelidError
from camelid.fileio import atomic_write
from camelid.formats import gguf_value, open_gguf
from camelid.interop.hf import build_model, hf_state_dict
from camelid.interop.meta import from_interleaved, to_interleaved
from camelid.model import Llama, rope_inv_freq

ARCHITECTURES = ("llama", "qwen2")  # qwen2 = the llama layout with q/k/v biases
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
          "ffn_down": "mlp.down_proj"}
_REV_TOP = {v: k for k, v in _TOP.items()}
_REV_BLOCK = {v: k for k, v in _BLOCK.items()}


def gguf_to_hf_name(name: str) -> str | None:
    """GGUF tensor name (blk.3.attn_q.weight) -> HF name (model.layers.3.self_attn.q_proj.weight)."""
    if name in _TOP:
        return _TOP[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _BLOCK:
        return f"model.layers.{parts[1]}.{_BLOCK[parts[2]]}.{parts[3]}"
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
        raise CamelidError(f"{source}: tensor {t.name} uses quantisation type {qtype.name}, which camelid cannot "
                           "dequantise; re-quantise the model to e.g. Q8_0, Q4_K or F16") from None
    shape = tuple(int(d) for d in reversed(t.shape))  # ggml lists the fastest-varying dimension first
    try:
        return np.asarray(data, dtype=np.float32).reshape(shape)
    except ValueError:
        raise CamelidError(f"{source}: tensor {t.name} holds {data.size} values but its shape is {list(shape)}; "
                           "the file is corrupt or truncated") from None


def _gguf_tensors(reader: gguf.GGUFReader, config: LlamaConfig, source: str) -> Iterator[tuple[str, Tensor]]:
    permuted = not config.qkv_bias  # llama.cpp permutes llama's q/k rows (and biases), not Qwen2's
    # a progress bar on terminals only (disable=None): an 8B model takes a minute to dequantise
    for t in tqdm(reader.tensors, desc=f"loading {Path(source).name}", unit="tensor", disable=None, leave=False):
        if t.name == "rope_freqs.weight":
            continue
        hf_name = gguf_to_hf_name(t.name)
        if hf_name is None:
            raise CamelidError(f"{source}: unexpected tensor {t.name!r} for a {config.n_layers}-layer llama model; "
                               "the file holds another architecture's weights")
        w = _dequantize(t, source)
        if t.tensor_type == gguf.GGMLQuantizationType.F32:
            w = w.copy()  # F32 "dequantises" to a view of the memory-mapped file; the model must own its weights
        w = torch.from_numpy(w)
        if permuted and ".q_proj." in hf_name:
            w = from_interleaved(w, config.n_heads)
        elif permuted and ".k_proj." in hf_name:
            w = from_interleaved(w, config.n_kv_heads)
        yield hf_name, w


def load_gguf(path: str | os.PathLike, *, dtype: torch.dtype | None = None,
              device: torch.device | str = "cpu") -> tuple[LlamaConfig, Llama]:
    """Read a llama/qwen2 GGUF file into a camelid model (dequantised to fp32, or to `dtype`)."""
    path = Path(path)
    reader = open_gguf(path)
    source = str(path)
    try:
        config = config_from_gguf(reader, source)
        model = build_model(config, _gguf_tensors(reader, config, source), source, dtype=dtype, device=device)
    except CamelidError:
        raise
    except (ValueError, IndexError, OSError, OverflowError, TypeError) as e:
        detail = " ".join(str(e).split())[:200]
        raise CamelidError(f"{source}: corrupt or truncated GGUF file ({type(e).__name__}: {detail}); "
                           "re-download or re-convert it") from None
    return config, model


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
    arch = "qwen2" if config.qkv_bias else "llama"
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


__all__ = ["ARCHITECTURES", "QTYPES", "config_from_gguf", "gguf_to_hf_name", "load_gguf", "read_metadata",
           "save_gguf"]
