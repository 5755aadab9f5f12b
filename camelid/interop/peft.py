"""peft's LoRA adapter folders in and out: adapter_config.json + adapter_model.safetensors.

peft names each adapter tensor after the Hugging Face module it wraps,
`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` ([rank, in]) and `...lora_B.weight` ([out, rank]);
camelid names the same tensors `layers.3.attention.wq.lora_a` / `.lora_b` (camelid.variants.lora). This module
converts between the two (names through camelid.interop.hf) and checks what it reads: a LoRA of linear layers
with no bias, DoRA, per-module alpha or extra trained modules, since those are what camelid's LoRALinear computes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from camelid.errors import CamelidError
from camelid.fileio import atomic_write, atomic_write_text
from camelid.interop.hf import camelid_to_hf_name, hf_to_camelid_name

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."  # peft's wrapper around the transformers model
# camelid's target names (in camelid.variants.lora.TARGETS order) <-> the transformers modules peft targets
HF_TARGETS = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "w1": "gate_proj", "w3": "up_proj",
              "w2": "down_proj"}
CAMELID_TARGETS = {v: k for k, v in HF_TARGETS.items()}


@dataclass
class PeftAdapter:
    rank: int  # adapter_config's r (a module's own rank is its tensors' first dimension)
    alpha: float
    dropout: float
    targets: list[str]  # camelid names, in TARGETS order
    rslora: bool
    base: str  # base_model_name_or_path ('' when not recorded)
    tensors: dict[str, Tensor]  # camelid names: layers.N.attention.wq.lora_a / .lora_b


def hf_module_name(path: str) -> str:
    """camelid module path (layers.3.attention.wq) -> the transformers module (model.layers.3.self_attn.q_proj)."""
    return camelid_to_hf_name(f"{path}.weight").removesuffix(".weight")


def camelid_module_name(module: str) -> str | None:
    """transformers module name -> camelid module path, or None when camelid has no such linear."""
    name = hf_to_camelid_name(f"{module}.weight")
    if name is None or name == f"{module}.weight" or not name.startswith("layers."):
        return None
    return name.removesuffix(".weight")


def save_peft_adapter(path: str | os.PathLike, tensors: dict[str, Tensor], *, rank: int, alpha: float,
                      dropout: float, targets: list[str], rslora: bool = False, base: str = "") -> Path:
    """Write camelid-named adapter tensors as a peft LoRA folder; each file atomically."""
    path = Path(path)
    out = {}
    for name, t in tensors.items():
        module, _, ab = name.rpartition(".")
        key = {"lora_a": "lora_A", "lora_b": "lora_B"}[ab]
        out[f"{PREFIX}{hf_module_name(module)}.{key}.weight"] = t.detach().cpu().contiguous()
    ranks = {n.rpartition(".")[0]: t.shape[0] for n, t in tensors.items() if n.endswith(".lora_a")}
    rank_pattern = {hf_module_name(m): r for m, r in ranks.items() if r != rank}
    config: dict[str, Any] = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base or None,
        "r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "use_rslora": rslora,
        "target_modules": [HF_TARGETS[t] for t in targets], "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "inference_mode": True, "use_dora": False, "modules_to_save": None,
        "layers_to_transform": None, "rank_pattern": rank_pattern, "alpha_pattern": {},
    }
    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / WEIGHTS_NAME, lambda p: save_file(out, str(p), metadata={"format": "pt"}))
    atomic_write_text(path / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    return path


def read_peft_adapter(path: str | os.PathLike) -> PeftAdapter:
    """Read a peft LoRA folder (written by peft or by camelid) into camelid names; anything camelid's LoRALinear
    does not compute is a one-line error naming the file and the setting."""
    path = Path(path)
    if path.is_file() and path.name in (CONFIG_NAME, WEIGHTS_NAME):
        path = path.parent
    cfg_file, weights = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not cfg_file.is_file():
        raise CamelidError(f"{path}: no {CONFIG_NAME}; an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME} "
                           "(written by `camelid finetune` or peft's save_pretrained)")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CamelidError(f"{cfg_file}: not valid JSON ({e}); rewrite it with peft or camelid") from None
    if not isinstance(config, dict):
        raise CamelidError(f"{cfg_file}: holds a JSON {type(config).__name__}, not an object")

    def refuse(key: str, why: str) -> CamelidError:
        return CamelidError(f"{cfg_file}: {key} = {config.get(key)!r}: {why}")

    if config.get("peft_type", "LORA") != "LORA":
        raise refuse("peft_type", "camelid loads LoRA adapters only")
    if config.get("use_dora"):
        raise refuse("use_dora", "DoRA adapters are not supported; train a plain LoRA")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise refuse("bias", "adapters that train biases are not supported; use bias='none'")
    if config.get("fan_in_fan_out"):
        raise refuse("fan_in_fan_out", "only LLaMA-style nn.Linear layers are supported")
    if config.get("modules_to_save"):
        raise refuse("modules_to_save", "adapters with fully trained extra modules are not supported")
    if config.get("alpha_pattern"):
        raise refuse("alpha_pattern", "per-module alpha is not supported; use one lora_alpha")
    try:
        rank, alpha = int(config["r"]), float(config["lora_alpha"])
    except (KeyError, TypeError, ValueError):
        raise CamelidError(f"{cfg_file}: needs numeric 'r' and 'lora_alpha'; rewrite it with peft or camelid") \
            from None
    if not weights.is_file():
        raise CamelidError(f"{path}: no {WEIGHTS_NAME} beside {CONFIG_NAME}; copy the adapter's weights too")
    tensors: dict[str, Tensor] = {}
    try:
        with safe_open(weights, framework="pt") as f:
            keys = list(f.keys())
            for key in keys:
                tensors[_camelid_tensor_name(key, weights)] = f.get_tensor(key).float()
    except (SafetensorError, OSError) as e:
        raise CamelidError(f"{weights}: corrupt or truncated ({' '.join(str(e).split())[:120]}); re-save it") \
            from None
    if not tensors:
        raise CamelidError(f"{weights}: holds no adapter tensors")
    modules = {n.rpartition(".")[0] for n in tensors}
    for m in sorted(modules):
        if f"{m}.lora_a" not in tensors or f"{m}.lora_b" not in tensors:
            raise CamelidError(f"{weights}: {hf_module_name(m)} has only one of lora_A / lora_B; the file is "
                               "incomplete")
        a, b = tensors[f"{m}.lora_a"], tensors[f"{m}.lora_b"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise CamelidError(f"{weights}: {hf_module_name(m)}: lora_A {list(a.shape)} and lora_B {list(b.shape)} "
                               "do not make a rank-r product")
    targets = sorted({m.rpartition(".")[2] for m in modules}, key=list(HF_TARGETS).index)
    return PeftAdapter(rank=rank, alpha=alpha, dropout=float(config.get("lora_dropout") or 0.0), targets=targets,
                       rslora=bool(config.get("use_rslora")), base=str(config.get("base_model_name_or_path") or ""),
                       tensors=tensors)


def _camelid_tensor_name(key: str, source: Path) -> str:
    """peft's tensor name -> camelid's (layers.N.attention.wq.lora_a)."""
    name = key.removeprefix(PREFIX)
    for suffix, ab in ((".lora_A.weight", "lora_a"), (".lora_B.weight", "lora_b"),
                       (".lora_A.default.weight", "lora_a"), (".lora_B.default.weight", "lora_b")):
        if name.endswith(suffix):
            module = camelid_module_name(name.removesuffix(suffix))
            if module is None:
                raise CamelidError(f"{source}: {key} adapts {name.removesuffix(suffix)}, which is not a linear layer "
                                   "of a LLaMA block; camelid adapts q/k/v/o_proj and gate/up/down_proj only")
            return f"{module}.{ab}"
    raise CamelidError(f"{source}: unexpected tensor {key!r} (embedding adapters, DoRA magnitudes and trained "
                       "modules are not supported)")


__all__ = ["CONFIG_NAME", "HF_TARGETS", "WEIGHTS_NAME", "PeftAdapter", "camelid_module_name", "hf_module_name",
           "read_peft_adapter", "save_peft_adapter"]
