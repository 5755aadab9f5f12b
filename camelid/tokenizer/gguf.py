"""Vocabularies embedded in GGUF files (`tokenizer.ggml.*` keys), read through camelid.formats.open_gguf (the
`gguf` library's reader) and written with a `gguf.GGUFWriter`.

Two vocabulary types, the ones llama.cpp uses for LLaMA-family models: "llama" (SentencePiece-style BPE,
merged by piece score) and "gpt2" (byte-level BPE with the merges and the pre-tokenizer named by
`tokenizer.ggml.pre`). Everything read is checked before use: array lengths agree, ids lie in the vocabulary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from camelid.errors import CamelidError
from camelid.formats import gguf_value, open_gguf
from camelid.tokenizer.vocab import IGNORE_MERGES, NORMAL, Vocabulary, build_bpe, build_spm


def has_vocabulary(path: Path) -> bool:
    return gguf_value(open_gguf(path), "tokenizer.ggml.model") is not None


def _strings(reader: Any, key: str, path: Path) -> list[str] | None:
    """An array of strings, decoded leniently (as llama.cpp, which treats tokens as bytes)."""
    field = reader.fields.get(key)
    if field is None:
        return None
    if len(field.types) != 2 or field.types[-1].name != "STRING":
        raise CamelidError(f"{path}: {key} is not an array of strings; the file is damaged, re-convert it")
    return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]


def read_gguf_vocab(path: Path) -> Vocabulary:
    reader = open_gguf(path)

    def get(key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        value = gguf_value(reader, f"tokenizer.{key}", default)
        if value is not default and not isinstance(value, kind):
            raise CamelidError(f"{path}: tokenizer.{key} has the wrong type ({type(value).__name__}); the file is "
                               "damaged, re-convert it")
        return value

    model = get("ggml.model", str)
    tokens = _strings(reader, "tokenizer.ggml.tokens", path)
    if model is None or tokens is None:
        raise CamelidError(f"{path}: has no embedded vocabulary (tokenizer.ggml.* keys); pass the model's "
                           "tokenizer.json folder instead")
    n = len(tokens)
    types = get("ggml.token_type", list, [NORMAL] * n)
    scores = get("ggml.scores", list)
    for key, values in (("token_type", types), ("scores", scores)):
        if values is not None and len(values) != n:
            raise CamelidError(f"{path}: tokenizer.ggml.{key} has {len(values)} entries for {n} tokens; the file "
                               "is damaged, re-convert it")
    ids = {}
    for key in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id"):
        value = get(f"ggml.{key}", int)
        if value is not None and not 0 <= value < n:
            raise CamelidError(f"{path}: tokenizer.ggml.{key} {value} is outside the vocabulary of {n} tokens; "
                               "the file is damaged, re-convert it")
        ids[key] = value
    add_bos = get("ggml.add_bos_token", bool)
    if model == "llama":
        add_space_prefix = get("ggml.add_space_prefix", bool)
        hf = build_spm(tokens, scores or [0.0] * n, types,
                       add_space_prefix=True if add_space_prefix is None else add_space_prefix)
        kind, pre, add_bos_default = "spm", None, True
    elif model == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in _strings(reader, "tokenizer.ggml.merges", path) or []]
        if any(len(m) != 2 for m in merges):
            raise CamelidError(f"{path}: a tokenizer.ggml.merges entry is not two pieces separated by a space; the "
                               "file is damaged, re-convert it")
        pre = get("ggml.pre", str) or "default"
        hf = build_bpe(tokens, types, merges, pre=pre, source=str(path))
        # llama.cpp adds BOS by default only for Llama 3 style vocabularies
        kind, add_bos_default = "bpe", pre in IGNORE_MERGES
    else:
        raise CamelidError(f"{path}: GGUF vocabulary kind {model!r} (tokenizer.ggml.model) is not supported; "
                           "camelid reads 'llama' (SentencePiece) and 'gpt2' (byte-level BPE)")
    return Vocabulary(kind=kind, hf=hf, pre=pre, bos_id=ids["bos_token_id"], eos_id=ids["eos_token_id"],
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
