"""Vocabularies embedded in GGUF files (`tokenizer.ggml.*` keys), read through camelid.formats.open_gguf (the
`gguf` library's reader) and written with a `gguf.GGUFWriter`.

The vocabulary types llama.cpp tokenises for these models: "llama" (SentencePiece-style BPE, merged by piece
score), "gpt2" (byte-level BPE with the merges and the pre-tokenizer named by `tokenizer.ggml.pre`, encoded by
camelid.tokenizer.bpe exactly as llama.cpp does), "gemma4" (BPE over UTF-8 with ▁ for spaces), "bert"
(WordPiece) and "t5" (unigram, encoded by camelid.tokenizer.ugm as llama.cpp does). Everything read is checked
before use: array lengths agree, ids lie in the vocabulary.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from camelid import heap
from camelid.errors import CamelidError
from camelid.formats import gguf_value, open_gguf
from camelid.tokenizer.bpe import BPEEncoder, merge_ids
from camelid.tokenizer.ugm import CharsMap, UGMEncoder
from camelid.tokenizer.vocab import (
    CONTROL,
    NORMAL,
    UNKNOWN,
    USER_DEFINED,
    Pieces,
    Vocabulary,
    build_bpe,
    build_spm,
    build_unigram,
    build_wordpiece,
    pre_tokenizer,
    vocab_dict,
)


def has_vocabulary(path: Path) -> bool:
    return gguf_value(open_gguf(path), "tokenizer.ggml.model") is not None


def _strings(reader: Any, key: str, path: Path) -> Iterator[str] | None:
    """An array of strings, decoded leniently (as llama.cpp, which treats tokens as bytes), one at a time."""
    field = reader.fields.get(key)
    if field is None:
        return None
    if len(field.types) != 2 or field.types[-1].name != "STRING":
        raise CamelidError(f"{path}: {key} is not an array of strings; the file is damaged, re-convert it")
    if hasattr(field, "iter_strings"):  # camelid.formats' packed array
        return field.iter_strings(errors="replace")
    return (bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data)


# llama.cpp recognises these tokens by their text and makes them control tokens (so they are cut out of the text
# as specials) whatever type the file gives them: ends of turn and of generation, and each fill-in-the-middle
# role unless the file names that role's token (tokenizer.ggml.fim_*_token_id)
_END_OF_GENERATION = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
                      "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
                      "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
                      "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~[")
_FILL_IN_THE_MIDDLE = {
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<\uff5cfim\u2581begin\uff5c>", "<PRE>",
                "\u2581<PRE>", "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<\uff5cfim\u2581hole\uff5c>", "<SUF>",
                "\u2581<SUF>", "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<\uff5cfim\u2581end\uff5c>", "<MID>",
                "\u2581<MID>", "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}


def _llama_cpp_token_types(reader: Any, tokens: list[str], types: list[int]) -> list[int]:
    """The token types llama.cpp uses after its corrections by token text (llama_vocab::impl::load)."""
    types = list(types)
    index = {t: i for i, t in enumerate(tokens)}
    eog = {index[t] for t in _END_OF_GENERATION if t in index}
    control = set(eog)
    for role, texts in _FILL_IN_THE_MIDDLE.items():
        if gguf_value(reader, f"tokenizer.ggml.{role}_token_id") is None:
            # llama.cpp takes the first match in hash order; vocabularies hold at most one of each role's texts
            control.update(index[t] for t in texts if t in index)
    for i in control:
        if types[i] not in (CONTROL, USER_DEFINED, UNKNOWN):
            types[i] = CONTROL
    for t in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):  # gpt-oss: always rendered
        if t in index:
            types[index[t]] = USER_DEFINED
    texts = {tokens[i] for i in eog}
    has_call = bool(texts & {"<|call|>", "<|calls|>"})
    if "<|end|>" in texts and has_call and texts & {"<|return|>", "<|flush|>"}:  # harmony, solar-open: not an end
        types[index["<|end|>"]] = USER_DEFINED
    if "</s>" in texts and texts & {"<|tool_response>", "<|plamo:eos|>"}:  # Gemma 4, PLaMo: </s> is plain text
        types[index["</s>"]] = NORMAL
    return types


def _strip_ids(reader: Any, tokens: list[str], types: list[int]) -> tuple[list[int], list[int]]:
    """(lstrip, rstrip): the special tokens that swallow the whitespace before or after them in llama.cpp, which
    knows the models by name: the <mask> of nomic-bert-moe, jina-bert-v3 and Jina v2, ModernBERT's [MASK], and
    Phi-3's special tokens."""
    name = str(gguf_value(reader, "general.name", "") or "").lower()
    arch = str(gguf_value(reader, "general.architecture", "") or "")
    pre = str(gguf_value(reader, "tokenizer.ggml.pre", "") or "")
    index = {t: i for i, t in enumerate(tokens)}
    if any(j in pre for j in ("jina-v2-de", "jina-v2-es", "jina-v2-code")) or \
            any(a in arch for a in ("nomic-bert-moe", "jina-bert-v3")):
        return [index["<mask>"]] if "<mask>" in index else [], []
    if "phi-3" in name or "phi3" in name:
        keep = {"<unk>", "<s>", "<|endoftext|>"}
        return [], [i for i, (t, k) in enumerate(zip(tokens, types, strict=True))
                    if (k in (CONTROL, USER_DEFINED, UNKNOWN) or t == "</s>") and t not in keep]
    if "modern-bert" in name and "[MASK]" in index:
        return [index["[MASK]"]], []
    return [], []


def _bert_piece(token: str, kind: int) -> str:
    """llama.cpp's BERT vocabularies mark word starts with ▁ and leave continuations bare; vocab.txt marks
    continuations with ## and leaves word starts bare."""
    if token.startswith("▁"):
        return token[1:]
    if kind != NORMAL or (token.startswith("[") and token.endswith("]")):
        return token
    return "##" + token


def _merge_ids(reader: Any, tokens: Sequence[str], path: Path) -> array:
    """tokenizer.ggml.merges as camelid.tokenizer.bpe.merge_ids gives them."""
    def pairs() -> Iterator[tuple[str, str]]:
        for line in _strings(reader, "tokenizer.ggml.merges", path) or ():
            left, space, right = line.partition(" ")
            if not space:
                raise CamelidError(f"{path}: a tokenizer.ggml.merges entry is not two pieces separated by a space; "
                                   "the file is damaged, re-convert it")
            yield left, right

    return merge_ids(tokens, pairs(), str(path))


def _build_bpe_from_ids(tokens: Sequence[str], types: list[int], merges: array, *, pre: str, source: str) -> Any:
    """camelid.tokenizer.vocab.build_bpe with the merges given as `_merge_ids` gives them."""
    pairs = [(tokens[merges[k]], tokens[merges[k + 1]]) for k in range(0, len(merges), 3)]
    return build_bpe(list(tokens), types, pairs, pre=pre, source=source)


def read_gguf_vocab(path: Path) -> Vocabulary:
    reader = open_gguf(path)

    def get(key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        value = gguf_value(reader, f"tokenizer.{key}", default)
        if value is not default and not isinstance(value, kind):
            raise CamelidError(f"{path}: tokenizer.{key} has the wrong type ({type(value).__name__}); the file is "
                               "damaged, re-convert it")
        return value

    model = get("ggml.model", str)
    # one UTF-8 blob, not 50k-150k Python strings (camelid.tokenizer.vocab.Pieces)
    strings = _strings(reader, "tokenizer.ggml.tokens", path)
    if model is None or strings is None:
        raise CamelidError(f"{path}: has no embedded vocabulary (tokenizer.ggml.* keys); pass the model's "
                           "tokenizer.json folder instead")
    tokens: Sequence[str] = Pieces(strings)
    if model not in ("gpt2", "gemma4"):  # these build a `tokenizers` object from a list anyway
        tokens = list(tokens)
    n = len(tokens)
    types = get("ggml.token_type", list, [NORMAL] * n)
    scores = get("ggml.scores", list)
    for key, values in (("token_type", types), ("scores", scores)):
        if values is not None and len(values) != n:
            raise CamelidError(f"{path}: tokenizer.ggml.{key} has {len(values)} entries for {n} tokens; the file "
                               "is damaged, re-convert it")
    types = _llama_cpp_token_types(reader, tokens, types)
    ids = {}
    for key in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id"):
        value = get(f"ggml.{key}", int)
        if value is not None and not 0 <= value < n:
            raise CamelidError(f"{path}: tokenizer.ggml.{key} {value} is outside the vocabulary of {n} tokens; "
                               "the file is damaged, re-convert it")
        ids[key] = value
    add_bos = get("ggml.add_bos_token", bool)
    encoder = hf = build_hf = pieces = None
    if model == "llama":
        add_space_prefix = get("ggml.add_space_prefix", bool)
        hf = build_spm(tokens, scores or [0.0] * n, types,
                       add_space_prefix=True if add_space_prefix is None else add_space_prefix)
        kind, pre, add_bos_default = "spm", None, True
    elif model in ("gpt2", "gemma4"):
        # llama.cpp: Gemma 4's vocabulary type implies its pre-tokenizer; a missing one means "default"
        pre = "gemma4" if model == "gemma4" else get("ggml.pre", str) or "default"
        row = pre_tokenizer(pre, str(path))
        merges = _merge_ids(reader, tokens, path)
        if row.byte_level:  # encoded by `encoder`, decoded by decode_byte_level: `tokenizers` only on demand
            build_hf = partial(_build_bpe_from_ids, tokens, types, merges, pre=pre, source=str(path))
            first = vocab_dict(tokens)  # (a repeated piece's later ids are no token to `tokenizers` either)
            pieces = tokens if len(first) == n else Pieces(t if first[t] == i else "" for i, t in enumerate(tokens))
            del first
        else:
            hf = _build_bpe_from_ids(tokens, types, merges, pre=pre, source=str(path))
        lstrip, rstrip = _strip_ids(reader, tokens, types)
        encoder = BPEEncoder(tokens, types, merges, row, lstrip=lstrip, rstrip=rstrip)
        kind, add_bos_default = "bpe", row.add_bos
    elif model == "bert":
        hf = build_wordpiece([_bert_piece(t, k) for t, k in zip(tokens, types, strict=True)],
                             lowercase=get("ggml.normalizer.lowercase", bool, True), source=str(path))
        kind, pre, add_bos_default = "wordpiece", None, True
        ids["bos_token_id"] = get("ggml.cls_token_id", int, hf.token_to_id("[CLS]"))
        ids["eos_token_id"] = get("ggml.seperator_token_id", int, hf.token_to_id("[SEP]"))
    elif model == "t5":
        # llama.cpp's defaults for unigram vocabularies: unknown token 2, no space prefix, EOS added (not BOS)
        ids["unknown_token_id"] = 2 if ids["unknown_token_id"] is None else ids["unknown_token_id"]
        if not 0 <= ids["unknown_token_id"] < n or scores is None:
            raise CamelidError(f"{path}: a unigram vocabulary needs tokenizer.ggml.scores and an unknown token; "
                               "the file is damaged, re-convert it")
        charsmap = gguf_value(reader, "tokenizer.ggml.precompiled_charsmap")
        if charsmap is not None:
            charsmap = CharsMap(np.asarray(charsmap, dtype=np.int64).astype(np.uint8).tobytes(), str(path))
        hf = build_unigram(tokens, scores, types, unk_id=ids["unknown_token_id"])
        encoder = UGMEncoder(tokens, types, scores, unk_id=ids["unknown_token_id"], charsmap=charsmap,
                             add_space_prefix=bool(get("ggml.add_space_prefix", bool, False)),
                             remove_extra_whitespaces=bool(get("ggml.remove_extra_whitespaces", bool, False)),
                             lstrip=_strip_ids(reader, tokens, types)[0])
        kind, pre, add_bos_default = "unigram", None, False
    else:
        raise CamelidError(f"{path}: GGUF vocabulary kind {model!r} (tokenizer.ggml.model) is not supported; "
                           "camelid reads 'llama' (SentencePiece), 'gpt2' and 'gemma4' (BPE), 'bert' (WordPiece) "
                           "and 't5' (unigram)")
    heap.trim()  # the pages of the temporary lookup tables, which glibc's heap would keep
    return Vocabulary(kind=kind, hf=hf, build_hf=build_hf, pieces=pieces, encoder=encoder, pre=pre,
                      bos_id=ids["bos_token_id"], eos_id=ids["eos_token_id"],
                      unk_id=ids["unknown_token_id"], pad_id=ids["padding_token_id"],
                      add_bos=add_bos_default if add_bos is None else add_bos,
                      chat_template=get("chat_template", str), token_types=types, scores=scores)


def write_gguf_vocab(writer: Any, *, kind: str, pre: str | None, tokens: list[str], token_types: list[int],
                     scores: list[float], merges: list[str], ids: dict[str, int | None], add_bos: bool,
                     add_space_prefix: bool, chat_template: str | None) -> None:
    """Add the `tokenizer.ggml.*` keys and `tokenizer.chat_template` to a `gguf.GGUFWriter`. `ids` maps "bos",
    "eos", "unk", "pad" to token ids (None: not written)."""
    if kind == "spm":
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_add_space_prefix(add_space_prefix)
    elif kind == "bpe":
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre or "default")
        writer.add_token_merges(merges)
    else:
        raise CamelidError(f"a {kind} vocabulary cannot be written into GGUF; camelid writes SentencePiece-style "
                           "and byte-level BPE vocabularies")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    if kind == "spm":
        writer.add_token_scores(scores)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
              "pad": writer.add_pad_token_id}
    for name, add in adders.items():
        if ids.get(name) is not None:
            add(ids[name])
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(False)
    if chat_template:
        writer.add_chat_template(chat_template)
