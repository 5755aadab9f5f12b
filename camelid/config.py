"""LlamaConfig: one dataclass describing one model, and a registry of the published ones."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from camelid.errors import CamelidError


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 frequency scaling: long wavelengths are stretched by `factor`, short ones kept."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192


@dataclass
class LlamaConfig:
    name: str = "custom"
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: same as n_heads (MHA); 1: MQA; in between: GQA
    head_dim: int | None = None  # None: dim // n_heads
    intermediate_size: int = 11008  # SwiGLU hidden width
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2-style biases on the q/k/v projections
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise CamelidError(
                    f"config {self.name!r}: dim {self.dim} is not divisible by n_heads {self.n_heads}; "
                    "set head_dim explicitly"
                )
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise CamelidError(
                f"config {self.name!r}: n_heads {self.n_heads} is not a multiple of n_kv_heads "
                f"{self.n_kv_heads}; grouped-query attention needs whole groups"
            )
        if self.head_dim % 2:
            raise CamelidError(f"config {self.name!r}: head_dim {self.head_dim} must be even for RoPE")

    # -- registry -------------------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> LlamaConfig:
        key = name.lower()
        if key not in PRESETS:
            raise CamelidError(f"unknown model config {name!r}; known: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[key], "name": key, **overrides})

    @staticmethod
    def names() -> list[str]:
        return list(PRESETS)

    # -- Hugging Face config.json (the mapping itself lives in the interop layer) ----------------
    @classmethod
    def from_hf(cls, config: dict[str, Any], source: str = "config.json") -> LlamaConfig:
        from camelid.interop.hf import config_from_hf

        return config_from_hf(config, source)

    def to_hf(self) -> dict[str, Any]:
        from camelid.interop.hf import config_to_hf

        return config_to_hf(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> LlamaConfig:
        return dataclasses.replace(self, **changes)

    # -- sizes, for `camelid info` -----------------------------------------------------------------
    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters of the model this config describes, a tied head counted once. From the config, not from
        tensors: a fused or quantised model holds the same parameters in other shapes and dtypes."""
        d, q, kv = self.dim, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        attention = d * q + 2 * d * kv + q * d + ((q + 2 * kv) if self.qkv_bias else 0)
        layer = attention + 3 * d * self.intermediate_size + 2 * d  # + the two RMSNorm weights
        embedding = self.vocab_size * d
        n = self.n_layers * layer + d + embedding + (0 if self.tie_embeddings else embedding)
        return n - embedding if exclude_embeddings else n

    @property
    def kv_cache_bytes_per_token(self) -> int:
        """Bytes of K and V kept per token across all layers, at 2 bytes per value (bf16/fp16)."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * 2


_LLAMA1 = dict(vocab_size=32000, norm_eps=1e-6, max_seq_len=2048, bos_token_id=1, eos_token_id=2)
_LLAMA2 = dict(vocab_size=32000, norm_eps=1e-5, max_seq_len=4096, bos_token_id=1, eos_token_id=2)
_LLAMA3 = dict(vocab_size=128256, norm_eps=1e-5, rope_theta=500000.0, max_seq_len=8192,
               bos_token_id=128000, eos_token_id=128001)
_LLAMA31 = dict(_LLAMA3, max_seq_len=131072, eos_token_id=[128001, 128008, 128009],
                rope_scaling=RopeScaling(factor=8.0))
_LLAMA32 = dict(_LLAMA31, tie_embeddings=True, rope_scaling=RopeScaling(factor=32.0))
_SMOLLM2 = dict(vocab_size=49152, norm_eps=1e-5, tie_embeddings=True, max_seq_len=8192,
                bos_token_id=1, eos_token_id=2)

PRESETS: dict[str, dict[str, Any]] = {
    # LLaMA 1 (Touvron et al. 2023, table 2)
    "llama-7b": dict(_LLAMA1, dim=4096, n_layers=32, n_heads=32, intermediate_size=11008),
    "llama-13b": dict(_LLAMA1, dim=5120, n_layers=40, n_heads=40, intermediate_size=13824),
    "llama-33b": dict(_LLAMA1, dim=6656, n_layers=60, n_heads=52, intermediate_size=17920),
    "llama-65b": dict(_LLAMA1, dim=8192, n_layers=80, n_heads=64, intermediate_size=22016),
    # Llama 2
    "llama2-7b": dict(_LLAMA2, dim=4096, n_layers=32, n_heads=32, intermediate_size=11008),
    "llama2-13b": dict(_LLAMA2, dim=5120, n_layers=40, n_heads=40, intermediate_size=13824),
    "llama2-70b": dict(_LLAMA2, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, intermediate_size=28672),
    # Llama 3 / 3.1 / 3.2
    "llama3-8b": dict(_LLAMA3, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, intermediate_size=14336),
    "llama3-70b": dict(_LLAMA3, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, intermediate_size=28672),
    "llama3.1-8b": dict(_LLAMA31, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, intermediate_size=14336),
    "llama3.1-70b": dict(_LLAMA31, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, intermediate_size=28672),
    "llama3.1-405b": dict(_LLAMA31, dim=16384, n_layers=126, n_heads=128, n_kv_heads=8,
                          intermediate_size=53248),
    "llama3.2-1b": dict(_LLAMA32, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, intermediate_size=8192),
    "llama3.2-3b": dict(_LLAMA32, dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, intermediate_size=8192),
    # SmolLM2 (Hugging Face) and TinyLlama: small models in the LLaMA layout
    "smollm2-135m": dict(_SMOLLM2, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, intermediate_size=1536,
                         rope_theta=100000.0),
    "smollm2-360m": dict(_SMOLLM2, dim=960, n_layers=32, n_heads=15, n_kv_heads=5, intermediate_size=2560,
                         rope_theta=100000.0),
    "smollm2-1.7b": dict(_SMOLLM2, dim=2048, n_layers=24, n_heads=32, n_kv_heads=32, intermediate_size=8192,
                         rope_theta=130000.0),
    "tinyllama-1.1b": dict(_LLAMA2, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, intermediate_size=5632,
                           max_seq_len=2048),
    # tiny configs for tests and demos
    "tiny-mha": dict(vocab_size=320, dim=64, n_layers=2, n_heads=4, intermediate_size=176, max_seq_len=256),
    "tiny-gqa": dict(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=176,
                     max_seq_len=256),
    "tiny-mqa": dict(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=1, intermediate_size=176,
                     max_seq_len=256),
    "tiny-llama3": dict(vocab_size=331, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=176,
                        rope_theta=500000.0, max_seq_len=256, tie_embeddings=True,
                        rope_scaling=RopeScaling(factor=8.0, original_max_seq_len=64)),
}

