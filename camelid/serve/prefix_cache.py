"""The prefix cache: keys and values of prompt blocks already computed, so that requests sharing a system prompt
(or a conversation's earlier turns) skip its prefill.

Prompts are cut into blocks of `block` tokens. A block's entry is found by its tokens and its parent block's
entry (a chain from position 0, as in vLLM's automatic prefix caching), so one entry stands for exactly one
prefix and any prompt that starts with it finds it. An entry holds the block's keys and values of every layer,
[n_layers, 2, n_kv_heads, block, head_dim]. Least recently used entries are dropped when the byte budget is full.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor


@dataclass
class Block:
    id: int
    kv: Tensor  # [n_layers, 2, n_kv_heads, block, head_dim]


class PrefixCache:
    def __init__(self, max_bytes: int, block: int = 16) -> None:
        self.max_bytes, self.block = max_bytes, block
        self._entries: OrderedDict[tuple[int, tuple[int, ...]], Block] = OrderedDict()  # LRU order, oldest first
        self._ids = itertools.count(1)
        self.bytes = 0
        self.hits = self.lookups = 0  # requests that found a prefix / all lookups
        self.tokens_reused = 0

    def lookup(self, tokens: list[int], root: int = 0) -> list[Tensor]:
        """The cached blocks at the start of `tokens`, longest chain first to last (may be empty). `root` (0 or
        negative) keeps the chains of different models (LoRA adapters) apart."""
        return [block.kv for block in self.find(tokens, root)]

    def find(self, tokens: list[int], root: int = 0) -> list[Block]:
        """`lookup`'s blocks with their ids (an id is never reused: equal ids, equal keys and values)."""
        self.lookups += 1
        found: list[Block] = []
        chain, parent = [], root
        for start in range(0, len(tokens) - self.block + 1, self.block):
            key = (parent, tuple(tokens[start:start + self.block]))
            entry = self._entries.get(key)
            if entry is None:
                break
            found.append(entry)
            chain.append(key)
            parent = entry.id
        self._touch(chain)
        if found:
            self.hits += 1
            self.tokens_reused += len(found) * self.block
        return found

    def store(self, tokens: list[int], kv_of: Callable[[int, int], Tensor], root: int = 0
              ) -> list[tuple[int, bool]]:
        """Remember every whole block of `tokens` not cached yet; kv_of(start, end) returns the keys and values
        of positions [start, end) as [n_layers, 2, n_kv_heads, end - start, head_dim] (copied out of the cache
        only for the new blocks); `root` as in lookup. Returns the chain's (block id, stored by this call)."""
        chain, parent, ids = [], root, []
        for start in range(0, len(tokens) - self.block + 1, self.block):
            key = (parent, tuple(tokens[start:start + self.block]))
            entry = self._entries.get(key)
            new = entry is None
            if entry is None:
                kv = kv_of(start, start + self.block).clone()
                size = kv.numel() * kv.element_size()
                while self.bytes + size > self.max_bytes and self._evict(protect=chain):
                    pass
                if self.bytes + size > self.max_bytes:
                    break
                entry = self._entries[key] = Block(next(self._ids), kv)
                self.bytes += size
            chain.append(key)
            ids.append((entry.id, new))
            parent = entry.id
        self._touch(chain)
        return ids

    def _touch(self, chain: list[tuple[int, tuple[int, ...]]]) -> None:
        # most recently used: the chain's last block first and its first block last, so a parent is never
        # older than its children and the oldest entry is a leaf (or an orphan, unreachable anyway)
        for key in reversed(chain):
            self._entries.move_to_end(key)

    def _evict(self, protect: list[tuple[int, tuple[int, ...]]]) -> bool:
        """Drop the oldest entry outside `protect` (the chain being stored); False when there is none."""
        for key in self._entries:
            if key not in protect:
                entry = self._entries.pop(key)
                self.bytes -= entry.kv.numel() * entry.kv.element_size()
                return True
        return False

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

