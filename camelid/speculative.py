"""Greedy speculative decoding: a cheap draft model proposes k tokens, the target checks them in one pass.

The target keeps the longest prefix where its own greedy choice equals the draft's, plus its own next token,
so the output is the target's greedy output (up to float rounding between a k+1-token pass and single-token
steps). KV caches never need rolling back: entries past the accepted length are masked by position and
overwritten on the next pass. The draft can be a smaller model with the same tokenizer, or an int4 copy of
the target (camelid.variants.quantized.quantize_model(copy.deepcopy(target), "int4")).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from camelid.errors import CamelidError
from camelid.model import Llama


@dataclass
class SpecStats:
    drafted: int = 0
    accepted: int = 0
    target_passes: int = 0
    tokens: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.drafted, 1)


def _argmax(model: Llama, tokens: list[int], start: int, device: torch.device, last_only: bool = False) -> list[int]:
    """Feed tokens at positions start.. and return the greedy next token after each (or after the last)."""
    ids = torch.tensor([tokens], device=device)
    logits = model(ids, torch.arange(start, start + len(tokens), device=device), last_only=last_only)
    return logits[0].argmax(-1).tolist()


@torch.inference_mode()
def speculative_generate(target: Llama, draft: Llama, prompt: list[int], max_new_tokens: int, k: int = 4,
                         stop_ids: Iterable[int] = ()) -> SpecStats:
    """Greedy generation from `target`, sped up by `draft`. Returns the tokens and acceptance statistics."""
    if target.config.vocab_size != draft.config.vocab_size:
        raise CamelidError(f"draft vocabulary ({draft.config.vocab_size}) differs from the target's "
                           f"({target.config.vocab_size}); the draft must share the tokenizer")
    if not prompt:
        raise CamelidError("the prompt is empty; give at least one token (e.g. BOS)")
    total = len(prompt) + max_new_tokens + k + 1
    if total > min(target.config.max_seq_len, draft.config.max_seq_len):
        raise CamelidError(f"prompt + {max_new_tokens} new tokens + {k + 1} draft slots exceeds the context window")
    device = target.norm.weight.device
    stop, stats = set(stop_ids), SpecStats()
    target.setup_cache(1, total)
    draft.setup_cache(1, total)
    try:
        seq = list(prompt)
        seq.append(_argmax(target, seq, 0, device, last_only=True)[-1])
        target_valid, draft_valid = len(prompt), 0  # how many of seq's tokens each cache holds
        while not (len(seq) - len(prompt) >= max_new_tokens or seq[-1] in stop):
            n = len(seq)
            drafts = [_argmax(draft, seq[draft_valid:], draft_valid, device, last_only=True)[-1]]
            for j in range(1, k):
                drafts.append(_argmax(draft, drafts[-1:], n + j - 1, device, last_only=True)[-1])
            greedy = _argmax(target, seq[target_valid:] + drafts, target_valid, device)[n - 1 - target_valid:]
            a = 0
            while a < k and drafts[a] == greedy[a]:
                a += 1
            stats.drafted += k
            stats.accepted += a
            stats.target_passes += 1
            seq += drafts[:a] + [greedy[a]]
            target_valid, draft_valid = n + a, n + min(a, k - 1)
    finally:
        target.clear_cache()
        draft.clear_cache()
    new = seq[len(prompt):][:max_new_tokens]
    for i, t in enumerate(new):
        if t in stop:
            new = new[: i + 1]
            break
    stats.tokens = new
    return stats
