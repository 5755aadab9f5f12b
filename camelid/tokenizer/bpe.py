"""Byte-pair encoding exactly as llama.cpp runs it for GGUF BPE vocabularies (llm_tokenizer_bpe_session).

1. Special tokens (control, user-defined, unknown) are cut out of the text first, longest first, each wherever
   it occurs in the text left over by the longer ones (llama.cpp's tokenizer_st_partition).
2. Each text fragment is split by the vocabulary's pre-tokenizer (camelid.tokenizer.pretokenizers), each
   piece mapped to GPT-2's byte alphabet (or, for SentencePiece-style BPE, kept as UTF-8 with spaces as ▁).
3. Each piece is merged: start from its characters, repeatedly merge the adjacent pair with the lowest merge
   rank (leftmost on ties). A piece found whole in the vocabulary skips this when the pre-tokenizer says so.
4. A resulting symbol that is not a token falls back to the tokens of its single bytes (those that exist).

Where `tokenizers`' BPE differs from this (a byte missing from the vocabulary is dropped and the pieces around
it merge; llama.cpp keeps it as a barrier), camelid follows llama.cpp.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable

from camelid.tokenizer.pretokenizers import PreTokenizer
from camelid.tokenizer.vocab import CONTROL, UNKNOWN, USER_DEFINED, bytes_to_unicode

_C_SPACE = " \t\n\v\f\r"  # C's isspace, which llama.cpp's lstrip/rstrip use
_BYTE_LEVEL = str.maketrans({chr(b): c for b, c in bytes_to_unicode().items()})
_CACHE_LIMIT = 1 << 16
_BYTE_OF = {c: b for b, c in bytes_to_unicode().items()}


def decode_byte_level(pieces: list[str], ids: Iterable[int]) -> str:
    """The text of byte-level BPE tokens, as `tokenizers`' ByteLevel decoder gives it: each piece's characters
    mapped back to their bytes (a piece with a character outside GPT-2's byte alphabet, such as a special token
    with a space, stays as its own UTF-8), all bytes joined, invalid UTF-8 as U+FFFD."""
    out = bytearray()
    for i in ids:
        piece = pieces[i]
        try:
            out.extend([_BYTE_OF[c] for c in piece])
        except KeyError:
            out.extend(piece.encode("utf-8"))
    return out.decode("utf-8", errors="replace")


def special_tokens(tokens: list[str], types: list[int], *, lstrip: Iterable[int] = (),
                   rstrip: Iterable[int] = ()) -> list[tuple[str, int, bool, bool]]:
    """(text, id, lstrip, rstrip) of the tokens llama.cpp cuts out of the text first (control, user-defined,
    unknown), longest first."""
    specials = [i for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED, UNKNOWN) and tokens[i]]
    specials.sort(key=lambda i: -len(tokens[i].encode("utf-8")))
    lstrip, rstrip = set(lstrip), set(rstrip)
    return [(tokens[i], i, i in lstrip, i in rstrip) for i in specials]


def partition(text: str, specials: list[tuple[str, int, bool, bool]]) -> list[str | int]:
    """Cut the special tokens out of `text`, longest first (llama.cpp's tokenizer_st_partition): text fragments
    and token ids, in order."""
    fragments: list[str | int] = [text] if text else []
    for token, id, lstrip, rstrip in specials:
        if not any(isinstance(f, str) and token in f for f in fragments):
            continue
        out: list[str | int] = []
        for f in fragments:
            if isinstance(f, int) or token not in f:
                out.append(f)
                continue
            start = 0
            while (match := f.find(token, start)) >= 0:
                left = f[start:match]
                if lstrip:
                    left = left.rstrip(_C_SPACE)
                if left:
                    out.append(left)
                out.append(id)
                start = match + len(token)
                if rstrip:
                    while start < len(f) and f[start] in _C_SPACE:
                        start += 1
            if start < len(f):
                out.append(f[start:])
        fragments = out
    return fragments



def encode_around_specials(text: str, specials: list[tuple[str, int, bool, bool]],
                           encode_fragment: Callable[[str], list[int]]) -> list[int]:
    """Special tokens become their ids; the text between them goes through the vocabulary's own encoder."""
    ids: list[int] = []
    for fragment in partition(text, specials):
        if isinstance(fragment, int):
            ids.append(fragment)
        else:
            ids.extend(encode_fragment(fragment))
    return ids


class BPEEncoder:
    """Text -> ids for a GGUF byte-level (or SentencePiece-style) BPE vocabulary, as llama.cpp tokenises it."""

    def __init__(self, tokens: list[str], types: list[int], merges: Iterable[tuple[str, str]], pre: PreTokenizer,
                 *, lstrip: Iterable[int] = (), rstrip: Iterable[int] = ()) -> None:
        self.pre = pre
        self.ids = {t: i for i, t in enumerate(tokens)}
        self.ranks: dict[tuple[str, str], int] = {}
        for rank, pair in enumerate(merges):
            self.ranks.setdefault(pair, rank)
        self.specials = special_tokens(tokens, types, lstrip=lstrip, rstrip=rstrip)
        self._cache: dict[str, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        return encode_around_specials(text, self.specials, self._encode_fragment)

    # ---- 2.-4. pieces and merges -----------------------------------------------------------------------------

    def _encode_fragment(self, text: str) -> list[int]:
        if self.pre.escape_spaces:
            text = text.replace(" ", "▁")
        ids: list[int] = []
        for piece in self.pre.split(text):
            if self.pre.byte_level:
                piece = piece.encode("utf-8").decode("latin-1").translate(_BYTE_LEVEL)
            cached = self._cache.get(piece)
            if cached is None:
                if len(self._cache) >= _CACHE_LIMIT:
                    self._cache.clear()
                cached = self._cache[piece] = self._merge(piece)
            ids.extend(cached)
        return ids

    def _merge(self, word: str) -> list[int]:
        if self.pre.ignore_merges and word in self.ids:
            return [self.ids[word]]
        if not self.pre.byte_level and word.strip("\n") == "" and word in self.ids:
            return [self.ids[word]]  # a run of newlines that is a token (llama.cpp's Gemma 4 rule)
        symbols = list(word)
        if len(symbols) > 1:
            symbols = self._merge_symbols(symbols)
        ids: list[int] = []
        for s in symbols:
            id = self.ids.get(s)
            if id is not None:
                ids.append(id)
                continue
            for b in s.encode("utf-8"):  # llama.cpp's fallback: the token of each single byte, when there is one
                byte_token = (chr(b) if b < 0x80 else None) if self.pre.byte_level else f"<0x{b:02X}>"
                if byte_token is not None and byte_token in self.ids:
                    ids.append(self.ids[byte_token])
        return ids

    def _merge_symbols(self, symbols: list[str]) -> list[str]:
        """Lowest rank first, leftmost on ties: a heap of candidate pairs over a linked list of symbols; a
        candidate whose two symbols have changed since it was pushed is skipped."""
        n = len(symbols)
        nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))
        nxt[-1] = -1
        heap: list[tuple[int, int, int, str]] = []

        def push(left: int, right: int) -> None:
            if left >= 0 and right >= 0:
                rank = self.ranks.get((symbols[left], symbols[right]))
                if rank is not None:
                    heapq.heappush(heap, (rank, left, right, symbols[left] + symbols[right]))

        for i in range(n - 1):
            push(i, i + 1)
        while heap:
            _, left, right, merged = heapq.heappop(heap)
            if not symbols[left] or not symbols[right] or symbols[left] + symbols[right] != merged:
                continue
            symbols[left], symbols[right] = merged, ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prv[nxt[right]] = left
            push(prv[left], left)
            push(left, nxt[left])
        return [s for s in symbols if s]
