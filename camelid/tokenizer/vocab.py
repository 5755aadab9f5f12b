"""What a tokenizer backend hands the `Tokenizer`, and the `tokenizers` pipelines built from raw vocabularies.

A backend (hf_json, sentencepiece, tiktoken, gguf) reads a file into a `Vocabulary`: the encoder object and
the facts camelid needs beside it (special ids, token types, chat template). The recipes below turn raw
vocabularies into Hugging Face `tokenizers` objects, the ones llama.cpp implements natively and HF's
converters produce:
- SentencePiece-style BPE ("llama" in GGUF): ▁ for spaces (and one in front of the text), merges ordered by
  the score of the merged piece, unknown bytes as <0xNN> tokens;
- byte-level BPE ("gpt2" in GGUF): the pre-tokenizer of `tokenizer.ggml.pre` (camelid.tokenizer.pretokenizers),
  GPT-2's byte alphabet;
- WordPiece (BERT's vocab.txt): BERT's normaliser and splitter, greedy longest-match word pieces.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, overload

from camelid.errors import CamelidError
from camelid.tokenizer.pretokenizers import PRE_TOKENIZERS, PreTokenizer

# GGUF token types (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# end-of-generation tokens llama.cpp recognises by their text (llama-vocab.cpp, special_eog_ids)
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                      "<|end_of_text|>", "<EOT>", "<end_of_utterance>")

# Llama 3's pre-tokenizer regex as tokenizer.json and tiktoken write it (for tokenizers built from tiktoken files)
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# BERT's special tokens, in the order of their ids in the published vocabularies' conventions ([PAD] first)
BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class Pieces(Sequence[str]):
    """Token strings by id, kept as one UTF-8 blob and the offsets into it: a 50k vocabulary's strings as Python
    objects take ~3.5 MiB, as this ~0.6 MiB. Each access decodes its string (a fraction of a microsecond)."""

    def __init__(self, strings: Iterable[str]) -> None:
        blob, offsets = bytearray(), array("q", [0])
        for s in strings:
            blob += s.encode("utf-8", "surrogatepass")
            offsets.append(len(blob))
        self._blob, self._offsets = bytes(blob), offsets
        self._view = memoryview(self._blob)

    @classmethod
    def _from_utf8(cls, blob: bytes, offsets: array) -> Pieces:
        pieces = cls.__new__(cls)
        pieces._blob, pieces._offsets, pieces._view = blob, offsets, memoryview(blob)
        return pieces

    def __reduce__(self) -> tuple[Any, ...]:  # (a memoryview does not pickle)
        return Pieces._from_utf8, (self._blob, self._offsets)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> list[str]: ...
    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError("piece id out of range")
        return str(self._view[self._offsets[i]:self._offsets[i + 1]], "utf-8", "surrogatepass")

    def __iter__(self) -> Iterator[str]:
        view, offsets = self._view, self._offsets
        for i in range(len(offsets) - 1):
            yield str(view[offsets[i]:offsets[i + 1]], "utf-8", "surrogatepass")

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Pieces):
            return self._blob == other._blob and self._offsets == other._offsets
        if not isinstance(other, Sequence) or len(other) != len(self):
            return False
        return all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment] - mutable-looking sequence semantics, as a list

    def utf8(self) -> tuple[bytes, array]:
        """The blob and the offsets (n + 1 of them): piece i is blob[offsets[i]:offsets[i + 1]]."""
        return self._blob, self._offsets


@dataclass
class Vocabulary:
    """A tokenizer as read from a file: its encoder and what camelid must know beside it.

    `kind` says how it tokenises: "spm" (SentencePiece-style BPE), "bpe" (byte-level BPE), "wordpiece" (BERT),
    "wordlevel" or "unigram" (tokenizer.json files of other models; encode/decode only)."""

    kind: str
    hf: Any = None  # a tokenizers.Tokenizer
    # GGUF byte-level BPE vocabularies: `hf` is built on first use (export, structured output), as it costs
    # ~20 MiB (SmolLM2's, with the library's import) that encoding (`encoder`) and decoding
    # (camelid.tokenizer.bpe.decode_byte_level) do not need
    build_hf: Callable[[], Any] | None = None
    pieces: Sequence[str] | None = None  # the strings by id (Pieces), when `hf` is not built yet
    tiktoken: Any = None  # a tiktoken.Encoding (Llama 3's tokenizer.model)
    encoder: Any = None  # encodes instead of `hf` when set: camelid.tokenizer.bpe.BPEEncoder (GGUF BPE, as llama.cpp)
    pre: str | None = None  # the GGUF pre-tokenizer name, for byte-level BPE
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = False
    chat_template: str | None = None
    token_types: list[int] | None = None
    scores: list[float] | None = None
    max_len: int | None = None  # the longest input the model takes (BERT's 512), when the files say

    def id_of(self, token: str) -> int | None:
        """The id of a token string, or None when the vocabulary has no such token."""
        if self.hf is not None:
            return self.hf.token_to_id(token)
        if self.pieces is not None:
            return self.pieces.index(token) if token and token in self.pieces else None
        try:
            return self.tiktoken.encode_single_token(token)
        except KeyError:
            return None


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def vocab_dict(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a few vocabularies repeat a piece; the first id wins, as in llama.cpp
    return vocab


def add_specials(hf: Any, tokens: list[str], types: list[int]) -> None:
    """Control and unknown tokens as special added tokens, user-defined ones as plain added tokens: both are
    matched whole in the text before the model splits it."""
    from tokenizers import AddedToken

    special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types, strict=True)
               if k in (CONTROL, UNKNOWN)]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types, strict=True)
            if k == USER_DEFINED]
    if special:
        hf.add_special_tokens(special)
    if user:
        hf.add_tokens(user)


def spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """SentencePiece BPE merges a pair when the merged piece is in the vocabulary, highest score first:
    list every split of every piece into two pieces and order them by the merged piece's score."""
    vocab = {t: i for i, t in enumerate(tokens) if types[i] == NORMAL}
    merges: list[tuple[str, str, float]] = []
    for piece, i in vocab.items():
        local = [(piece[:k], piece[k:], scores[i]) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: m[2], reverse=True)  # stable: ties keep vocabulary order
    return [(a, b) for a, b, _ in merges]


def build_spm(tokens: list[str], scores: list[float], types: list[int], *, add_space_prefix: bool = True,
              split_words: bool = False) -> Any:
    """SentencePiece-style BPE. `split_words`: SentencePiece models trained without allow_whitespace_only_pieces
    cut the text before every ▁ before merging (Llama's allow them, and llama.cpp never cuts)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers

    unk = next((tokens[i] for i, t in enumerate(types) if t == UNKNOWN), None)
    hf = HFTokenizer(models.BPE(vocab_dict(tokens), spm_merges(tokens, scores, types), unk_token=unk,
                                fuse_unk=True, byte_fallback=True))
    replace = normalizers.Replace(" ", "▁")
    # Prepend puts the dummy space in front of every text fragment, also after a special token, as llama.cpp
    # and HF's (legacy) Llama tokenizer do; SentencePiece itself does it at the start of the text only
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), replace]) if add_space_prefix else replace
    if split_words:
        hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    hf.decoder = decoders.Sequence(steps)
    add_specials(hf, tokens, types)
    return hf


def pre_tokenizer(pre: str, source: str = "the vocabulary") -> PreTokenizer:
    """The row of llama.cpp's pre-tokenizer table for a `tokenizer.ggml.pre` value ("" and None: "default")."""
    row = PRE_TOKENIZERS.get(pre or "default")
    if row is None:
        raise CamelidError(f"{source}: unknown pre-tokenizer {pre!r} (tokenizer.ggml.pre), not one llama.cpp knows "
                           "either (camelid.tokenizer.PRE_TOKENIZERS lists them); convert the model again with "
                           "llama.cpp's convert_hf_to_gguf.py, or load its tokenizer.json folder instead")
    return row


def build_unigram(tokens: list[str], scores: list[float], types: list[int], *, unk_id: int) -> Any:
    """A `tokenizers` unigram pipeline for a GGUF "t5" vocabulary: what decoding uses (encoding is
    camelid.tokenizer.ugm, llama.cpp's exact rules)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    hf = HFTokenizer(models.Unigram([(t, float(s)) for t, s in zip(tokens, scores, strict=True)], unk_id=unk_id))
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    hf.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    add_specials(hf, tokens, types)
    return hf


def build_bpe(tokens: list[str], types: list[int], merges: list[tuple[str, str]], *, pre: str,
              source: str = "the vocabulary") -> Any:
    """A `tokenizers` BPE pipeline for a GGUF BPE vocabulary with pre-tokenizer `pre`: what decoding and
    tokenizer.json export use (GGUF vocabularies encode with camelid.tokenizer.bpe, llama.cpp's exact rules).
    The regexes run in `tokenizers`' own engine, real Unicode categories instead of llama.cpp's collapsed ones;
    llama.cpp's hand-coded pseudo-regexes that `tokenizers` cannot compile are left out."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    row = pre_tokenizer(pre, source)
    try:
        hf = HFTokenizer(models.BPE(vocab_dict(tokens), merges, ignore_merges=row.ignore_merges,
                                    byte_fallback=not row.byte_level))
    except Exception as e:  # noqa: BLE001 - the Rust side raises a bare Exception (a merge of unknown pieces)
        detail = " ".join(str(e).split())[:160]
        raise CamelidError(f"{source}: the merges do not fit the tokens ({detail}); the vocabulary is "
                           "damaged") from None
    splits = []
    for r in row.regexes:
        try:
            splits.append(pre_tokenizers.Split(Regex(r), behavior="isolated"))
        except Exception:  # noqa: BLE001, S112 - a pseudo-regex llama.cpp implements in code
            continue
    if row.byte_level:
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        hf.decoder = decoders.ByteLevel()
    else:
        if row.escape_spaces:
            hf.normalizer = normalizers.Replace(" ", "▁")
        hf.pre_tokenizer = pre_tokenizers.Sequence(splits)
        steps = [decoders.Replace("▁", " ")] if row.escape_spaces else []
        hf.decoder = decoders.Sequence([*steps, decoders.ByteFallback(), decoders.Fuse()])
    add_specials(hf, tokens, types)
    return hf


def bert_pipeline(hf: Any, *, lowercase: bool = True, strip_accents: bool | None = None) -> Any:
    """BERT's recipe around a WordPiece model: clean control characters, split CJK characters, lowercase and
    strip accents for uncased models; split on whitespace and punctuation; '##' marks continuations."""
    from tokenizers import decoders, normalizers, pre_tokenizers

    hf.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                               strip_accents=strip_accents, lowercase=lowercase)
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    hf.decoder = decoders.WordPiece(prefix="##")
    return hf


def bert_specials(hf: Any, source: str = "the vocabulary") -> dict[str, int]:
    """BERT's special tokens marked special (ids unchanged: "[MASK]" in a text stays one token, decode can skip
    them), and [CLS] A [SEP] / [CLS] A [SEP] B [SEP] around texts, B's tokens in segment 1. Returns their ids."""
    from tokenizers import processors

    ids = {t: hf.token_to_id(t) for t in BERT_SPECIAL_TOKENS}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
        raise CamelidError(f"{source}: the vocabulary has no {missing[0]} token; a BERT vocabulary needs "
                           f"{', '.join(BERT_SPECIAL_TOKENS)}")
    hf.add_special_tokens(list(BERT_SPECIAL_TOKENS))
    hf.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])])
    return ids


def build_wordpiece(tokens: list[str], *, lowercase: bool = True, strip_accents: bool | None = None,
                    source: str = "vocab.txt") -> Any:
    """BERT's WordPiece tokenizer from the lines of a vocab.txt (the line number is the id)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    hf = HFTokenizer(models.WordPiece(vocab_dict(tokens), unk_token="[UNK]", max_input_chars_per_word=100))
    bert_pipeline(hf, lowercase=lowercase, strip_accents=strip_accents)
    bert_specials(hf, source)
    return hf
