"""Batched generation of prompts of different lengths.

Prompts are left-padded to one length so every sequence's next token sits in the same cache slot. Padding
keys are hidden with a key mask. RoPE only sees position differences in q.k, so a sequence shifted right by
its padding attends exactly as it would alone (up to float rounding); its greedy tokens match the
unbatched ones, which tests/test_batch.py checks.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from camelid.errors import CamelidError
from camelid.generate import SamplingParams, sample
from camelid.model import Llama


@torch.inference_mode()
def generate_batch(
    model: Llama,
    prompts: list[list[int]],
    max_new_tokens: int,
    params: SamplingParams | None = None,
    stop_ids: Iterable[int] = (),
    seed: int | None = None,
    pad_id: int = 0,
) -> list[list[int]]:
    """New token ids for each prompt; a sequence ends after its first stop id (included) or max_new_tokens."""
    params = params or SamplingParams()
    if params.repetition_penalty != 1.0:
        raise CamelidError("repetition_penalty is not supported in batched generation; use generate() per prompt")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise CamelidError("every prompt needs at least one token (e.g. BOS)")
    B, L = len(prompts), max(len(p) for p in prompts)
    total = L + max_new_tokens
    if total > model.config.max_seq_len:
        raise CamelidError(f"longest prompt ({L}) + {max_new_tokens} new tokens exceeds the context window "
                           f"of {model.config.max_seq_len}")
    device = model.norm.weight.device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    stop = set(stop_ids)
    ids = torch.full((B, L), pad_id, dtype=torch.long, device=device)
    key_mask = torch.ones(B, total, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(p, device=device)
        key_mask[i, : L - len(p)] = False
    outputs: list[list[int]] = [[] for _ in prompts]
    done = [False] * B
    model.setup_cache(B, total)
    try:
        logits = model(ids, torch.arange(L, device=device), last_only=True, key_mask=key_mask)[:, -1]
        for step in range(max_new_tokens):
            nxt = sample(logits, params, generator)
            for i, t in enumerate(nxt.tolist()):
                if not done[i]:
                    outputs[i].append(t)
                    done[i] = t in stop
            if all(done) or step == max_new_tokens - 1:
                break
            pos = torch.tensor([L + step], device=device)
            logits = model(nxt[:, None], pos, last_only=True, key_mask=key_mask)[:, -1]
    finally:
        model.clear_cache()
    return outputs
