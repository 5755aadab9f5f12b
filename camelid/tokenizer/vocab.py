"""What a tokenizer backend hands the `Tokenizer`, and the `tokenizers` pipelines built from raw vocabularies.

A backend (hf_json, sentencepiece, tiktoken, gguf) reads a file into a `Vocabulary`: the encoder object and
the facts camelid needs beside it (special ids, token types, chat template). The recipes below turn raw
vocabularies into Hugging Face `tokenizers` objects, the ones llama.cpp implements natively and HF's
converters produce:
- SentencePiece-style BPE ("llama" in GGUF): ▁ for spaces (and one in front of the text), merges ordered by
  the score of the merged piece, unknown bytes as <0xNN> tokens;
- byte-level BPE ("gpt2" in GGUF): the pre-tokenizer regexes of `tokenizer.ggml.pre`, GPT-2's byte alphabet;
- WordPiece (BERT's vocab.txt): BERT's normaliser and splitter, greedy longest-match word pieces.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from camelid.errors import CamelidError

# GGUF token types (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# end-of-generation tokens llama.cpp recognises by their text (llama-vocab.cpp, special_eog_ids)
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                      "<|end_of_text|>", "<EOT>", "<end_of_utterance>")

# Pre-tokenizer regexes by GGUF `tokenizer.ggml.pre`, applied in sequence (each splits the pieces of the
# previous one, keeping matches and gaps), as llama.cpp's llm_tokenizer_bpe does. Taken from the
# tokenizer.json files of the models (HF) and llama.cpp's llama-vocab.cpp.
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_REGEXES: dict[str, list[str]] = {
    "gpt-2": [GPT2_REGEX],
    # llama.cpp's fall-back for BPE vocabularies without a known pre-tokenizer
    "default": [r"[\p{P}\$\+<=>\^~\|]+", GPT2_REGEX, r"\p{N}+", r"[0-9][0-9][0-9]"],
    "llama-bpe": [LLAMA3_REGEX],
    "llama3": [LLAMA3_REGEX],
    "qwen2": [QWEN2_REGEX],
    # SmolLM/StarCoder: every digit on its own, then GPT-2's regex
    "smollm": [r"\p{N}", GPT2_REGEX],
    "starcoder": [r"\p{N}", GPT2_REGEX],
}
# llama.cpp's llama3 pre-tokenizer also looks a whole word up in the vocabulary before merging
IGNORE_MERGES = frozenset({"llama-bpe", "llama3"})

# BERT's special tokens, in the order of their ids in the published vocabularies' conventions ([PAD] first)
BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@dataclass
class Vocabulary:
    """A tokenizer as read from a file: its encoder and what camelid must know beside it.

    `kind` says how it tokenises: "spm" (SentencePiece-style BPE), "bpe" (byte-level BPE), "wordpiece" (BERT),
    "wordlevel" or "unigram" (tokenizer.json files of other models; encode/decode only)."""

    kind: str
    hf: Any = None  # a tokenizers.Tokenizer
    tiktoken: Any = None  # a tiktoken.Encoding (Llama 3's tokenizer.model)
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


def build_bpe(tokens: list[str], types: list[int], merges: list[tuple[str, str]], *, pre: str,
              source: str = "the vocabulary") -> Any:
    """Byte-level BPE with the pre-tokenizer regexes llama.cpp uses for `pre` (tokenizer.ggml.pre)."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    if pre not in PRE_TOKENIZER_REGEXES:
        raise CamelidError(f"{source}: unknown byte-level BPE pre-tokenizer {pre!r} (tokenizer.ggml.pre); camelid "
                           f"knows {', '.join(PRE_TOKENIZER_REGEXES)}")
    try:
        hf = HFTokenizer(models.BPE(vocab_dict(tokens), merges, ignore_merges=pre in IGNORE_MERGES))
    except Exception as e:  # noqa: BLE001 - the Rust side raises a bare Exception (a merge of unknown pieces)
        detail = " ".join(str(e).split())[:160]
        raise CamelidError(f"{source}: the merges do not fit the tokens ({detail}); the vocabulary is "
                           "damaged") from None
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZER_REGEXES[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
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
