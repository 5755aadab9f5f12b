"""Hugging Face interop: config.json <-> LlamaConfig, HF weight names <-> camelid's, directories in and out.

This is the only module that knows Hugging Face's weight names. Other formats (GGUF, Meta) convert to HF
names and a HF config dict first, then come through here, so there is one mapping to trust.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from camelid.config import ConfigError, LlamaConfig, RopeScaling
from camelid.errors import CamelidError
from camelid.fileio import atomic_write, atomic_write_text
from camelid.formats import read_json_object
from camelid.model import Llama, rope_inv_freq

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

# ---------------------------------------------------------------------------------------------------
# config.json


# camelid's LlamaConfig fields under their config.json names, to name the file's own key in errors
HF_FIELD_NAMES = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
                  "n_kv_heads": "num_key_value_heads", "norm_eps": "rms_norm_eps",
                  "max_seq_len": "max_position_embeddings", "tie_embeddings": "tie_word_embeddings",
                  "rope_scaling.original_max_seq_len": "rope_scaling.original_max_position_embeddings"}
_CAMELID_NAME = re.compile(r"\b(" + "|".join(re.escape(k) for k in HF_FIELD_NAMES) + r")\b")


def config_from_hf(d: dict[str, Any], source: str = "config.json") -> LlamaConfig:
    """Map a Hugging Face LlamaForCausalLM config.json dict to a LlamaConfig, or say what is wrong (every field is
    checked for type and range by LlamaConfig; errors name config.json's own keys)."""
    if not isinstance(d, dict):
        raise CamelidError(f"{source}: holds a JSON {type(d).__name__}, not an object; fix or re-download it")
    archs = d.get("architectures") or []
    archs = archs if isinstance(archs, list) else [archs]
    model_type = d.get("model_type", "llama")
    if model_type not in ("llama", "mistral", "qwen2") or (archs and archs[0] not in SUPPORTED_ARCHITECTURES):
        name = archs[0] if archs else model_type
        raise CamelidError(
            f"{source}: architecture {name!r} is not supported; camelid loads {', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    def need(key: str) -> Any:
        if key not in d or d[key] is None:
            raise CamelidError(f"{source}: missing required field {key!r}; add it to the config")
        return d[key]

    if d.get("mlp_bias"):
        raise CamelidError(f"{source}: mlp_bias=true is not supported (no released LLaMA uses it)")
    if d.get("attention_bias") and model_type != "qwen2":
        raise CamelidError(f"{source}: attention_bias=true is not supported (no released LLaMA uses it)")
    if model_type == "mistral" and d.get("sliding_window"):
        raise CamelidError(f"{source}: sliding-window attention is not supported; set sliding_window to null")

    rope_theta = d.get("rope_theta")
    # transformers >= 5 may write rope settings under "rope_parameters"
    params = d.get("rope_parameters")
    scaling = d.get("rope_scaling") or (params if isinstance(params, dict) else None)
    if scaling is not None and not isinstance(scaling, dict):
        raise CamelidError(f"{source}: rope_scaling = {scaling!r} must be an object or null")
    if scaling and rope_theta is None:
        rope_theta = scaling.get("rope_theta")
    rope_scaling = None
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "llama3":
            rope_scaling = RopeScaling(
                factor=scaling.get("factor"),
                low_freq_factor=scaling.get("low_freq_factor", 1.0),
                high_freq_factor=scaling.get("high_freq_factor", 4.0),
                original_max_seq_len=scaling.get("original_max_position_embeddings", 8192),
            )
        elif kind != "default":
            raise CamelidError(f"{source}: rope_scaling type {kind!r} is not supported; camelid supports 'llama3'")

    n_heads = need("num_attention_heads")
    try:
        return LlamaConfig(
            name=str(d.get("_name_or_path") or "custom"),
            vocab_size=need("vocab_size"),
            dim=need("hidden_size"),
            n_layers=need("num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=d.get("num_key_value_heads") or n_heads,
            head_dim=d.get("head_dim"),
            intermediate_size=need("intermediate_size"),
            norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta if rope_theta is not None else 10000.0,
            rope_scaling=rope_scaling,
            max_seq_len=d.get("max_position_embeddings", 2048),
            tie_embeddings=d.get("tie_word_embeddings", False),
            qkv_bias=model_type == "qwen2",
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
        )
    except ConfigError as e:  # name config.json's keys, not camelid's
        field = HF_FIELD_NAMES.get(e.field, e.field)
        problem = _CAMELID_NAME.sub(lambda m: HF_FIELD_NAMES[m.group(1)], e.problem)
        raise CamelidError(f"{source}: {field} {problem}") from None


def config_to_hf(cfg: LlamaConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    """LlamaConfig -> a config.json dict that transformers' LlamaForCausalLM (or Qwen2) loads."""
    qwen = cfg.qkv_bias
    d: dict[str, Any] = {
        "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen else "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "torch_dtype": torch_dtype,
        "use_cache": True,
    }
    if qwen:
        del d["attention_bias"], d["mlp_bias"], d["head_dim"]
        d["use_sliding_window"] = False
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        d["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_seq_len,
        }
    return d


# ---------------------------------------------------------------------------------------------------
# weight names

_LAYER_MAP = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_TOP_MAP = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
            "lm_head.weight": "output.weight"}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def hf_to_camelid_name(name: str) -> str | None:
    """HF tensor name -> camelid parameter name; None for tensors we do not keep (e.g. rotary inv_freq)."""
    if name in _TOP_MAP:
        return _TOP_MAP[name]
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _LAYER_MAP:
        return f"layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}.{m.group(3)}"
    if name.endswith("rotary_emb.inv_freq"):
        return None
    return name  # unknown: reported by build_model as unexpected


_REVERSE_TOP = {v: k for k, v in _TOP_MAP.items()}
_REVERSE_LAYER = {v: k for k, v in _LAYER_MAP.items()}
_CAMELID_LAYER_RE = re.compile(r"layers\.(\d+)\.(.+)\.(weight|bias)$")


def camelid_to_hf_name(name: str) -> str:
    if name in _REVERSE_TOP:
        return _REVERSE_TOP[name]
    m = _CAMELID_LAYER_RE.match(name)
    if not m or m.group(2) not in _REVERSE_LAYER:
        raise KeyError(name)
    return f"model.layers.{m.group(1)}.{_REVERSE_LAYER[m.group(2)]}.{m.group(3)}"


# ---------------------------------------------------------------------------------------------------
# building a model from tensors


def build_model(
    config: LlamaConfig,
    tensors: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]],
    source: str,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> Llama:
    """Assemble a Llama from HF-named tensors without allocating twice; every mismatch is a one-line error.

    `tensors` may be a dict or a stream of (name, tensor) pairs: GGUF and Meta readers yield one converted
    tensor at a time, so peak memory is the model plus one tensor in flight.
    """
    with torch.device("meta"):
        model = Llama(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state: dict[str, Tensor] = {}
    pairs = tensors.items() if isinstance(tensors, Mapping) else tensors
    for hf_name, t in pairs:
        name = hf_to_camelid_name(hf_name)
        if name is None:
            continue
        if name not in expected:
            raise CamelidError(f"{source}: unexpected tensor {hf_name!r}; it does not belong to a "
                               f"{config.n_layers}-layer LlamaForCausalLM (is config.json for another model?)")
        if tuple(t.shape) != tuple(expected[name]):
            raise CamelidError(f"{source}: tensor {hf_name!r} has shape {list(t.shape)} but config.json implies "
                               f"{list(expected[name])}; the weights and the config do not belong together")
        state[name] = t.to(device=device, dtype=dtype or (t.dtype if t.is_floating_point() else torch.float32))
    if config.tie_embeddings and "tok_embeddings.weight" in state:
        state["output.weight"] = state["tok_embeddings.weight"]
    missing = [camelid_to_hf_name(k) for k in expected if k not in state]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CamelidError(f"{source}: missing tensor(s) {', '.join(missing[:3])}{more}; the checkpoint is incomplete "
                           "or belongs to a different config")
    model.load_state_dict(state, assign=True, strict=True)
    model.tie_weights()
    model.rope.inv_freq = rope_inv_freq(config, device=device)
    return model


# ---------------------------------------------------------------------------------------------------
# directories


def read_config(path: Path) -> dict[str, Any]:
    file = path / "config.json"
    if not file.is_file():
        raise CamelidError(f"{path}: no config.json; is this a Hugging Face model directory?")
    return read_json_object(file)


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a Hugging Face folder (its shard index's, else model.safetensors or every
    *.safetensors; a legacy pytorch_model.bin last), each checked to exist."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = [str(f) for f in dict.fromkeys(read_json_object(index)["weight_map"].values())]
        except (KeyError, AttributeError, TypeError) as e:
            raise CamelidError(f"{index}: unreadable shard index ({type(e).__name__}: {e}); re-download it") from None
        if any(Path(f).name != f for f in names):
            raise CamelidError(f"{index}: a shard name is a path, not a file name in this folder; re-download it")
        files = [path / f for f in names]
        for f in files:
            if not f.is_file():
                raise CamelidError(f"{index}: lists shard {f.name} which is missing; download every shard")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(path.glob("*.safetensors"))
    if found:
        return found
    if (path / "pytorch_model.bin").is_file():
        return [path / "pytorch_model.bin"]
    raise CamelidError(f"{path}: no model.safetensors (or shard index) found next to config.json")


def iter_tensors(file: Path) -> Iterator[tuple[str, Tensor]]:
    """Yield (name, tensor) from a safetensors file (or a legacy .bin, loaded with weights_only=True)."""
    if file.suffix == ".bin":
        try:
            sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 - torch raises many types here; the message is what matters
            raise CamelidError(f"{file}: cannot be read as a weights-only PyTorch file ({type(e).__name__})") from None
        yield from sd.items()
        return
    try:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                yield name, f.get_tensor(name)
    except (SafetensorError, OSError) as e:
        raise CamelidError(f"{file}: corrupt or truncated safetensors file ({e}); re-download or re-save it") from None


def load_hf_dir(path: str | os.PathLike, dtype: torch.dtype | None = None,
                device: torch.device | str = "cpu") -> tuple[LlamaConfig, Llama]:
    path = Path(path)
    config = config_from_hf(read_config(path), str(path / "config.json"))
    config.name = path.name
    files = weight_files(path)
    source = str(files[0]) if len(files) == 1 else f"{path} (safetensors shards)"
    tensors = (pair for file in files for pair in iter_tensors(file))  # streamed: one tensor in flight
    return config, build_model(config, tensors, source, dtype=dtype, device=device)


def plain_state_dict(model: Llama) -> dict[str, Tensor]:
    """The model's state dict, refusing a model whose projections were fused for inference: no checkpoint
    format has wqkv / w13 tensors."""
    state = model.state_dict()
    if "layers.0.attention.wqkv.weight" in state or "layers.0.feed_forward.w13.weight" in state:
        raise CamelidError("the model has fused projections (camelid.variants.fused.fuse); save it before fusing")
    return state


def hf_state_dict(model: Llama) -> dict[str, Tensor]:
    """The model's tensors under HF names (tied output head omitted, as HF does)."""
    out = {}
    for name, t in plain_state_dict(model).items():
        if name == "output.weight" and model.config.tie_embeddings:
            continue
        out[camelid_to_hf_name(name)] = t.detach().contiguous()
    return out


def save_hf_dir(model: Llama, path: str | os.PathLike, dtype: torch.dtype | None = None,
                max_shard_bytes: int = 4 << 30) -> Path:
    """Write config.json, generation_config.json and (sharded when large) safetensors, each atomically."""
    path = Path(path)
    config = model.config
    tensors = hf_state_dict(model)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    dtype_name = str(next(iter(tensors.values())).dtype).removeprefix("torch.")

    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        atomic_write(path / "model.safetensors", lambda p: save_file(shards[0], str(p), metadata=meta))
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            atomic_write(path / fname, lambda p, s=shard: save_file(s, str(p), metadata=meta))
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write_text(path / "model.safetensors.index.json", json.dumps(index, indent=2))
    hf_config = config_to_hf(config, torch_dtype=dtype_name)
    atomic_write_text(path / "config.json", json.dumps(hf_config, indent=2) + "\n")
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    atomic_write_text(path / "generation_config.json", json.dumps(gen, indent=2) + "\n")
    return path
