"""Log-likelihood scoring with shared key/value states: every token of every context is computed once.

A scoring request is (context tokens, continuation tokens); its answer is the summed log-probability of the
continuation and whether greedy decoding would have produced it (lm-eval's `loglikelihood`). The model reads
`context + continuation[:-1]`, and the logits at the last len(continuation) positions score the continuation.

The lever is that these token sequences share prefixes: the choices of one question share the question,
k-shot prompts share their examples, chat prompts share the system turn. Sorted lexicographically, each
sequence differs from the one before it only after their longest common prefix, so only that suffix is
computed; its attention reads the prefix's keys and values from a token-level pool (a trie of KV states:
sum over sequences of len - lcp tokens, in place of sum of len). Suffixes that start at the same position
are batched (right-padded: the padding comes after the real tokens, so causal attention never sees it), and
the output head runs only at the positions some request scores.

`rolling_windows` turns a long text into such requests (lm-eval's `loglikelihood_rolling` windows).
`forward_from_kv` is the one function that reaches into the model (its KV cache, hidden states and head).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from camelid.errors import CamelidError
from camelid.model import Llama


@dataclass(frozen=True)
class Request:
    """Score `continuation` after `context` (both token ids; the context is never empty)."""

    context: Sequence[int]
    continuation: Sequence[int]


@dataclass
class KVPool:
    """Keys and values of computed tokens, one slot per token: per layer [slots, n_kv_heads, head_dim]
    (allocated by forward_from_kv on first use, in the dtype and on the device of the model's cache)."""

    slots: int
    k: list[Tensor] = field(default_factory=list)
    v: list[Tensor] = field(default_factory=list)


@torch.inference_mode()
def forward_from_kv(model: Llama, ids: Tensor, start: int, pool: KVPool, prefix_slots: Tensor,
                    new_slots: Tensor, select: Tensor) -> Tensor:
    """The one place that reaches into the model's internals (each block's `attention.kv_cache` tensors,
    `hidden_states` and the `output` head); port this function when the model's API changes.

    ids [B, L] are tokens at positions start .. start+L-1 of B sequences whose earlier positions' keys and
    values are pool slots prefix_slots [B, start]. Stores the new keys and values in pool slots new_slots
    [B, L] and returns the logits [len(select), vocab] of the flattened positions `select` (indices into B*L).
    The index tensors may live on the CPU: they follow the model's cache to its device.
    """
    B, L = ids.shape
    model.setup_cache(B, start + L)
    caches = [block.attention.kv_cache for block in model.layers]
    device, dtype = caches[0].k.device, caches[0].k.dtype
    if not pool.k:
        shape = (pool.slots, model.config.n_kv_heads, model.config.head_dim)
        pool.k = [torch.empty(shape, dtype=dtype, device=device) for _ in caches]
        pool.v = [torch.empty(shape, dtype=dtype, device=device) for _ in caches]
    ids, prefix_slots = ids.to(device), prefix_slots.to(device)
    flat, select = new_slots.reshape(-1).to(device), select.to(device)
    if start:
        for layer, cache in enumerate(caches):
            cache.k[:, :, :start] = pool.k[layer][prefix_slots].transpose(1, 2)
            cache.v[:, :, :start] = pool.v[layer][prefix_slots].transpose(1, 2)
    positions = torch.arange(start, start + L, device=device)
    hidden = model.hidden_states(ids, positions)
    for layer, cache in enumerate(caches):
        pool.k[layer][flat] = cache.k[:, :, start:].transpose(1, 2).reshape(B * L, *pool.k[layer].shape[1:])
        pool.v[layer][flat] = cache.v[:, :, start:].transpose(1, 2).reshape(B * L, *pool.v[layer].shape[1:])
    return model.output(hidden.reshape(B * L, -1)[select]).float()


@dataclass
class _Piece:
    seq: int  # index into the sorted unique sequences
    start: int
    end: int



def scored_tokens(request: Request, max_length: int) -> tuple[list[int], list[int]]:
    """A scoring request's context + continuation cut from the left to max_length + 1 tokens, and its
    continuation; a request that cannot be scored is a one-line error."""
    cont = list(request.continuation)
    if not request.context or not cont:
        raise CamelidError("a scoring request needs a non-empty context and continuation")
    if len(cont) > max_length:
        raise CamelidError(f"a continuation of {len(cont)} tokens does not fit the context window of "
                           f"{max_length}; shorten it or raise max_length")
    return (list(request.context) + cont)[-(max_length + 1):], cont


def loglikelihood(model: Llama, requests: Sequence[Request], *, max_length: int | None = None,
                  batch_tokens: int = 1024, piece_tokens: int = 512, pool_bytes: int = 512 << 20,
                  on_tokens: Callable[[int, int], None] | None = None, stats: dict[str, int] | None = None
                  ) -> list[tuple[float, bool]]:
    """(log-probability of the continuation, whether it is the greedy continuation) for each request.

    A sequence longer than max_length + 1 (default: the model's context) loses tokens from the left, as in
    lm-eval. batch_tokens bounds the new tokens of one forward pass, piece_tokens the tokens of one
    sequence in one pass (long windows go in pieces), pool_bytes the keys and values kept for sharing.
    on_tokens(done, total) reports progress in computed tokens; `stats` receives the tokens read by the
    requests ("tokens_requested", what scoring each on its own costs) and those computed ("tokens_computed").
    """
    max_length = max_length or model.config.max_seq_len
    seq_index: dict[tuple[int, ...], int] = {}
    wanted: list[tuple[int, int, list[int]]] = []  # per request: sequence, position scoring cont[0], cont
    vocab = model.config.vocab_size
    for r in requests:
        full, cont = scored_tokens(r, max_length)
        if any(not 0 <= t < vocab for t in full):
            raise CamelidError(f"a token id is outside the model's vocabulary (size {vocab})")
        seq = tuple(full[:-1])
        wanted.append((seq_index.setdefault(seq, len(seq_index)), len(seq) - len(cont), cont))
    seqs = sorted(seq_index)
    rank = {seq_index[s]: i for i, s in enumerate(seqs)}
    wanted = [(rank[i], first, cont) for i, first, cont in wanted]

    # plan: the new tokens of each sequence (after its common prefix with the one before), in pool chunks
    c = model.config  # pool size counted at 4 bytes a value (fp32; a bf16 model keeps twice the tokens' worth)
    pool_tokens = max(1, pool_bytes // (2 * c.n_layers * c.n_kv_heads * c.head_dim * 4))
    slots: list[np.ndarray] = []
    chunks: list[list[_Piece]] = [[]]
    chunk_first_slot = [0]
    next_slot = 0
    for i, seq in enumerate(seqs):
        start = len(os.path.commonprefix([seqs[i - 1], seq])) if i else 0
        if next_slot - chunk_first_slot[-1] + len(seq) - start > pool_tokens and chunks[-1]:
            chunks.append([])  # a new pool: this sequence recomputes its prefix
            chunk_first_slot.append(next_slot)
            start = 0
        new = np.arange(next_slot, next_slot + len(seq) - start)
        slots.append(np.concatenate([slots[i - 1][:start], new]) if start else new)
        next_slot += len(new)
        for s in range(start, len(seq), piece_tokens):
            chunks[-1].append(_Piece(i, s, min(s + piece_tokens, len(seq))))
    chunk_first_slot.append(next_slot)
    if stats is not None:
        stats["tokens_requested"] = stats.get("tokens_requested", 0) + sum(len(seqs[i]) for i, _, _ in wanted)
        stats["tokens_computed"] = stats.get("tokens_computed", 0) + next_slot

    needed: dict[int, set[int]] = {}  # pool slot -> the token ids scored at that position
    for i, first, cont in wanted:
        for j, t in enumerate(cont):
            needed.setdefault(int(slots[i][first + j]), set()).add(t)

    logprob: dict[tuple[int, int], float] = {}
    greedy: dict[int, int] = {}
    done = 0
    try:
        for c, pieces in enumerate(chunks):
            base, size = chunk_first_slot[c], chunk_first_slot[c + 1] - chunk_first_slot[c]
            pool = KVPool(size + 1)  # the last slot takes the padding's keys and values
            trash = size
            for start, batch in _batches(pieces, batch_tokens, piece_tokens):
                # a row reads its piece from `start`: tokens before the piece's own start are recomputed
                # (their keys and values go to the trash slot) so that pieces of nearby starts share a pass
                L = max(p.end - start for p in batch)
                ids = torch.zeros(len(batch), L, dtype=torch.long)
                new_slots = torch.full((len(batch), L), trash, dtype=torch.long)
                prefix = torch.zeros(len(batch), start, dtype=torch.long)
                sel_index: list[int] = []
                sel_slot: list[int] = []
                for b, p in enumerate(batch):
                    row = slots[p.seq]
                    ids[b, :p.end - start] = torch.tensor(seqs[p.seq][start:p.end])
                    new_slots[b, p.start - start:p.end - start] = torch.from_numpy(row[p.start:p.end] - base)
                    if start:
                        prefix[b] = torch.from_numpy(row[:start] - base)
                    for j in range(p.start, p.end):
                        if int(row[j]) in needed:
                            sel_index.append(b * L + j - start)
                            sel_slot.append(int(row[j]))
                logits = forward_from_kv(model, ids, start, pool, prefix, new_slots,
                                         torch.tensor(sel_index, dtype=torch.long))
                if sel_slot:
                    _collect(logits, sel_slot, needed, logprob, greedy)
                done += sum(p.end - p.start for p in batch)
                if on_tokens is not None:
                    on_tokens(done, next_slot)
            del pool
    finally:
        model.clear_cache()

    results = []
    for i, first, cont in wanted:
        row = slots[i]
        total, is_greedy = 0.0, True
        for j, t in enumerate(cont):
            slot = int(row[first + j])
            total += logprob[slot, t]
            is_greedy = is_greedy and greedy[slot] == t
        results.append((total, is_greedy))
    return results


def _batches(pieces: list[_Piece], batch_tokens: int, piece_tokens: int, pass_cost: int = 32
             ) -> list[tuple[int, list[_Piece]]]:
    """(start, pieces) of each forward pass, in order of start.

    Pieces are taken in order of start; each joins the open pass of its length class (1-2, 3-4, 5-8, ...
    tokens) if that adds at most `pass_cost` tokens of padding and recomputation (what a pass costs beyond its
    tokens, roughly), keeps the pass within batch_tokens padded tokens and no row over piece_tokens; else it
    opens a new pass. A pass only reads keys and values of positions before its start, which pieces of
    smaller starts computed in earlier passes."""
    out: list[tuple[int, list[_Piece]]] = []
    open_passes: dict[int, tuple[int, list[_Piece], int]] = {}  # length class -> (start, pieces, longest row)
    for p in sorted(pieces, key=lambda p: (p.start, p.end)):
        size = (p.end - p.start - 1).bit_length()
        if size in open_passes:
            start, batch, longest = open_passes[size]
            row = max(longest, p.end - start)
            waste = (len(batch) + 1) * row - len(batch) * longest - (p.end - p.start)
            if row <= piece_tokens and (len(batch) + 1) * row <= batch_tokens and waste <= pass_cost:
                batch.append(p)
                open_passes[size] = (start, batch, row)
                continue
            out.append((start, batch))
        open_passes[size] = (p.start, [p], p.end - p.start)
    out += [(start, batch) for start, batch, _ in open_passes.values()]
    return sorted(out, key=lambda pass_: pass_[0])


def _collect(logits: Tensor, slots: list[int], needed: dict[int, set[int]],
             logprob: dict[tuple[int, int], float], greedy: dict[int, int]) -> None:
    logp = torch.log_softmax(logits, dim=-1)
    rows = [r for r, s in enumerate(slots) for _ in needed[s]]
    targets = [t for s in slots for t in needed[s]]
    values = logp[rows, targets].tolist()
    for r, t, v in zip(rows, targets, values, strict=True):
        logprob[slots[r], t] = v
    for s, g in zip(slots, logits.argmax(dim=-1).tolist(), strict=True):
        greedy[s] = g


def rolling_windows(tokens: Sequence[int], prefix_token: int, window: int, stride: int | None = None
                    ) -> list[Request]:
    """Requests that score every token of `tokens` exactly once, each window reading at most `window` tokens.

    The first window reads `prefix_token` and tokens[:window-1]; every later window scores the next
    `stride` (default: window) tokens given the window - stride tokens before them. With stride = window
    this is lm-eval's `loglikelihood_rolling` (get_rolling_token_windows with context_len 1, disjoint).
    """
    stride = stride or window
    if not 1 <= stride <= window:
        raise CamelidError(f"stride must be between 1 and the window ({window}), got {stride}")
    tokens = list(tokens)
    if not tokens:
        return []
    first = min(window, len(tokens))
    out = [Request([prefix_token], tokens[:first])]
    scored = first
    while scored < len(tokens):
        n = min(len(tokens) - scored, stride)
        end = scored + n
        out.append(Request(tokens[end - window - 1:end - n], tokens[end - n:end]))
        scored = end
    return out
