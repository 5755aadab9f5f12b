"""Token-level generation: prefill the prompt into the KV cache, then decode one token at a time."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from camelid.errors import CamelidError
from camelid.model import Llama
from camelid.variants.decode_step import decode_step


@dataclass
class SamplingParams:
    """temperature 0 means greedy. top_k / top_p / min_p filter before sampling; 0 or 1.0 disables each."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise CamelidError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise CamelidError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise CamelidError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.top_k < 0:
            raise CamelidError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise CamelidError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL-style penalty (as in transformers): divide positive logits of seen tokens, multiply negative ones."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits.gather(-1, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(-1, seen, picked)


def filter_probs(logits: Tensor, params: SamplingParams) -> Tensor:
    """logits [B, V] -> the distribution `sample` draws from [B, V] (temperature > 0), filtered tokens at 0.

    The same warpers as transformers' sampling, in its order: temperature, top-k, top-p, min-p (the repetition
    penalty comes before, on the raw logits, as transformers' logits processors run before its warpers).
    tests/test_generate.py compares the result with transformers' warpers on the same logits."""
    logits = logits / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    if params.min_p > 0:
        # relative to the top token, whose probability top-p never removes (renormalising keeps the ratios)
        probs = probs.masked_fill(probs < params.min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
    return probs / probs.sum(-1, keepdim=True)


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> Tensor:
    """logits [B, V] -> next token ids [B]: the argmax at temperature 0, else a draw from `filter_probs`."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    return torch.multinomial(filter_probs(logits, params), 1, generator=generator).squeeze(-1)


_COMPILED: weakref.WeakKeyDictionary[Llama, Callable[..., Tensor]] = weakref.WeakKeyDictionary()
CACHE_BUCKET = 256  # compiled decode: cache lengths are rounded up to this, so new prompts rarely recompile


def compiled_decode_step(model: Llama) -> Callable[..., Tensor]:
    """`torch.compile` of the model for single-token steps (static shapes), built once per model and reused;
    the first call after a new cache length pays the compile (tens of seconds on CPU)."""
    if model not in _COMPILED:
        _COMPILED[model] = torch.compile(model, dynamic=False)
    return _COMPILED[model]


@torch.inference_mode()
def generate_tokens(
    model: Llama,
    prompt: list[int],
    max_new_tokens: int,
    params: SamplingParams | None = None,
    stop_ids: Iterable[int] = (),
    seed: int | None = None,
    *,
    compile: bool = False,
) -> Iterator[int]:
    """Yield new token ids one at a time for a single prompt; stops after a stop id (which is yielded).

    compile=True runs the decode steps through `compiled_decode_step` (the prompt pass stays eager)."""
    params = params or SamplingParams()
    if not prompt:
        raise CamelidError("the prompt is empty; give at least one token (e.g. BOS)")
    total = len(prompt) + max_new_tokens
    if total > model.config.max_seq_len:
        raise CamelidError(
            f"prompt of {len(prompt)} tokens plus {max_new_tokens} new tokens exceeds the context window of "
            f"{model.config.max_seq_len}; shorten the prompt or lower max_new_tokens"
        )
    bad = [t for t in prompt if not 0 <= t < model.config.vocab_size]
    if bad:
        raise CamelidError(f"token id {bad[0]} is outside the vocabulary (size {model.config.vocab_size})")
    device = model.norm.weight.device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    stop = set(stop_ids)
    cache_len = min(-(-total // CACHE_BUCKET) * CACHE_BUCKET, model.config.max_seq_len) if compile else total
    step = compiled_decode_step(model) if compile else model
    fast = None if compile else decode_step(model)  # the whole step in one C++ call (fused CPU models it implements)
    model.setup_cache(1, cache_len)
    try:
        tokens = torch.tensor([prompt], device=device)
        if fast is not None and fast.greedy and params.temperature == 0 and params.repetition_penalty == 1.0:
            # greedy through the C++ step's greedy head: the same tokens, without the fp32 head's every row
            h = model.hidden_states(tokens, torch.arange(len(prompt), device=device))[0, -1]
            token_id = fast.head_argmax(h)
            for i in range(max_new_tokens):
                yield token_id
                if token_id in stop or i == max_new_tokens - 1:
                    return
                token_id = fast.argmax(token_id, len(prompt) + i)
            return
        seen = tokens
        logits = model(tokens, torch.arange(len(prompt), device=device), last_only=True)[:, -1]
        for i in range(max_new_tokens):
            logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
            next_token = sample(logits, params, generator)
            token_id = int(next_token.item())
            yield token_id
            if token_id in stop or i == max_new_tokens - 1:
                return
            if params.repetition_penalty != 1.0:  # only the penalty needs the history
                seen = torch.cat([seen, next_token[:, None]], dim=1)
            position = len(prompt) + i
            if fast is not None:
                logits = fast(token_id, position)[:, -1]
            else:
                logits = step(next_token[:, None], torch.tensor([position], device=device))[:, -1]
    finally:
        model.clear_cache()


def generate(
    model: Llama,
    prompt: list[int],
    max_new_tokens: int,
    params: SamplingParams | None = None,
    stop_ids: Iterable[int] = (),
    seed: int | None = None,
    *,
    compile: bool = False,
) -> list[int]:
    """All new token ids for one prompt (see generate_tokens)."""
    return list(generate_tokens(model, prompt, max_new_tokens, params, stop_ids, seed, compile=compile))
