"""Build Hugging Face `tokenizers` objects from raw vocabularies (GGUF arrays, SentencePiece pieces).

Two recipes, the ones llama.cpp implements natively and HF's converters produce:
- SentencePiece-style BPE ("llama" in GGUF): ▁ for spaces (and one in front of the text), merges ordered
  by the score of the merged piece, unknown bytes as <0xNN> tokens;
- byte-level BPE ("gpt2" in GGUF): the pre-tokenizer regexes of `tokenizer.ggml.pre`, GPT-2's byte alphabet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from camelid.errors import CamelidError
from camelid.tokenizer import (
    _IGNORE_MERGES,
    CONTROL,
    NORMAL,
    PRE_TOKENIZER_REGEXES,
    UNKNOWN,
    USER_DEFINED,
    Tokenizer,
)


def _vocab_dict(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a few vocabularies repeat a piece; the first id wins, as in llama.cpp
    return vocab


def _add_specials(hf: Any, tokens: list[str], types: list[int]) -> None:
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
    """`split_words`: SentencePiece models trained without allow_whitespace_only_pieces cut the text before
    every ▁ before merging (Llama's allow them, and llama.cpp never cuts)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers

    unk = next((tokens[i] for i, t in enumerate(types) if t == UNKNOWN), None)
    hf = HFTokenizer(models.BPE(_vocab_dict(tokens), spm_merges(tokens, scores, types), unk_token=unk,
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
    _add_specials(hf, tokens, types)
    return hf


def build_bpe(tokens: list[str], types: list[int], merges: list[tuple[str, str]], *, pre: str) -> Any:
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    if pre not in PRE_TOKENIZER_REGEXES:
        raise CamelidError(f"unknown byte-level BPE pre-tokenizer {pre!r} (tokenizer.ggml.pre); camelid knows "
                           f"{', '.join(PRE_TOKENIZER_REGEXES)}")
    hf = HFTokenizer(models.BPE(_vocab_dict(tokens), merges, ignore_merges=pre in _IGNORE_MERGES))
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZER_REGEXES[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    _add_specials(hf, tokens, types)
    return hf


# ---- GGUF ----------------------------------------------------------------------------------------------------


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}


def read_gguf_metadata(path: Path, prefix: str = "") -> dict[str, Any]:
    """The key/value metadata of a GGUF file (keys starting with `prefix`), without reading tensors.

    gguf.GGUFReader parses every array element into its own numpy view, which takes seconds for a 150k-token
    vocabulary; this reads the header sequentially (arrays of numbers in one numpy call)."""
    import mmap
    import struct

    import numpy as np

    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise CamelidError(f"{path}: not a GGUF file (bad magic); pass a .gguf model or vocabulary")
        version, _n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version < 2:
            raise CamelidError(f"{path}: GGUF version {version} is too old; re-convert it with a current llama.cpp")
        pos = 24

        def string() -> str:
            nonlocal pos
            (n,) = struct.unpack_from("<Q", buf, pos)
            pos += 8 + n
            return buf[pos - n:pos].decode("utf-8", errors="replace")

        def value(kind: int) -> Any:
            nonlocal pos
            if kind == 8:
                return string()
            if kind == 9:
                elem, n = struct.unpack_from("<IQ", buf, pos)
                pos += 12
                if elem in _NUMPY:
                    arr = np.frombuffer(buf, dtype=_NUMPY[elem], count=n, offset=pos).copy()
                    pos += arr.nbytes
                    return arr.tolist()
                return [value(elem) for _ in range(n)]
            fmt = _SCALARS[kind]
            (v,) = struct.unpack_from(fmt, buf, pos)
            pos += struct.calcsize(fmt)
            return v

        out: dict[str, Any] = {}
        try:
            for _ in range(n_kv):
                key = string()
                (kind,) = struct.unpack_from("<I", buf, pos)
                pos += 4
                v = value(kind)
                if key.startswith(prefix):
                    out[key] = v
        except (struct.error, KeyError, ValueError) as e:
            raise CamelidError(f"{path}: truncated or corrupt GGUF metadata ({type(e).__name__}); "
                               "re-download or re-convert it") from e
    return out


def read_gguf_vocab(path: Path) -> dict[str, Any]:
    """The `tokenizer.*` keys of a GGUF file as plain Python values."""
    if not path.is_file():
        raise CamelidError(f"{path}: no such GGUF file; check the path")
    f = read_gguf_metadata(path, "tokenizer.")
    if "tokenizer.ggml.model" not in f or "tokenizer.ggml.tokens" not in f:
        raise CamelidError(f"{path}: has no embedded vocabulary (tokenizer.ggml.* keys); pass the model's "
                           "tokenizer.json folder instead")
    tokens = f["tokenizer.ggml.tokens"]
    out: dict[str, Any] = {
        "model": f["tokenizer.ggml.model"],
        "pre": f.get("tokenizer.ggml.pre", "default"),
        "tokens": tokens,
        "types": f.get("tokenizer.ggml.token_type", [NORMAL] * len(tokens)),
        "scores": f.get("tokenizer.ggml.scores"),
        "merges": f.get("tokenizer.ggml.merges", []),
        "chat_template": f.get("tokenizer.chat_template"),
    }
    for key in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id", "add_bos_token",
                "add_space_prefix"):
        out[key] = f.get(f"tokenizer.ggml.{key}")
    return out


def tokenizer_from_gguf(path: Path) -> Tokenizer:
    v = read_gguf_vocab(path)
    tokens, types, kind = v["tokens"], v["types"], v["model"]
    if kind == "llama":
        scores = v["scores"] or [0.0] * len(tokens)
        add_space_prefix = True if v["add_space_prefix"] is None else bool(v["add_space_prefix"])
        hf = build_spm(tokens, scores, types, add_space_prefix=add_space_prefix)
        add_bos_default, ours, pre = True, "spm", None
    elif kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in v["merges"]]
        pre = v["pre"] or "default"
        hf = build_bpe(tokens, types, merges, pre=pre)
        # llama.cpp adds BOS by default only for Llama 3 style vocabularies
        add_bos_default, ours, scores = pre in _IGNORE_MERGES, "bpe", v["scores"]
    else:
        raise CamelidError(f"{path}: GGUF vocabulary kind {kind!r} (tokenizer.ggml.model) is not supported; "
                           "camelid reads 'llama' (SentencePiece) and 'gpt2' (byte-level BPE)")
    add_bos = add_bos_default if v["add_bos_token"] is None else bool(v["add_bos_token"])
    return Tokenizer(hf, kind=ours, pre=pre, bos_id=v["bos_token_id"], eos_id=v["eos_token_id"],
                     unk_id=v["unknown_token_id"], pad_id=v["padding_token_id"], add_bos=add_bos,
                     chat_template=v["chat_template"], token_types=types, scores=scores)
