"""The LLaMA transformer in plain PyTorch: one small class per concept.

Token embedding -> N x [RMSNorm -> causal self-attention with RoPE and grouped-query attention -> residual
-> RMSNorm -> SwiGLU feed-forward -> residual] -> RMSNorm -> output head (optionally tied to the embedding).

The same code covers LLaMA 1, 2, 3, 3.1, 3.2, SmolLM2, TinyLlama, Mistral, Qwen2/2.5/3 and Phi-3; only
`LlamaConfig` changes (q/k/v biases, RMSNorm on q and k, a sliding attention window). Weights
use the Hugging Face rotary layout (the two halves of each head are the rotated pairs), so HF checkpoints
load without permutation; Meta's interleaved layout is converted in `camelid.interop.meta`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camelid import heap
from camelid.config import LlamaConfig
from camelid.errors import CamelidError


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 whatever the input dtype (as Meta and HF do)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(config: LlamaConfig, device: torch.device | str | None = None) -> Tensor:
    """Inverse frequencies theta^(-2i/d), with Llama 3.1's wavelength-dependent scaling if configured."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    s = config.rope_scaling
    if s is None:
        return inv_freq
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = s.original_max_seq_len / s.low_freq_factor
    high_freq_wavelen = s.original_max_seq_len / s.high_freq_factor
    # long wavelengths are divided by `factor`, short ones kept, the band between interpolated smoothly
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Turns positions into the cos/sin tables that rotate q and k; computed per call (cheap: T x d/2).

    positions [T] (shared by the batch) give tables [T, d]; positions [B, T] (one row per sequence) give
    [B, 1, T, d], which broadcast over the heads of q and k [B, H, T, d]."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        freqs = positions.float()[..., None] * self.inv_freq  # [..., T, d/2], in fp32
        emb = torch.cat((freqs, freqs), dim=-1)  # [..., T, d]
        if emb.dim() == 3:
            emb = emb[:, None]  # [B, 1, T, d]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x[i], x[i + d/2]) of every head by the position's angles. x: [B, H, T, d]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache(nn.Module):
    """Preallocated keys and values for incremental decoding: [batch, n_kv_heads, max_seq_len, head_dim]."""

    def __init__(self, batch_size: int, n_kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        super().__init__()
        heap.keep_freed_buffers()  # inference from here on: each prompt's activations reuse freed heap memory
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, positions: Tensor, k: Tensor, v: Tensor, upto: int | None = None) -> tuple[Tensor, Tensor]:
        """Write k, v [B, KV, T, d] at `positions`: [T] for every row, or [B, T] (each row its own slots). Returns
        the cache's first B rows (and first `upto` slots, default all) in k's dtype (a cache of lower precision,
        e.g. fp16 under fp32 compute, stores rounded values and is read back widened)."""
        batch, dtype = k.shape[0], k.dtype
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)
        if positions.dim() == 1:
            self.k[:batch].index_copy_(2, positions, k)
            self.v[:batch].index_copy_(2, positions, v)
        else:
            index = positions[:, None, :, None].expand_as(k)
            self.k[:batch].scatter_(2, index, k)
            self.v[:batch].scatter_(2, index, v)
        return self.k[:batch, :, :upto].to(dtype), self.v[:batch, :, :upto].to(dtype)


class Attention(nn.Module):
    """Causal self-attention. MHA, GQA and MQA are one code path: n_kv_heads divides n_heads."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=config.qkv_bias)
        self.wk = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.wv = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)
        # Qwen3: each head of q and k is RMS-normalised before RoPE
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor | None, mask: Tensor | None) -> Tensor:
        """x [B, T, dim]; positions: where these tokens go in the KV cache (None: no cache); mask: True where a
        query may see a key, [T, S] or [B, 1, T, S] (None: causal)."""
        B, T, _ = x.shape
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is not None and positions is not None:
            k, v = self.kv_cache.update(positions, k, v)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.n_kv_heads != self.n_heads
        )
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x). w1 is HF's gate_proj, w3 its up_proj, w2 its down_proj."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.intermediate_size, bias=False)
        self.w3 = nn.Linear(config.dim, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then h + ffn(norm(h))."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor | None, mask: Tensor | None) -> Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, positions, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.rope = RotaryEmbedding(config)
        self.tie_weights()
        self.init_weights()
        self.cache_len = 0  # positions the KV cache holds; 0 when there is none

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def init_weights(self) -> None:
        """LLaMA-style init for training from scratch: N(0, 0.02), residual outputs scaled by 1/sqrt(2L)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for block in self.layers:
            for proj in (block.attention.wo, block.feed_forward.w2):
                nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layers))

    def setup_cache(self, batch_size: int, max_seq_len: int, dtype: torch.dtype | None = None) -> None:
        """Allocate a KV cache for `batch_size` sequences of up to `max_seq_len` positions."""
        if max_seq_len > self.config.max_seq_len:
            raise CamelidError(
                f"requested {max_seq_len} positions but the model's context window is {self.config.max_seq_len}; "
                "shorten the prompt or generate fewer tokens"
            )
        p = self.norm.weight  # every variant has it in the model dtype (a quantised embedding has no .weight)
        for block in self.layers:
            block.attention.kv_cache = KVCache(batch_size, self.config.n_kv_heads, max_seq_len,
                                               self.config.head_dim, dtype or p.dtype, p.device)
        self.cache_len = max_seq_len

    def clear_cache(self) -> None:
        for block in self.layers:
            block.attention.kv_cache = None
        self.cache_len = 0

    def forward(self, input_ids: Tensor, positions: Tensor | None = None, *, last_only: bool = False,
                key_mask: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """input_ids [B, T] -> logits [B, T, vocab] (or [B, 1, vocab] with last_only); see hidden_states."""
        x = self.hidden_states(input_ids, positions, key_mask=key_mask, mask=mask)
        if last_only:
            x = x[:, -1:]
        return self.output(x).float()

    def hidden_states(self, input_ids: Tensor, positions: Tensor | None = None, *, key_mask: Tensor | None = None,
                      mask: Tensor | None = None) -> Tensor:
        """input_ids [B, T] -> the final-norm hidden states [B, T, dim] that the output head reads.

        Without `positions` this is a plain causal pass over the whole sequence (training, scoring). With
        `positions` and a KV cache (`setup_cache`), keys and values go through the cache at those positions:
        [T] for every row, or [B, T] for rows at different positions (continuous batching); the step has no
        data-dependent Python branches, so `torch.compile` can capture it whole.
        `key_mask` ([B, cache_len] bool, False at left-padding slots) hides padding in batched generation.
        `mask` ([B, 1, T, S] bool, True = may attend; S = cache_len with a cache, else T) replaces the causal
        mask, e.g. a block-diagonal one for packed sequences, whose `positions` [B, T] then restart at 0 per
        sequence (without a cache, positions only place RoPE).
        """
        B, T = input_ids.shape
        window = self.config.sliding_window
        cache_positions = None
        if positions is None:
            if T > self.config.max_seq_len:
                raise CamelidError(f"sequence of {T} tokens exceeds the context window of {self.config.max_seq_len}")
            positions = torch.arange(T, device=input_ids.device)
            if mask is None and window is not None and T > window:
                distance = positions[:, None] - positions  # query i sees keys i - window < j <= i
                mask = (distance >= 0) & (distance < window)
        elif self.cache_len:
            cache_positions = positions
            if mask is None:
                slots = torch.arange(self.cache_len, device=input_ids.device)
                mask = positions[..., None] >= slots  # [T, S] or [B, T, S]
                if window is not None:
                    mask = mask & (positions[..., None] - slots < window)
                if key_mask is not None:
                    # a padding query may see itself, so no softmax row is empty (that would put NaN in the cache)
                    mask = mask & (key_mask[:, None, :] | (positions[..., None] == slots))
                if mask.dim() == 3:
                    mask = mask[:, None]  # [B, 1, T, S]: broadcast over the heads
        elif mask is None:
            raise CamelidError("positions were given but no KV cache is set up; call model.setup_cache() first "
                               "(or pass mask= for a pass without a cache)")
        x = self.tok_embeddings(input_ids)
        cos, sin = self.rope(positions, x.dtype)
        for block in self.layers:
            x = block(x, cos, sin, cache_positions, mask)
        return self.norm(x)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """The same after fusing or quantising (counted from the config; tests check it against the tensors)."""
        return self.config.num_params(exclude_embeddings)
