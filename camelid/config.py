"""LlamaConfig: one dataclass describing one model, and a registry of the published ones."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

from camelid.errors import CamelidError


class ConfigError(CamelidError):
    """A config field of the wrong type or out of range; `field` names it, so that loaders can name the file's own
    key instead (config.json's num_hidden_layers for n_layers)."""

    def __init__(self, config: str, field: str, problem: str) -> None:
        super().__init__(f"config {config!r}: {field} {problem}")
        self.field, self.problem = field, problem


# Sane bounds, far beyond every published model (Llama 3.1 405B: dim 16384, 126 layers, 128 heads, FFN 53248;
# vocabularies up to ~260k; contexts up to 10M) and far below what would take minutes to allocate.
INT_LIMITS = {
    "vocab_size": (1, 1 << 22),
    "dim": (1, 1 << 16),
    "n_layers": (1, 1024),
    "n_heads": (1, 1024),
    "n_kv_heads": (1, 1024),
    "head_dim": (2, 1024),
    "intermediate_size": (1, 1 << 20),
    "max_seq_len": (1, 1 << 24),
}
FLOAT_LIMITS = {"norm_eps": (1e-12, 1.0), "rope_theta": (1e-6, 1e12)}
TOKEN_ID_MAX = (1 << 31) - 1


def _integer(config: str, field: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(config, field, f"= {value!r} must be an integer")
    if not low <= value <= high:
        bound = f"at least {low}" if value < low else f"at most {high} (a sane bound; is the file damaged?)"
        raise ConfigError(config, field, f"= {value} must be {bound}")
    return int(value)


def _real(config: str, field: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(config, field, f"= {value!r} must be a finite number")
    if not low <= value <= high:
        raise ConfigError(config, field, f"= {value} must lie in [{low:g}, {high:g}]")
    return float(value)


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
            try:
                self.rope_scaling = RopeScaling(**self.rope_scaling)
            except TypeError:
                raise ConfigError(self.name, "rope_scaling", f"{self.rope_scaling!r} has unknown keys; give factor, "
                                  "low_freq_factor, high_freq_factor, original_max_seq_len") from None
        self._check_types_and_ranges()
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ConfigError(self.name, "dim", f"{self.dim} is not divisible by n_heads {self.n_heads}; "
                                  "set head_dim explicitly")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(self.name, "n_heads", f"{self.n_heads} is not a multiple of n_kv_heads "
                              f"{self.n_kv_heads}; grouped-query attention needs whole groups")
        if self.head_dim % 2:
            raise ConfigError(self.name, "head_dim", f"{self.head_dim} must be even for RoPE")

    def _check_types_and_ranges(self) -> None:
        """Every field of the right type and within sane bounds, so that a damaged or hostile config fails
        here, in one line naming the field, instead of allocating for minutes or deep inside torch."""
        for field, (low, high) in INT_LIMITS.items():
            value = getattr(self, field)
            if value is None and field in ("n_kv_heads", "head_dim"):
                continue
            setattr(self, field, _integer(self.name, field, value, low, high))
        for field, (low, high) in FLOAT_LIMITS.items():
            setattr(self, field, _real(self.name, field, getattr(self, field), low, high))
        for field in ("tie_embeddings", "qkv_bias"):
            if not isinstance(getattr(self, field), bool):
                raise ConfigError(self.name, field, f"= {getattr(self, field)!r} must be true or false")
        if not isinstance(self.name, str):
            raise ConfigError(str(self.name), "name", f"= {self.name!r} must be a string")
        if self.bos_token_id is not None:
            self.bos_token_id = _integer(self.name, "bos_token_id", self.bos_token_id, 0, TOKEN_ID_MAX)
        eos = self.eos_token_id
        if isinstance(eos, list | tuple):
            if not eos:
                raise ConfigError(self.name, "eos_token_id", "is an empty list; give at least one id, or null")
            self.eos_token_id = [_integer(self.name, "eos_token_id", i, 0, TOKEN_ID_MAX) for i in eos]
        elif eos is not None:
            self.eos_token_id = _integer(self.name, "eos_token_id", eos, 0, TOKEN_ID_MAX)
        s = self.rope_scaling
        if s is not None:
            if not isinstance(s, RopeScaling):
                raise ConfigError(self.name, "rope_scaling", f"= {s!r} must be a mapping of Llama 3.1 scaling "
                                  "parameters, or null")
            _real(self.name, "rope_scaling.factor", s.factor, 1.0, 1e6)
            _real(self.name, "rope_scaling.low_freq_factor", s.low_freq_factor, 1e-6, 1e6)
            _real(self.name, "rope_scaling.high_freq_factor", s.high_freq_factor, 1e-6, 1e6)
            _integer(self.name, "rope_scaling.original_max_seq_len", s.original_max_seq_len, 1,
                     INT_LIMITS["max_seq_len"][1])
            if s.high_freq_factor <= s.low_freq_factor:
                raise ConfigError(self.name, "rope_scaling.high_freq_factor", f"{s.high_freq_factor} must be above "
                                  f"low_freq_factor {s.low_freq_factor}")

    @classmethod
    def from_dict(cls, d: Any, source: str = "config") -> LlamaConfig:
        """A config from `to_dict()`'s output (e.g. read back from a file); unknown keys are an error."""
        if not isinstance(d, dict):
            raise CamelidError(f"{source}: a model config must be a mapping, not {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise CamelidError(f"{source}: unknown config field(s) {', '.join(map(str, unknown))}; LlamaConfig fields "
                               f"are {', '.join(sorted(known))}")
        try:
            return cls(**d)
        except CamelidError as e:
            raise CamelidError(f"{source}: {e}") from None

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

