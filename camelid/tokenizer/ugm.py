"""Unigram vocabularies (GGUF `tokenizer.ggml.model` "t5": T5, XLM-RoBERTa, nomic-bert-moe) encoded exactly as
llama.cpp's UGM tokenizer does (llm_tokenizer_ugm_session).

1. Special tokens are cut out of the text first (camelid.tokenizer.bpe.partition).
2. Each fragment is normalised byte by byte: the longest prefix found in SentencePiece's precompiled character
   map (a XOR-compressed double array) is replaced by its mapping; spaces become ▁, runs of them merge into one
   (remove_extra_whitespaces), and one goes in front (add_space_prefix).
3. Viterbi over the normalised bytes: the best-scoring split into tokens, where user-defined tokens score 0 and a
   code point no token starts with costs the lowest score minus 10 as the unknown token; runs of unknown tokens
   come out as one.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

import numpy as np

from camelid.errors import CamelidError
from camelid.tokenizer.bpe import encode_around_specials, special_tokens
from camelid.tokenizer.vocab import NORMAL, UNUSED, USER_DEFINED

_SPACE = "▁".encode()
_UNKNOWN_PENALTY = np.float32(10.0)


def _utf8_length(first_byte: int) -> int:
    return (1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4)[first_byte >> 4]


class CharsMap:
    """SentencePiece's precompiled normalisation map: an XCDA trie over UTF-8 bytes whose leaves point at
    NUL-terminated replacement strings."""

    def __init__(self, blob: bytes, source: str) -> None:
        if len(blob) < 4:
            raise CamelidError(f"{source}: tokenizer.ggml.precompiled_charsmap is too short; the file is damaged")
        (size,) = struct.unpack_from("<I", blob)
        if size + 4 >= len(blob) or size % 4:
            raise CamelidError(f"{source}: tokenizer.ggml.precompiled_charsmap is inconsistent; the file is damaged")
        self.array = struct.unpack_from(f"<{size // 4}I", blob, 4)
        self.replacements = blob[4 + size:]
        self.source = source

    def _node(self, i: int) -> int:
        if i >= len(self.array):
            raise CamelidError(f"{self.source}: the precompiled_charsmap points outside itself; the file is damaged")
        return self.array[i]

    def _base(self, i: int) -> int:
        node = self._node(i)
        return (node >> 10) << ((node & (1 << 9)) >> 6)

    def longest_prefix(self, data: bytes, start: int) -> tuple[int, bytes]:
        """(length of the longest prefix of data[start:] in the map, its replacement); (0, b"") if none."""
        length, offset = 0, 0
        index = self._base(0)
        for pos in range(start, len(data)):
            c = data[pos]
            if c == 0:
                break
            index ^= c
            node = self._node(index)
            if node & ((1 << 31) | 0xFF) != c:  # not a child of the previous node
                break
            leaf = (node >> 8) & 1
            index ^= self._base(index)
            if leaf:
                length, offset = pos - start + 1, self._node(index) & ((1 << 31) - 1)
        if not length:
            return 0, b""
        end = self.replacements.find(b"\0", offset)
        if offset >= len(self.replacements) or end < 0:
            raise CamelidError(f"{self.source}: a precompiled_charsmap replacement runs past its end; the file is "
                               "damaged")
        return length, self.replacements[offset:end]


class UGMEncoder:
    """Text -> ids for a GGUF unigram vocabulary, as llama.cpp tokenises it."""

    def __init__(self, tokens: list[str], types: list[int], scores: list[float], *, unk_id: int,
                 charsmap: CharsMap | None, add_space_prefix: bool, remove_extra_whitespaces: bool,
                 lstrip: Iterable[int] = ()) -> None:
        self.specials = special_tokens(tokens, types, lstrip=lstrip)
        self.unk_id = unk_id
        self.charsmap = charsmap
        self.add_space_prefix, self.merge_spaces = add_space_prefix, remove_extra_whitespaces
        # what the trie of llama.cpp holds: normal, user-defined and unused tokens (a later duplicate wins)
        self.pieces: dict[bytes, tuple[int, float]] = {}
        user_defined: set[bytes] = set()
        normal_scores = [np.float32(s) for s, t in zip(scores, types, strict=True) if t == NORMAL]
        for i, (token, kind) in enumerate(zip(tokens, types, strict=True)):
            if kind in (NORMAL, USER_DEFINED, UNUSED):
                self.pieces[token.encode()] = (i, 0.0 if kind == USER_DEFINED else float(np.float32(scores[i])))
            if kind == USER_DEFINED:
                data = token.encode()
                user_defined.update(data[:k] for k in range(1, len(data) + 1))
        self.user_defined_prefixes = user_defined  # llama.cpp matches a path through their trie, not a whole token
        self.longest = max(map(len, self.pieces), default=0)
        # llama.cpp computes this in float32
        self.unknown_score = float(min(normal_scores, default=np.float32(np.finfo(np.float32).max)) - _UNKNOWN_PENALTY)

    def encode(self, text: str) -> list[int]:
        return encode_around_specials(text, self.specials, self._encode_fragment)

    def _encode_fragment(self, text: str) -> list[int]:
        return self._viterbi(self._normalize(text.encode()))

    def _normalize_prefix(self, data: bytes, start: int) -> tuple[bytes, int]:
        k = 0
        while start + k < len(data) and data[start:start + k + 1] in self.user_defined_prefixes:
            k += 1
        if k:
            return data[start:start + k], k
        if self.charsmap is not None:
            length, replacement = self.charsmap.longest_prefix(data, start)
            if length:
                return replacement, length
        n = min(_utf8_length(data[start]), len(data) - start)
        return data[start:start + n], n

    def _normalize(self, data: bytes) -> bytes:
        out = bytearray()
        prepended = in_word = False
        start = 0
        while start < len(data):
            piece, consumed = self._normalize_prefix(data, start)
            for c in piece:
                if c != 0x20:
                    if not in_word:
                        in_word = True
                        if (self.add_space_prefix and not prepended) or self.merge_spaces:
                            out += _SPACE
                            prepended = True
                    out.append(c)
                else:
                    in_word = False
                    if not self.merge_spaces:
                        out += _SPACE
            start += consumed
        return bytes(out)

    def _viterbi(self, data: bytes) -> list[int]:
        n = len(data)
        if n == 0:
            return []
        # best[end] = (score, token id, start) of the best split of data[:end]
        best: list[tuple[float, int, int]] = [(-float("inf"), self.unk_id, 0)] * (n + 1)
        best[0] = (0.0, self.unk_id, 0)
        start = 0
        while start < n:
            width = min(_utf8_length(data[start]), n - start)
            base = best[start][0]
            whole = False
            for end in range(start + 1, min(start + self.longest, n) + 1):
                hit = self.pieces.get(data[start:end])
                if hit is None:
                    continue
                whole = whole or end - start == width
                score = base + hit[1]
                if score > best[end][0]:
                    best[end] = (score, hit[0], start)
            if not whole and base + self.unknown_score > best[start + width][0]:
                best[start + width] = (base + self.unknown_score, self.unk_id, start)
            start += width
        ids: list[int] = []
        end, previous_unknown = n, False
        while True:
            _, id, begin = best[end]
            unknown = id == self.unk_id
            if not (previous_unknown and unknown):
                ids.append(id)
            if begin == 0:
                break
            previous_unknown, end = unknown, begin
        return ids[::-1]
