"""Meta's original checkpoints: params.json + consolidated.NN.pth, in and out.

Meta's reference code rotates interleaved pairs (x[2i], x[2i+1]) of each head, while camelid (like Hugging
Face) rotates the two halves (x[i], x[i + d/2]). The rotation is the same once the rows of wq and wk are
permuted, so loading undoes that permutation and saving applies it (`to_interleaved` / `from_interleaved`;
llama.cpp's GGUF files use the same interleaved order for llama, so `camelid.interop.gguf` uses them too).

Model-parallel checkpoints hold one shard per GPU, split the way Meta's fairscale layers split them:
column-parallel layers (wq, wk, wv, w1, w3, output) along the output dimension (dim 0), row-parallel
layers (wo, w2) along the input dimension (dim 1), the embedding along the model dimension (dim 1, Llama 1
and 2's ParallelEmbedding; Llama 3's VocabParallelEmbedding splits the vocabulary, dim 0, and is read too);
norms are replicated in every shard.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from camelid.config import LlamaConfig, RopeScaling
from camelid.errors import CamelidError
from camelid.fileio import atomic_write, atomic_write_text
from camelid.formats import read_json_object
from camelid.interop.hf import build_model, camelid_to_hf_name, plain_state_dict
from camelid.model import Llama

# Meta's reference implementations hard-code these for `use_scaled_rope` (Llama 3.1); Llama 3.2's
# llama-models code adds `rope_scaling_factor` (32 for the 1B/3B models).
META_ROPE_SCALING = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192)

_COLUMN_PARALLEL = ("attention.wq.", "attention.wk.", "attention.wv.", "feed_forward.w1.", "feed_forward.w3.")
_ROW_PARALLEL = ("attention.wo.", "feed_forward.w2.")

# ---------------------------------------------------------------------------------------------------
# rotary layout


def to_interleaved(w: Tensor, n_heads: int) -> Tensor:
    """Rows of a HF-layout q/k projection (halves rotated together) -> Meta/llama.cpp layout (pairs)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def from_interleaved(w: Tensor, n_heads: int, out: Tensor | None = None) -> Tensor:
    """Inverse of `to_interleaved`: Meta/llama.cpp q/k rows -> HF layout (written into `out` if given)."""
    rows = w.shape[0]
    v = w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2)
    if out is None:
        return v.reshape(w.shape)
    out.view(v.shape).copy_(v)
    return out


# ---------------------------------------------------------------------------------------------------
# params.json


def meta_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The SwiGLU width exactly as Meta's reference FeedForward computes it."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _ffn_params(dim: int, width: int) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) that make Meta's formula give `width` (published pairs first)."""
    for multiple_of, mult in ((256, None), (256, 1.3), (1024, 1.3), (4096, 1.3), (256, 1.5), (1024, 1.5),
                              (4096, 1.0), (1024, None), (128, None), (64, None), (32, None), (16, None)):
        if meta_ffn_dim(dim, multiple_of, mult) == width:
            return multiple_of, mult
    # always exact: ceil(x / width) == 1 for 0 < x <= width
    base = int(2 * (4 * dim) / 3)
    return width, (None if base <= width else width / base)


def config_from_params(params: dict[str, Any], vocab_size: int, source: str) -> LlamaConfig:
    """params.json (+ the vocabulary size from the embedding when params says -1) -> LlamaConfig."""
    for key in ("dim", "n_layers", "n_heads"):
        if key not in params:
            raise CamelidError(f"{source}: missing required field {key!r}; is this a Meta params.json?")
    numbers = {k: int for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "vocab_size",
                                "max_seq_len")} | {k: float for k in ("norm_eps", "rope_theta", "ffn_dim_multiplier",
                                                                       "rope_scaling_factor")}
    for key, kind in numbers.items():
        value = params.get(key)
        ok = isinstance(value, int) if kind is int else isinstance(value, int | float)
        if value is not None and (isinstance(value, bool) or not ok):
            raise CamelidError(f"{source}: {key} = {value!r} must be {'an integer' if kind is int else 'a number'}")
    if int(params.get("multiple_of", 256)) < 1:
        raise CamelidError(f"{source}: multiple_of = {params['multiple_of']} must be at least 1")
    dim, n_heads = int(params["dim"]), int(params["n_heads"])
    scaled = bool(params.get("use_scaled_rope", False))
    rope_scaling = None
    if scaled:
        rope_scaling = RopeScaling(factor=float(params.get("rope_scaling_factor") or META_ROPE_SCALING.factor),
                                   low_freq_factor=META_ROPE_SCALING.low_freq_factor,
                                   high_freq_factor=META_ROPE_SCALING.high_freq_factor,
                                   original_max_seq_len=META_ROPE_SCALING.original_max_seq_len)
    rope_theta = float(params.get("rope_theta", 10000.0))
    llama3 = vocab_size >= 128000
    # params.json has no context length: use each generation's published one unless it is given
    default_ctx = 131072 if scaled else 8192 if llama3 else 4096 if params.get("norm_eps") == 1e-5 else 2048
    try:
        return LlamaConfig(
            name=Path(source).parent.name or "meta",
            vocab_size=vocab_size,
            dim=dim,
            n_layers=int(params["n_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(params.get("n_kv_heads") or n_heads),
            intermediate_size=meta_ffn_dim(dim, int(params.get("multiple_of", 256)), params.get("ffn_dim_multiplier")),
            norm_eps=float(params.get("norm_eps", 1e-5)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_seq_len=int(params.get("max_seq_len") or default_ctx),
            bos_token_id=128000 if llama3 else 1,
            eos_token_id=([128001, 128008, 128009] if scaled else 128001) if llama3 else 2,
        )
    except CamelidError as e:
        raise CamelidError(f"{source}: {e}") from None
    except (OverflowError, ValueError) as e:  # e.g. ffn_dim_multiplier: Infinity
        raise CamelidError(f"{source}: a size field is out of range ({e}); fix or re-download params.json") from None


def params_from_config(config: LlamaConfig) -> dict[str, Any]:
    """LlamaConfig -> params.json, or a CamelidError for what Meta's format cannot express."""
    if config.qkv_bias:
        raise CamelidError("Meta checkpoints have no q/k/v biases (this is a Qwen2-style model); export to hf or gguf")
    if config.qk_norm or config.sliding_window is not None:
        what = "q/k norms (a Qwen3-style model)" if config.qk_norm else "a sliding attention window (Mistral-style)"
        raise CamelidError(f"Meta checkpoints have no {what}; export to hf or gguf")
    if config.head_dim != config.dim // config.n_heads:
        raise CamelidError(f"Meta checkpoints need head_dim = dim / n_heads, but this model has head_dim "
                           f"{config.head_dim}; export to hf or gguf instead")
    multiple_of, mult = _ffn_params(config.dim, config.intermediate_size)
    params: dict[str, Any] = {
        "dim": config.dim,
        "n_layers": config.n_layers,
        "n_heads": config.n_heads,
        "n_kv_heads": config.n_kv_heads,
        "vocab_size": config.vocab_size,
        "multiple_of": multiple_of,
        "ffn_dim_multiplier": mult,
        "norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
    }
    s = config.rope_scaling
    if s is not None:
        d = META_ROPE_SCALING
        if (s.low_freq_factor, s.high_freq_factor, s.original_max_seq_len) != (
                d.low_freq_factor, d.high_freq_factor, d.original_max_seq_len):
            raise CamelidError(
                f"Meta's use_scaled_rope fixes low/high frequency factors {d.low_freq_factor}/{d.high_freq_factor} "
                f"and original context {d.original_max_seq_len}, but this model uses {s.low_freq_factor}/"
                f"{s.high_freq_factor}/{s.original_max_seq_len}; export to hf or gguf instead"
            )
        params["use_scaled_rope"] = True
        if s.factor != d.factor:
            params["rope_scaling_factor"] = s.factor
    return params


# ---------------------------------------------------------------------------------------------------
# reading


def _shard_files(path: Path) -> list[Path]:
    files = sorted(path.glob("consolidated.*.pth"))
    if not files:
        raise CamelidError(f"{path}: no consolidated.*.pth next to params.json; copy the checkpoint shards here")
    return files


def _load_shard(file: Path) -> dict[str, Tensor]:
    try:
        sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files; the message is what matters
        raise CamelidError(f"{file}: cannot be read as a weights-only PyTorch checkpoint ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:120] if str(e) else ''}); re-download or re-save it") from None
    if not isinstance(sd, dict):
        raise CamelidError(f"{file}: holds a {type(sd).__name__}, not a state dict of tensors")
    return sd


def _merge_dim(name: str, shard: Tensor, dim: int) -> int | None:
    """The dimension a model-parallel tensor was split along; None when it is replicated."""
    if name.endswith("_norm.weight") or name == "norm.weight" or shard.ndim == 1:
        return None
    if name == "tok_embeddings.weight":
        return 0 if shard.shape[1] == dim else 1  # Llama 3 splits the vocabulary, Llama 1/2 the model dim
    if name == "output.weight" or any(p in name for p in _COLUMN_PARALLEL):
        return 0
    if any(p in name for p in _ROW_PARALLEL):
        return 1
    return None


def _meta_tensors(shards: list[dict[str, Tensor]], config: LlamaConfig, source: str) -> Iterator[tuple[str, Tensor]]:
    """Merge shards tensor by tensor, undo the rotary permutation, yield HF names for build_model."""
    for name in tqdm(list(shards[0]), desc=f"loading {Path(source).name}", unit="tensor", disable=None, leave=False):
        if name == "rope.freqs":  # Llama 1/2 store the (unscaled) rotary table; camelid computes it
            continue
        parts = [s.get(name) for s in shards]
        if any(p is None for p in parts):
            raise CamelidError(f"{source}: tensor {name!r} is missing from some shards; the checkpoint is incomplete")
        cat = _merge_dim(name, parts[0], config.dim)
        t = parts[0] if cat is None or len(parts) == 1 else torch.cat(parts, dim=cat)
        if name.endswith("attention.wq.weight"):
            t = from_interleaved(t, config.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = from_interleaved(t, config.n_kv_heads)
        try:
            hf_name = camelid_to_hf_name(name)  # Meta's names are camelid's
        except KeyError:
            raise CamelidError(f"{source}: unexpected tensor {name!r}; this is not a LLaMA checkpoint") from None
        yield hf_name, t


def load_meta_dir(path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                  device: torch.device | str = "cpu") -> tuple[LlamaConfig, Llama]:
    """Load a Meta checkpoint directory (params.json + consolidated.00.pth ...), merging model-parallel shards."""
    path = Path(path)
    params_file = path / "params.json"
    if not params_file.is_file():
        raise CamelidError(f"{path}: no params.json; is this a Meta checkpoint directory?")
    params = read_json_object(params_file)
    files = _shard_files(path)
    shards = [_load_shard(f) for f in files]
    emb = shards[0].get("tok_embeddings.weight")
    if emb is None:
        raise CamelidError(f"{files[0]}: no tok_embeddings.weight; this is not a LLaMA checkpoint")
    vocab = int(params.get("vocab_size", -1))
    if vocab <= 0:  # Llama 1/2 write -1: the tokenizer decides, and the embedding has its size
        vocab = emb.shape[0] * len(shards) if emb.shape[1] == params.get("dim") and len(shards) > 1 else emb.shape[0]
    config = config_from_params(params, vocab, str(params_file))
    # Meta's code never ties the head; a checkpoint saved from a tied model (Llama 3.2) has two equal copies
    out = shards[0].get("output.weight")
    if len(shards) == 1 and out is not None and out.shape == emb.shape and torch.equal(out, emb):
        config.tie_embeddings = True
    source = str(files[0]) if len(files) == 1 else f"{path} ({len(files)} model-parallel shards)"
    tensors = _meta_tensors(shards, config, source)
    if config.tie_embeddings:
        tensors = ((n, t) for n, t in tensors if n != "lm_head.weight")
    return config, build_model(config, tensors, source, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------------
# writing


def _split(name: str, t: Tensor, n: int, dim: int) -> list[Tensor]:
    cat = 1 if name == "tok_embeddings.weight" else _merge_dim(name, t, dim)  # Llama 2's ParallelEmbedding
    if cat is None or n == 1:
        return [t] * n
    if t.shape[cat] % n:
        raise CamelidError(f"cannot split {name} (shape {list(t.shape)}) into {n} model-parallel shards along "
                           f"dim {cat}; choose n_shards dividing {t.shape[cat]}")
    return list(t.chunk(n, dim=cat))


def save_meta_dir(model: Llama, path: str | os.PathLike, *, n_shards: int = 1,
                  dtype: torch.dtype | None = None) -> Path:
    """Write params.json and consolidated.NN.pth (n_shards model-parallel shards) in Meta's layout, atomically."""
    path = Path(path)
    config = model.config
    params = params_from_config(config)
    if n_shards < 1:
        raise CamelidError(f"n_shards must be >= 1, got {n_shards}")
    for what, n in (("n_heads", config.n_heads), ("n_kv_heads", config.n_kv_heads)):
        if n % n_shards:
            raise CamelidError(f"{what} {n} is not divisible by {n_shards} shards; choose n_shards dividing {n}")
    state = plain_state_dict(model)
    shards: list[dict[str, Tensor]] = [{} for _ in range(n_shards)]
    for name, t in state.items():
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        if name.endswith("attention.wq.weight"):
            t = to_interleaved(t, config.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = to_interleaved(t, config.n_kv_heads)
        for shard, part in zip(shards, _split(name, t, n_shards, config.dim), strict=True):
            shard[name] = part.clone()  # own storage: torch.save would otherwise write the whole tensor
    for i, shard in enumerate(shards):
        atomic_write(path / f"consolidated.{i:02d}.pth", lambda p, s=shard: torch.save(s, p))
    atomic_write_text(path / "params.json", json.dumps(params, indent=2) + "\n")
    return path


__all__ = ["META_ROPE_SCALING", "from_interleaved", "load_meta_dir", "meta_ffn_dim", "save_meta_dir",
           "to_interleaved"]
