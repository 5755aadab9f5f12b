"""LoRA adapters as GGUF files that llama.cpp applies to the base model (`llama-cli --lora`, llama-cpp-python's
`lora_path`): what llama.cpp's convert_lora_to_gguf.py writes, from camelid's adapters.

    general.type = "adapter", general.architecture = "llama" (or "qwen2"), adapter.type = "lora",
    adapter.lora.alpha = alpha
    blk.N.attn_q.weight.lora_a   [rank, in]  (ggml ne = [in, rank])
    blk.N.attn_q.weight.lora_b   [out, rank] (ggml ne = [rank, out])

llama.cpp scales each pair by alpha / rank (rank read from lora_b), the scale of peft's plain LoRA. Its llama
files hold the q/k rows in Meta's interleaved rotary order, so lora_b of wq and wk is permuted the same way
(lora_a acts on the input and is not). An rslora adapter (scale alpha / sqrt(rank)) gets its scale folded into
lora_b and alpha 0, which llama.cpp reads as scale 1.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import gguf
import numpy as np
import torch

from camelid.config import LlamaConfig
from camelid.fileio import atomic_write
from camelid.interop.gguf import hf_to_gguf_name
from camelid.interop.hf import camelid_to_hf_name
from camelid.interop.meta import to_interleaved


def save_gguf_adapter(path: str | os.PathLike, tensors: dict[str, torch.Tensor], config: LlamaConfig, *,
                      alpha: float, rslora: bool = False, name: str = "") -> Path:
    """Write LoRA tensors under camelid names (layers.N.attention.wq.lora_a / .lora_b, as
    camelid.variants.lora.lora_state_dict gives them) as a GGUF LoRA adapter for `config`'s base, atomically."""
    path = Path(path)
    arch = "qwen2" if config.qkv_bias else "llama"
    ranks = {n.removesuffix(".lora_a"): t.shape[0] for n, t in tensors.items() if n.endswith(".lora_a")}
    plain = not rslora  # alpha / rank for every module: llama.cpp's own scale
    writer = gguf.GGUFWriter(path=None, arch=arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha) if plain else 0.0)
    if name:
        writer.add_name(name)
    for module_path, rank in ranks.items():
        a = tensors[f"{module_path}.lora_a"].detach().float()
        b = tensors[f"{module_path}.lora_b"].detach().float() * (1.0 if plain else alpha / math.sqrt(rank))
        if arch == "llama" and module_path.endswith(".attention.wq"):
            b = to_interleaved(b, config.n_heads)
        elif arch == "llama" and module_path.endswith(".attention.wk"):
            b = to_interleaved(b, config.n_kv_heads)
        tensor = hf_to_gguf_name(camelid_to_hf_name(f"{module_path}.weight"))
        writer.add_tensor(f"{tensor}.lora_a", np.ascontiguousarray(a.cpu().numpy(), dtype=np.float32))
        writer.add_tensor(f"{tensor}.lora_b", np.ascontiguousarray(b.cpu().numpy(), dtype=np.float32))

    def write(tmp: Path) -> None:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()

    atomic_write(path, write)
    return path


def read_gguf_adapter(path: str | os.PathLike) -> tuple[float, dict[str, torch.Tensor]]:
    """(alpha, {GGUF tensor name: fp32 tensor}) of a GGUF LoRA adapter, as stored (for inspection and tests)."""
    reader = gguf.GGUFReader(str(path))
    field = reader.fields.get(gguf.Keys.Adapter.LORA_ALPHA)
    alpha = float(field.parts[field.data[0]][0]) if field is not None else 0.0
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        tensors[t.name] = torch.from_numpy(np.array(t.data, dtype=np.float32).reshape(shape))
    return alpha, tensors


__all__ = ["read_gguf_adapter", "save_gguf_adapter"]
