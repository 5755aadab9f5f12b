"""The serving engine: continuous batching over a slotted KV cache, on one thread that owns the model.

The KV cache has one row per slot: [n_layers, 2, slots, n_kv_heads, context, head_dim], one tensor, each layer's
`KVCache` a view of its part. A running sequence owns one row and keeps its own positions there (0, 1, 2, ...),
so sequences of any lengths share a decode step without padding. Running sequences always occupy rows
0..n-1: when one finishes, the last row's sequence moves into its row (a copy of its filled positions), so the
batch is a prefix of the cache rows.

Every iteration of the loop:
1. runs queued jobs (embeddings), retires cancelled and timed-out sequences;
2. admits waiting sequences into free rows; a prompt whose first blocks are in the prefix cache gets their keys
   and values copied into its row, and its prefill starts after them;
3. prefills up to `prefill_chunk` prompt tokens (whole prompts, or chunks of long ones, so decoding sequences
   wait at most one chunk); a prompt's last chunk gives its first token;
4. decodes one token for every sequence past its prompt, in one batched step: the C++ whole-model step with one
   row per sequence (camelid.variants.decode_step) where it runs, else the model's per-layer forward with
   per-row positions [B, 1].
Results go back through each sequence's `emit` callback, called on the engine thread.

LoRA adapters: `adapters` maps a name to a model with the same config and the adapter merged into its weights
(what `camelid.load(..., adapter=DIR)` returns). A sequence names its adapter (`Sequence.adapter`); every model's
KV cache is a view of the same slot tensor, so sequences of different adapters share the slots, and a decode
step runs one batched call per adapter in use. The prefix cache keeps each adapter's blocks apart (their keys
and values differ).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from camelid.errors import CamelidError
from camelid.generate import SamplingParams, apply_repetition_penalty, sample
from camelid.model import KVCache, Llama
from camelid.serve.prefix_cache import PrefixCache
from camelid.serve.structured import Constraint
from camelid.variants.decode_step import decode_step


class QueueFull(CamelidError):
    """The engine's waiting queue is full (the API answers 429)."""


@dataclass
class Token:
    """One generated token; logprob and top (the `top_logprobs` most likely (id, logprob)) under the raw model."""

    id: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


@dataclass
class PromptLogprobs:
    """Log-probabilities of the prompt's tokens under the model (None for the first), and each position's top."""

    logprobs: list[float | None]
    top: list[list[tuple[int, float]] | None]


@dataclass
class Done:
    reason: str  # "stop", "length", "cancelled" or "error"
    message: str = ""


Event = Token | PromptLogprobs | Done


@dataclass(eq=False)
class Sequence:
    """One sequence to generate: what the caller sets, then the engine's state of it."""

    prompt: list[int]
    max_tokens: int
    emit: Callable[[Event], None]
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    stop_ids: frozenset[int] = frozenset()
    logprobs: int | None = None  # None: no log-probabilities; k: the chosen token's and the top k
    prompt_logprobs: bool = False  # echo: the prompt tokens' log-probabilities (the prompt is prefilled whole)
    logit_bias: dict[int, float] = field(default_factory=dict)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    constraint: Constraint | None = None
    timeout: float | None = None  # seconds from submission, then finished with reason "length"
    adapter: str | None = None  # a LoRA adapter's name (Engine's `adapters`), None: the base model
    # engine state
    row: int = -1
    length: int = 0  # positions of this sequence in its cache row
    cached_tokens: int = 0  # prompt tokens found in the prefix cache
    # ids of the prefix cache's blocks that this row holds bit for bit, a chain from position 0: rows with a
    # common chain share those positions' keys and values, so a step reads them once
    kv_blocks: list[int] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    next_token: int | None = None  # sampled, not yet in the cache
    prompt_scores: PromptLogprobs | None = None  # with prompt_logprobs, filled chunk by chunk
    cancelled: bool = False
    submitted: float = 0.0
    first_token_at: float | None = None
    last_token_at: float | None = None
    generator: torch.Generator | None = None
    bias: tuple[Tensor, Tensor] | None = None  # logit_bias as (ids, values) tensors, built at the first token

    def cancel(self) -> None:
        """Free the slot at the engine's next iteration (from any thread)."""
        self.cancelled = True


class Metrics:
    """What the engine reports; camelid.serve.metrics implements it with Prometheus metrics."""

    def time_to_first_token(self, seconds: float) -> None: ...
    def inter_token(self, seconds: float) -> None: ...
    def tokens(self, prompt: int, generated: int, cached: int) -> None: ...
    def finished(self, reason: str, seconds: float) -> None: ...


KV_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def kv_cache_dtype(kv_dtype: str | torch.dtype | None) -> torch.dtype | None:
    """The torch dtype of a KV-cache dtype option ("fp32", "fp16", a torch dtype or None), or a one-line error."""
    if kv_dtype is None or kv_dtype in KV_DTYPES.values():
        return kv_dtype  # type: ignore[return-value]
    if kv_dtype not in KV_DTYPES:
        raise CamelidError(f"KV-cache dtype {kv_dtype!r}: choose one of {', '.join(KV_DTYPES)}")
    return KV_DTYPES[kv_dtype]


def cache_view(k: Tensor, v: Tensor) -> KVCache:
    """A KVCache over existing storage (rows of the engine's one KV tensor)."""
    cache = KVCache(0, k.shape[1], k.shape[2], k.shape[3], k.dtype, k.device)
    cache.k, cache.v = k, v
    return cache


@dataclass(eq=False)
class _Served:
    """One model the engine runs (the base, or the base with an adapter merged): its cache views and its step."""

    model: Llama
    all_rows: list[KVCache]  # each layer's view of every slot
    row: list[list[KVCache]]  # [slot][layer]: each layer's view of one slot
    step: Any  # DecodeStep | None (None: the per-layer forward)
    root: int  # the prefix cache's chain root for this model


class Engine:
    def __init__(self, model: Llama, *, slots: int = 8, context: int | None = None, max_queue: int = 64,
                 prefill_chunk: int = 256, prefix_cache_bytes: int = 256 << 20, prefix_block: int = 16,
                 metrics: Metrics | None = None, use_decode_step: bool = True,
                 adapters: dict[str, Llama] | None = None, kv_dtype: str | torch.dtype | None = None,
                 interleave: bool = False) -> None:
        """kv_dtype: what the KV cache stores, "fp32" or "fp16" (None: the model's dtype). An fp16 cache halves
        the bytes each step's attention reads; keys and values are rounded to fp16 when written (prefill and
        step) and attention still computes in fp32.

        interleave: with more than one slot, the C++ step of an int8/int4 model keeps a second copy of the
        weights laid out for several sequences at once (`camelid.variants.decode_step.decode_step`): ~1.4x faster
        steps, for 1 (int8) or 0.56 (int4) bytes per weight more memory; its logits equal the plain step's (and
        `camelid generate`'s) up to float summation order, which int8 activations can amplify into a different
        greedy token."""
        cfg = model.config
        for name, other in (adapters or {}).items():
            if other.config != cfg or other.norm.weight.dtype != model.norm.weight.dtype:
                raise CamelidError(f"adapter {name!r}: its model differs from the served model's config or dtype; "
                                   "load it from the same base with the same --quantize")
        context = min(context or cfg.max_seq_len, cfg.max_seq_len)
        if slots < 1 or context < 2:
            raise CamelidError(f"need at least 1 slot and 2 positions of context, got {slots} and {context}")
        self.model, self.slots, self.context = model.eval(), slots, context
        self.max_queue, self.prefill_chunk = max_queue, prefill_chunk
        self.interleave = interleave and slots > 1
        self.metrics = metrics or Metrics()
        dtype = kv_cache_dtype(kv_dtype) or model.norm.weight.dtype
        device = model.norm.weight.device
        self.kv = torch.zeros(cfg.n_layers, 2, slots, cfg.n_kv_heads, context, cfg.head_dim, dtype=dtype,
                              device=device)
        self._models: dict[str | None, _Served] = {}
        for root, (name, m) in enumerate([(None, model), *(adapters or {}).items()]):
            self._models[name] = self._serve(m.eval(), -root, use_decode_step)
        self.adapters = [name for name in self._models if name is not None]
        self.prefix_cache = PrefixCache(prefix_cache_bytes, prefix_block) if prefix_cache_bytes > 0 else None
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # running[i].row == i
        self._jobs: deque[tuple[Callable[[], Any], Future]] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self.steps = 0  # decode steps run
        self._thread = threading.Thread(target=self._loop, name="camelid-engine", daemon=True)

    def _serve(self, model: Llama, root: int, use_decode_step: bool) -> _Served:
        L, kv = range(model.config.n_layers), self.kv
        all_rows = [cache_view(kv[i, 0], kv[i, 1]) for i in L]
        row = [[cache_view(kv[i, 0, r:r + 1], kv[i, 1, r:r + 1]) for i in L] for r in range(self.slots)]
        self._install(all_rows, model)
        model.cache_len = self.context
        step = decode_step(model, interleave=self.interleave, greedy=False) if use_decode_step else None
        return _Served(model, all_rows, row, step, root)

    @property
    def step(self) -> Any:
        """The base model's C++ decode step, or None where the per-layer forward runs."""
        return self._models[None].step

    @step.setter
    def step(self, step: Any) -> None:
        self._models[None].step = step

    # -- the interface (any thread) -------------------------------------------------------------------------
    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue sequences (a request's n choices together, so they are admitted in order); QueueFull when the
        waiting queue has no room for them."""
        for seq in seqs:
            if not seq.prompt:
                raise CamelidError("the prompt is empty; give at least one token")
            if seq.adapter not in self._models:
                raise CamelidError(f"no adapter named {seq.adapter!r}; this engine serves "
                                   f"{', '.join(map(repr, self.adapters)) or 'none'}")
            if len(seq.prompt) + max(seq.max_tokens, 0) > self.context:
                raise CamelidError(f"the prompt ({len(seq.prompt)} tokens) plus max_tokens ({seq.max_tokens}) "
                                   f"exceeds the context of {self.context} tokens")
        now = time.monotonic()
        with self._lock:
            if len(self.waiting) + len(seqs) > self.max_queue:
                raise QueueFull(f"the server is busy ({len(self.waiting)} requests waiting); retry later")
            for seq in seqs:
                seq.submitted = now
                if seq.seed is not None:
                    seq.generator = torch.Generator().manual_seed(seq.seed)
                self.waiting.append(seq)
        self._wake.set()

    def cancel(self, seq: Sequence) -> None:
        seq.cancel()
        self._wake.set()

    def run(self, fn: Callable[[], Any]) -> Future:
        """Run fn() on the engine thread between two steps (it may use the model); its result as a Future."""
        future: Future = Future()
        with self._lock:
            self._jobs.append((fn, future))
        self._wake.set()
        return future

    def queue_depth(self) -> int:
        return len(self.waiting)

    def cache_usage(self) -> float:
        """The fraction of the KV cache's positions that running sequences fill."""
        return sum(s.length for s in list(self.running)) / (self.slots * self.context)

    # -- the loop (engine thread) ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop:
            if not (self.running or self.waiting or self._jobs):
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                with torch.inference_mode():
                    self._iteration()
            except Exception as e:  # noqa: BLE001 - a bug must not take the server down: fail the batch
                traceback.print_exc(file=sys.stderr)
                for seq in list(self.running):
                    self._finish(seq, Done("error", f"internal error: {e}"))
        for seq in list(self.running) + list(self.waiting):
            seq.emit(Done("cancelled", "the server is shutting down"))

    def _iteration(self) -> None:
        while self._jobs:
            with self._lock:
                fn, future = self._jobs.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except Exception as e:  # noqa: BLE001 - handed to the caller
                    future.set_exception(e)
        with self._lock:
            dropped = [s for s in self.waiting if s.cancelled]
            if dropped:
                self.waiting = deque(s for s in self.waiting if not s.cancelled)
        for seq in dropped:
            seq.emit(Done("cancelled"))
        now = time.monotonic()
        for seq in list(self.running):
            if seq.cancelled:
                self._finish(seq, Done("cancelled"))
            elif seq.timeout is not None and now - seq.submitted > seq.timeout:
                self._finish(seq, Done("length", "the request's time limit was reached"))
        self._admit()
        self._prefill()
        self._decode()

    def _admit(self) -> None:
        while len(self.running) < self.slots:
            with self._lock:
                if not self.waiting:
                    return
                seq = self.waiting.popleft()
            if seq.cancelled:
                seq.emit(Done("cancelled"))
                continue
            seq.row = len(self.running)
            self.running.append(seq)
            seq.length = 0
            if self.prefix_cache is not None and not seq.prompt_logprobs:
                # at least the last prompt token is computed: its logits give the first new token
                blocks = self.prefix_cache.find(seq.prompt[:-1], root=self._models[seq.adapter].root)
                seq.kv_blocks = [b.id for b in blocks]
                n = 0
                for b in blocks:  # straight into the row, without concatenating the blocks first
                    width = b.kv.shape[3]
                    self.kv[:, :, seq.row, :, n:n + width] = b.kv
                    n += width
                seq.length = seq.cached_tokens = n

    def _prefill(self) -> None:
        budget = self.prefill_chunk
        for seq in list(self.running):
            if budget <= 0:
                return
            if seq.length >= len(seq.prompt) or seq.cancelled:
                continue
            start = seq.length
            end = min(len(seq.prompt), start + budget)
            budget -= end - start
            logits = self._forward_row(seq.row, seq.prompt[start:end], start, all_logits=seq.prompt_logprobs,
                                       adapter=seq.adapter)
            seq.length = end
            if seq.prompt_logprobs:
                self._prompt_logprobs(seq, start, end, logits[0])
            if end < len(seq.prompt):
                continue
            if self.prefix_cache is not None:
                chain = self.prefix_cache.store(seq.prompt, lambda a, b, row=seq.row: self.kv[:, :, row, :, a:b],
                                                root=self._models[seq.adapter].root)
                # the chain past the blocks this row was given: blocks copied from this row hold its values, a
                # block stored meanwhile by another request holds that request's (maybe differently rounded) ones
                for block_id, stored in chain[len(seq.kv_blocks):]:
                    if not stored:
                        break
                    seq.kv_blocks.append(block_id)
            self.metrics.tokens(len(seq.prompt), 0, seq.cached_tokens)
            if seq.max_tokens == 0:
                self._finish(seq, Done("length"))
                continue
            self._choose(seq, logits[0, -1])

    def _decode(self) -> None:
        batch = [s for s in self.running if s.next_token is not None]
        if not batch:
            return
        groups: dict[str | None, list[Sequence]] = {}
        for s in batch:
            groups.setdefault(s.adapter, []).append(s)
        chosen = []
        for adapter, group in groups.items():
            logits = self.forward_rows([s.next_token for s in group], [s.length for s in group],
                                       [s.row for s in group], adapter=adapter, shared=self._shared_prefixes(group))
            # each group's lengths before the next group's call (the per-layer forward writes every row at its
            # length) and every length before any choice (a sequence that finishes moves another's row, up
            # to its length)
            for seq in group:
                seq.length += 1
                seq.next_token = None
            chosen += zip(group, logits, self._greedy(group, logits), strict=True)
        self.steps += 1
        for seq, row_logits, token in chosen:
            self._choose(seq, row_logits, token)

    @staticmethod
    def _greedy(group: list[Sequence], logits: Tensor) -> list[int | None]:
        """The argmax of each row whose choice is plain greedy (logit_bias allowed; no penalties, grammar or
        log-probabilities), in one call for the whole step rather than one per row (each a parallel region,
        which costs most on a busy machine); None for the other rows, which `_choose` scores alone."""
        plain = [s.params.temperature == 0 and s.params.repetition_penalty == 1.0 and s.constraint is None
                 and s.logprobs is None and not (s.generated and (s.presence_penalty or s.frequency_penalty))
                 for s in group]
        if not any(plain):
            return [None] * len(group)
        x = logits.float()
        biased = [i for i, s in enumerate(group) if plain[i] and s.logit_bias]
        if biased:
            x = x.clone() if x.data_ptr() == logits.data_ptr() else x
            for i in biased:
                x[i].index_add_(0, *Engine._bias(group[i]))
        tokens = x.argmax(dim=-1).tolist()
        return [t if p else None for t, p in zip(tokens, plain, strict=True)]

    @staticmethod
    def _bias(seq: Sequence) -> tuple[Tensor, Tensor]:
        """seq's logit_bias as (ids, values) tensors, built once."""
        if seq.bias is None:
            seq.bias = (torch.tensor(list(seq.logit_bias)),
                        torch.tensor(list(seq.logit_bias.values()), dtype=torch.float32))
        return seq.bias

    def _shared_prefixes(self, group: list[Sequence]) -> tuple[list[int], list[int]] | None:
        """(source rows, shared positions) for a step of `group`: each sequence reads the longest block chain it
        has in common with an earlier sequence of the group from that sequence's row (the earliest of the
        longest), a whole number of 16 positions; None where no two sequences share a block."""
        if self.prefix_cache is None:
            return None
        sources, shared = [], []
        for i, s in enumerate(group):
            best, source = 0, 0
            for t in group[:i]:
                n = len(os.path.commonprefix([s.kv_blocks, t.kv_blocks]))
                if n > best:
                    best, source = n, t.row
            positions = best * self.prefix_cache.block // 16 * 16
            sources.append(source if positions else 0)
            shared.append(positions)
        return (sources, shared) if any(shared) else None

    # -- model calls --------------------------------------------------------------------------------------------
    @staticmethod
    def _install(caches: list[KVCache], model: Llama) -> None:
        for block, cache in zip(model.layers, caches, strict=True):
            block.attention.kv_cache = cache

    def _forward_row(self, row: int, ids: list[int], start: int, all_logits: bool, adapter: str | None = None
                     ) -> Tensor:
        """Logits [1, T, V] (or [1, 1, V]) of prompt tokens `ids` at positions start.. of cache row `row`."""
        served = self._models[adapter]
        self._install(served.row[row], served.model)
        try:
            positions = torch.arange(start, start + len(ids), device=self.kv.device)
            return served.model(torch.tensor([ids], device=self.kv.device), positions, last_only=not all_logits)
        finally:
            self._install(served.all_rows, served.model)

    def forward_rows(self, tokens: list[int], positions: list[int], rows: list[int], adapter: str | None = None,
                     shared: tuple[list[int], list[int]] | None = None) -> Tensor:
        """Logits [B, V] of one new token per sequence: tokens[b] at positions[b] of cache row rows[b]; shared:
        (source rows, positions) whose keys and values the C++ step may read from the source rows instead
        (`_shared_prefixes`)."""
        served = self._models[adapter]
        if served.step is not None:
            return served.step.rows(tokens, positions, rows, *(shared or (None, None)))
        # the per-layer forward over rows 0..n-1: rows not in this step (still in prefill) get a token at the
        # position their prefill writes next, which overwrites it
        n = max(rows) + 1
        ids = torch.zeros(n, 1, dtype=torch.long)
        pos = torch.tensor([[self.running[r].length if r < len(self.running) else 0] for r in range(n)])
        for t, p, r in zip(tokens, positions, rows, strict=True):
            ids[r, 0], pos[r, 0] = t, p
        self._install([cache_view(c.k[:n], c.v[:n]) for c in served.all_rows], served.model)
        try:
            logits = served.model(ids.to(self.kv.device), pos.to(self.kv.device), last_only=True)[:, -1]
        finally:
            self._install(served.all_rows, served.model)
        return logits[rows]

    # -- tokens ---------------------------------------------------------------------------------------------------
    def _prompt_logprobs(self, seq: Sequence, start: int, end: int, logits: Tensor) -> None:
        """Log-probabilities of prompt tokens start+1..end from the logits of positions start..end-1."""
        logprobs = F.log_softmax(logits.float(), dim=-1)
        targets = torch.tensor(seq.prompt[start + 1:end + 1] if end < len(seq.prompt) else seq.prompt[start + 1:end])
        chosen = logprobs[: len(targets)].gather(-1, targets[:, None])[:, 0].tolist()
        k = seq.logprobs or 0
        tops: list[list[tuple[int, float]] | None] = [None] * len(targets)
        if k:
            values, ids = logprobs[: len(targets)].topk(k, dim=-1)
            tops = [list(zip(i.tolist(), v.tolist(), strict=True)) for i, v in zip(ids, values, strict=True)]
        if start == 0:
            chosen, tops = [None, *chosen], [None, *tops]
        if seq.prompt_scores is None:
            seq.prompt_scores = PromptLogprobs([], [])
        seq.prompt_scores.logprobs.extend(chosen)
        seq.prompt_scores.top.extend(tops)
        if end == len(seq.prompt):
            seq.emit(seq.prompt_scores)

    def _choose(self, seq: Sequence, logits: Tensor, token: int | None = None) -> None:
        """Sample seq's next token from its logits [V] (or take `token`, `_greedy`'s choice from them), report
        it, and finish the sequence or queue the token."""
        if token is None:
            token = self._sample(seq, logits)
        event = Token(token)
        if seq.logprobs is not None:
            logprobs = F.log_softmax(logits.float(), dim=-1)
            event.logprob = float(logprobs[token])
            if seq.logprobs:
                values, ids = logprobs.topk(seq.logprobs)
                event.top = list(zip(ids.tolist(), values.tolist(), strict=True))
        now = time.monotonic()
        if seq.first_token_at is None:
            seq.first_token_at = now
            self.metrics.time_to_first_token(now - seq.submitted)
        else:
            self.metrics.inter_token(now - (seq.last_token_at or now))
        seq.last_token_at = now
        seq.generated.append(token)
        self.metrics.tokens(0, 1, 0)
        if token in seq.stop_ids:
            self._finish(seq, Done("stop"))
            return
        seq.emit(event)
        grammar_open = seq.constraint.advance(token) if seq.constraint is not None else True
        if not grammar_open:
            self._finish(seq, Done("stop"))
        elif len(seq.generated) >= seq.max_tokens:
            self._finish(seq, Done("length"))
        else:
            seq.next_token = token

    def _sample(self, seq: Sequence, logits: Tensor) -> int:
        """seq's next token from its logits [V]: logit_bias, penalties, grammar, then `sample`."""
        x = logits.float()
        if seq.logit_bias:
            x = x.index_add(0, *self._bias(seq))
        if seq.generated and (seq.presence_penalty or seq.frequency_penalty):
            counts = torch.bincount(torch.tensor(seq.generated), minlength=x.shape[-1]).to(x.dtype)
            x = x - seq.frequency_penalty * counts - seq.presence_penalty * (counts > 0).to(x.dtype)
        if seq.params.repetition_penalty != 1.0:
            seen = torch.tensor([seq.prompt + seq.generated])
            x = apply_repetition_penalty(x[None], seen, seq.params.repetition_penalty)[0]
        if seq.constraint is not None:
            x = seq.constraint.mask(x)
        return int(sample(x[None], seq.params, seq.generator)[0])

    def _finish(self, seq: Sequence, done: Done) -> None:
        """Report `done` and free seq's row: the last running sequence moves into it."""
        i = seq.row
        if 0 <= i < len(self.running) and self.running[i] is seq:
            last = self.running.pop()
            if last is not seq:
                n = last.length
                self.kv[:, :, i, :, :n] = self.kv[:, :, last.row, :, :n]
                last.row = i
                self.running[i] = last
        seq.row = -1
        seq.next_token = None
        self.metrics.finished(done.reason, time.monotonic() - seq.submitted)
        with contextlib.suppress(Exception):  # a caller gone away must not stop the engine
            seq.emit(done)
