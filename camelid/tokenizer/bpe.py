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

import bisect
import heapq
from array import array
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from camelid.errors import CamelidError
from camelid.tokenizer.pretokenizers import PreTokenizer
from camelid.tokenizer.vocab import CONTROL, UNKNOWN, USER_DEFINED, Pieces, bytes_to_unicode

_C_SPACE = " \t\n\v\f\r"  # C's isspace, which llama.cpp's lstrip/rstrip use
_BYTE_LEVEL = str.maketrans({chr(b): c for b, c in bytes_to_unicode().items()})
_CACHE_LIMIT = 1 << 16
_BYTE_OF = {c: b for b, c in bytes_to_unicode().items()}


def merge_ids(tokens: Sequence[str], merges: Iterable[tuple[str, str]], source: str = "the vocabulary") -> array:
    """BPE merges as token ids, three per merge (left, right, merged), in rank order; each id the last of its
    string's ids, as llama.cpp's token -> id map has it. Every piece and merge must be a token (what `tokenizers`
    demands of the merges too)."""
    token_ids = {t: i for i, t in enumerate(tokens)}
    out = array("i")
    for left, right in merges:
        ids = (token_ids.get(left), token_ids.get(right), token_ids.get(left + right))
        if None in ids:
            raise CamelidError(f"{source}: the merges do not fit the tokens ({left + ' ' + right!r}: a piece or their "
                               "merge is not a token); the vocabulary is damaged")
        out.extend(ids)  # type: ignore[arg-type] - no None left
    return out


def decode_byte_level(pieces: Sequence[str], ids: Iterable[int]) -> str:
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


def special_tokens(tokens: Sequence[str], types: list[int], *, lstrip: Iterable[int] = (),
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
    """Text -> ids for a GGUF byte-level (or SentencePiece-style) BPE vocabulary, as llama.cpp tokenises it.

    Kept compact (a 50k vocabulary's tables take ~2 MiB instead of ~12 MiB of Python dicts, tuples and ints): the
    merges as sorted arrays of packed (left id, right id) keys with their rank and merged id, symbols as token
    ids while merging, and whole pieces looked up by bisection in the ids sorted by their strings."""

    def __init__(self, pieces: Sequence[str], types: list[int], merges: array, pre: PreTokenizer, *,
                 lstrip: Iterable[int] = (), rstrip: Iterable[int] = ()) -> None:
        """`merges`: as `merge_ids` gives them."""
        self.pre = pre
        self.pieces = pieces
        n = self.n = len(pieces)
        triples = np.frombuffer(merges, np.int32).reshape(-1, 3).astype(np.int64)
        keys = triples[:, 0] * n + triples[:, 1]
        order = np.argsort(keys, kind="stable")
        first = np.ones(len(order), bool)  # a repeated pair keeps its first (lowest) rank
        first[1:] = keys[order[1:]] != keys[order[:-1]]
        self._keys = array("q", keys[order[first]].tobytes())
        self._ranks = array("i", order[first].astype(np.int32).tobytes())
        self._merged = array("i", triples[order[first], 2].astype(np.int32).tobytes())
        self._by_string = array("i", _sorted_ids(pieces).astype(np.int32).tobytes())
        self._char_ids = {pieces[i]: i for i in self._by_string if len(pieces[i]) == 1}
        self.specials = special_tokens(pieces, types, lstrip=lstrip, rstrip=rstrip)
        self._cache: dict[str, list[int]] = {}

    def token_id(self, piece: str) -> int | None:
        """The id of a token string (the last, for a string the vocabulary repeats, as in llama.cpp), or None."""
        if len(piece) == 1:
            return self._char_ids.get(piece)
        i = bisect.bisect_right(self._by_string, piece, key=self.pieces.__getitem__)
        return self._by_string[i - 1] if i and self.pieces[self._by_string[i - 1]] == piece else None

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
        if self.pre.ignore_merges and (id := self.token_id(word)) is not None:
            return [id]
        if not self.pre.byte_level and word.strip("\n") == "" and (id := self.token_id(word)) is not None:
            return [id]  # a run of newlines that is a token (llama.cpp's Gemma 4 rule)
        symbols = [self._char_ids.get(c, -1) for c in word]  # -1: a character that is no token, never merged
        if len(symbols) > 1:
            symbols = self._merge_symbols(symbols)
        ids: list[int] = []
        for c, id in zip(word, symbols, strict=True):
            if id >= 0:
                ids.append(id)
            elif id == -1:
                for b in c.encode("utf-8"):  # llama.cpp's fallback: the token of each single byte, if there is one
                    byte_token = (chr(b) if b < 0x80 else None) if self.pre.byte_level else f"<0x{b:02X}>"
                    byte_id = None if byte_token is None else self.token_id(byte_token)
                    if byte_id is not None:
                        ids.append(byte_id)
        return ids

    def _merge_symbols(self, symbols: list[int]) -> list[int]:
        """Lowest rank first, leftmost on ties: a heap of candidate pairs over a linked list of symbols (token
        ids, -1 for a character that is none, -2 for a symbol merged into its left neighbour); a candidate whose
        two symbols have changed since it was pushed is skipped."""
        n = len(symbols)
        nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))
        nxt[-1] = -1
        heap: list[tuple[int, int, int, int, int, int]] = []
        keys, ranks, merged, width = self._keys, self._ranks, self._merged, self.n

        def push(left: int, right: int) -> None:
            if left >= 0 and right >= 0 and symbols[left] >= 0 and symbols[right] >= 0:
                key = symbols[left] * width + symbols[right]
                i = bisect.bisect_left(keys, key)
                if i < len(keys) and keys[i] == key:
                    heapq.heappush(heap, (ranks[i], left, right, symbols[left], symbols[right], merged[i]))

        for i in range(n - 1):
            push(i, i + 1)
        while heap:
            _, left, right, a, b, out = heapq.heappop(heap)
            if symbols[left] != a or symbols[right] != b:
                continue
            symbols[left], symbols[right] = out, -2
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prv[nxt[right]] = left
            push(prv[left], left)
            push(left, nxt[left])
        return symbols


def _sorted_ids(pieces: Sequence[str]) -> np.ndarray:
    """Ids ordered by their strings (code point order; equal strings by id)."""
    blob, offsets = pieces.utf8() if isinstance(pieces, Pieces) else Pieces(pieces).utf8()
    starts, ends = np.frombuffer(offsets, np.int64)[:-1], np.frombuffer(offsets, np.int64)[1:]
    if len(starts) == 0:
        return np.empty(0, np.int64)
    if b"\0" in blob:  # numpy's byte strings drop trailing NULs: sort in Python
        return np.array(sorted(range(len(pieces)), key=pieces.__getitem__), np.int64)
    width = max(1, int((ends - starts).max()))
    padded = np.zeros((len(starts), width), np.uint8)
    lengths = ends - starts
    data = np.frombuffer(blob, np.uint8)
    rows = np.repeat(np.arange(len(starts)), lengths)
    cols = np.arange(len(data)) - np.repeat(starts, lengths)
    padded[rows, cols] = data
    # UTF-8 byte order is code point order
    return np.argsort(padded.view(f"S{width}").ravel(), kind="stable").astype(np.int64)
