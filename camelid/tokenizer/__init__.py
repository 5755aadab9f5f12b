"""One Tokenizer over every vocabulary camelid meets.

Backends:
- a Hugging Face ``tokenizers.Tokenizer`` (tokenizer.json; also what GGUF vocabularies and SentencePiece
  ``.model`` files are converted into, the way transformers and llama.cpp's converters do it);
- ``tiktoken`` for Llama 3's ``tokenizer.model`` (base64 token + rank lines, not a SentencePiece proto).

Every backend exposes the same thing: ids, the vocabulary strings (`token_to_piece` / `id_of`), special
tokens, BOS/EOS and the stop ids, the chat template, and it can be written back out as a Hugging Face
folder (`save_pretrained`) or as GGUF ``tokenizer.ggml.*`` keys (`write_gguf`).

Special-token strings in the text (``<|im_start|>``) are always parsed as specials, as llama.cpp and HF do
for chat prompts.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from camelid.errors import CamelidError
from camelid.fileio import atomic_write_text

# GGUF token types (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# end-of-generation tokens llama.cpp recognises by their text (llama-vocab.cpp, special_eog_ids)
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                      "<|end_of_text|>", "<EOT>", "<end_of_utterance>")

# Pre-tokenizer regexes by GGUF `tokenizer.ggml.pre`, applied in sequence (each splits the pieces of the
# previous one, keeping matches and gaps), as llama.cpp's llm_tokenizer_bpe does. Taken from the
# tokenizer.json files of the models (HF) and llama.cpp's llama-vocab.cpp.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_REGEXES: dict[str, list[str]] = {
    "gpt-2": [_GPT2],
    # llama.cpp's fall-back for BPE vocabularies without a known pre-tokenizer
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
    "llama-bpe": [_LLAMA3],
    "llama3": [_LLAMA3],
    "qwen2": [_QWEN2],
    # SmolLM/StarCoder: every digit on its own, then GPT-2's regex
    "smollm": [r"\p{N}", _GPT2],
    "starcoder": [r"\p{N}", _GPT2],
}
# llama.cpp's llama3 pre-tokenizer also looks a whole word up in the vocabulary before merging
_IGNORE_MERGES = {"llama-bpe", "llama3"}

# Llama 3's tiktoken layout (llama_models/llama3/tokenizer.py): 128000 ranks, then 256 specials
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
                   "<|image|>"]
LLAMA3_NUM_SPECIALS = 256


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


class Tokenizer:
    """Text <-> ids, with the specials, stop ids and chat template of one model. Build it with a `from_*`."""

    def __init__(self, hf: Any = None, *, tiktoken_encoding: Any = None, kind: str, pre: str | None = None,
                 bos_id: int | None = None, eos_id: int | None = None, unk_id: int | None = None,
                 pad_id: int | None = None, add_bos: bool = False, chat_template: str | None = None,
                 token_types: list[int] | None = None, scores: list[float] | None = None) -> None:
        if (hf is None) == (tiktoken_encoding is None):
            raise ValueError("give exactly one backend")
        self._hf = hf
        self._tt = tiktoken_encoding
        self.kind = kind  # "spm" (SentencePiece-style BPE) or "bpe" (byte-level BPE)
        self.pre = pre  # the GGUF pre-tokenizer name, for byte-level BPE
        self.bos_id, self.eos_id, self.unk_id, self.pad_id = bos_id, eos_id, unk_id, pad_id
        self.add_bos = add_bos
        self.chat_template = chat_template
        self._scores = scores
        if self._tt is not None:
            self._pieces = _tiktoken_pieces(self._tt)
        else:
            n = self._hf.get_vocab_size(with_added_tokens=True)
            self._pieces = [self._hf.id_to_token(i) or "" for i in range(n)]
        self._ids = {p: i for i, p in enumerate(self._pieces)}
        self._types = token_types or self._infer_types()
        self.special_tokens: dict[str, int] = {
            p: i for i, p in enumerate(self._pieces) if self._types[i] in (CONTROL, USER_DEFINED, UNKNOWN)}
        self._control = {i for i, t in enumerate(self._types) if t in (CONTROL, UNKNOWN)}
        self._end_of_turn = {i for p, i in self.special_tokens.items() if p in END_OF_TURN_TOKENS}

    # ---- the interface -------------------------------------------------------------------------------------

    @property
    def stop_ids(self) -> set[int]:
        """Ids that end a reply: the end-of-turn tokens of the vocabulary and EOS."""
        return self._end_of_turn | ({self.eos_id} if self.eos_id is not None else set())

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise CamelidError(f"encode expects a str, got {type(text).__name__}; decode bytes to text first")
        if self._tt is not None:
            ids = self._tt.encode(text, allowed_special="all")
        else:
            ids = self._hf.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return list(ids)

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise CamelidError(f"token id {bad[0]} is outside the vocabulary (size {self.vocab_size}); "
                               "the ids come from another tokenizer or model")
        if skip_special:
            ids = [i for i in ids if i not in self._control]
        if self._tt is not None:
            return self._tt.decode_bytes(ids).decode("utf-8", errors="replace")
        return self._hf.decode(ids, skip_special_tokens=False)

    def token_to_piece(self, id: int) -> str:
        """The vocabulary string of a token (as in tokenizer.json / GGUF: 'Ġhello', '▁hello', '<0x0A>')."""
        if not 0 <= id < self.vocab_size:
            raise CamelidError(f"token id {id} is outside the vocabulary (size {self.vocab_size})")
        return self._pieces[id]

    def id_of(self, token: str) -> int:
        if token not in self._ids:
            raise CamelidError(f"{token!r} is not a token of this vocabulary; check its spelling")
        return self._ids[token]

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_id is None else self._pieces[self.bos_id]

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_id is None else self._pieces[self.eos_id]

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render messages with the model's own template (or a built-in one when it has none)."""
        from camelid.tokenizer.chat_template import render_chat

        template = self.chat_template or _builtin_template_for(self)
        # the special tokens transformers hands to templates
        for name, id in (("unk_token", self.unk_id), ("pad_token", self.pad_id)):
            if id is not None:
                kwargs.setdefault(name, self._pieces[id])
        return render_chat(template, messages, add_generation_prompt=add_generation_prompt,
                           bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)

    def stream(self, ids: Iterable[int], skip_special: bool = False) -> Iterator[str]:
        """Yield text as ids arrive, never splitting a multi-byte character."""
        dec = StreamDecoder(self, skip_special=skip_special)
        for i in ids:
            piece = dec.push(i)
            if piece:
                yield piece
        tail = dec.flush()
        if tail:
            yield tail

    def __repr__(self) -> str:
        backend = "tiktoken" if self._tt is not None else "tokenizers"
        return (f"Tokenizer(kind={self.kind!r}, pre={self.pre!r}, vocab_size={self.vocab_size}, "
                f"bos_id={self.bos_id}, eos_id={self.eos_id}, backend={backend})")

    # ---- constructors --------------------------------------------------------------------------------------

    @classmethod
    def load(cls, source: str | os.PathLike) -> Tokenizer:
        """A registered name (camelid.hub), a Hub id, a GGUF file, a tokenizer file or a model folder."""
        from camelid import hub

        path = hub.resolve(source)
        if path.is_dir():
            return cls.from_dir(path)
        return cls.from_gguf(path) if path.suffix == ".gguf" else cls.from_file(path)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """A tokenizer.json, a SentencePiece .model, or a tiktoken rank file (Llama 3's tokenizer.model)."""
        path = Path(path)
        if not path.is_file():
            raise CamelidError(f"{path}: no such tokenizer file; pass a tokenizer.json or tokenizer.model")
        if path.suffix == ".gguf":
            return cls.from_gguf(path)
        head = path.read_bytes()[:4096]
        if head.lstrip()[:1] == b"{":
            return _from_tokenizer_json(path)
        if _looks_like_tiktoken(head):
            return _from_tiktoken(path)
        return _from_sentencepiece(path)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """A Hugging Face / Meta folder: tokenizer.json preferred, then tokenizer.model, + tokenizer_config.json."""
        path = Path(path)
        if not path.is_dir():
            raise CamelidError(f"{path}: not a folder; pass the model folder that holds tokenizer.json")
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                tok = cls.from_file(path / name)
                break
        else:
            raise CamelidError(f"{path}: has neither tokenizer.json nor tokenizer.model; copy the model's "
                               "tokenizer files into it")
        cfg_path = path / "tokenizer_config.json"
        if cfg_path.is_file():
            _apply_tokenizer_config(tok, _read_json(cfg_path))
        return tok

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> Tokenizer:
        """The vocabulary embedded in a GGUF file (`tokenizer.ggml.*` keys)."""
        from camelid.tokenizer.vocab import tokenizer_from_gguf

        return tokenizer_from_gguf(Path(path))

    # ---- writing -------------------------------------------------------------------------------------------

    def hf_tokenizer(self) -> Any:
        """This vocabulary as a Hugging Face `tokenizers.Tokenizer` (converted from tiktoken if need be)."""
        if self._hf is None:
            self._hf = _tiktoken_to_hf(self._tt)
        return self._hf

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json (transformers can load them)."""
        from tokenizers import processors

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        hf = _clone_hf(self.hf_tokenizer())
        if self.add_bos and self.bos_id is not None:
            bos = self._pieces[self.bos_id]
            hf.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, self.bos_id)])
        else:
            hf.post_processor = None
        named = {"bos_token": self.bos_id, "eos_token": self.eos_id, "unk_token": self.unk_id,
                 "pad_token": self.pad_id}
        special_map = {k: self._pieces[v] for k, v in named.items() if v is not None}
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1 << 30,
            **special_map,
        }
        if self.chat_template:
            config["chat_template"] = self.chat_template
        atomic_write_text(path / "tokenizer.json", hf.to_str())
        atomic_write_text(path / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False))
        atomic_write_text(path / "special_tokens_map.json", json.dumps(special_map, indent=2, ensure_ascii=False))
        return path

    def gguf_arrays(self) -> dict[str, Any]:
        """tokens, token types, scores and merges as the GGUF `tokenizer.ggml.*` arrays want them."""
        model = json.loads(self.hf_tokenizer().to_str())["model"]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        if self._scores is not None:
            scores = list(self._scores)
        else:
            # llama.cpp's SentencePiece tokenizer merges the pair whose merged piece scores highest, so a piece's
            # score is minus the rank of the first merge that makes it; pieces no merge makes score lowest
            made_by: dict[str, int] = {}
            for rank, m in enumerate(merges):
                made_by.setdefault(m.replace(" ", "", 1), rank)
            scores = [0.0 if t != NORMAL else -float(made_by.get(p, 1e9))
                      for p, t in zip(self._pieces, self._types, strict=True)]
        return {"tokens": list(self._pieces), "token_type": list(self._types), "scores": scores, "merges": merges}

    def write_gguf(self, writer: Any) -> None:
        """Add the `tokenizer.ggml.*` keys and `tokenizer.chat_template` to a `gguf.GGUFWriter`."""
        arrays = self.gguf_arrays()
        if self.kind == "spm":
            writer.add_tokenizer_model("llama")
            writer.add_tokenizer_pre("default")
            writer.add_add_space_prefix(self._add_space_prefix())
        else:
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre(self.pre or "default")
            writer.add_token_merges(arrays["merges"])
        writer.add_token_list(arrays["tokens"])
        writer.add_token_types(arrays["token_type"])
        if self.kind == "spm":
            writer.add_token_scores(arrays["scores"])
        for value, add in ((self.bos_id, writer.add_bos_token_id), (self.eos_id, writer.add_eos_token_id),
                           (self.unk_id, writer.add_unk_token_id), (self.pad_id, writer.add_pad_token_id)):
            if value is not None:
                add(value)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(False)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)

    # ---- helpers -------------------------------------------------------------------------------------------

    def _add_space_prefix(self) -> bool:
        """Whether a space goes in front of the text (SentencePiece's dummy prefix): a Prepend normalizer, or
        a Metaspace pre-tokenizer whose prepend scheme is not "never"."""
        spec = json.loads(self.hf_tokenizer().to_str())
        normalizer, pre = json.dumps(spec.get("normalizer")), json.dumps(spec.get("pre_tokenizer"))
        metaspace_prepends = '"Metaspace"' in pre and '"prepend_scheme": "never"' not in pre
        return '"Prepend"' in normalizer or metaspace_prepends

    def _infer_types(self) -> list[int]:
        types = [NORMAL] * len(self._pieces)
        if self._tt is not None:
            for i in range(self._tt.n_vocab):
                if i >= len(self._tt._mergeable_ranks):
                    types[i] = CONTROL
            return types
        for i, added in self._hf.get_added_tokens_decoder().items():
            types[i] = CONTROL if added.special else USER_DEFINED
        if self.kind == "spm":
            for i, p in enumerate(self._pieces):
                if len(p) == 6 and p.startswith("<0x") and p.endswith(">"):
                    types[i] = BYTE
        if self.unk_id is not None:
            types[self.unk_id] = UNKNOWN
        return types


class StreamDecoder:
    """Turn ids into text as they arrive; hold back while the tail is an incomplete UTF-8 sequence.

    It decodes a short window of recent ids (so spaces that depend on the previous token come out right) and
    emits only what is new and complete (the decoded tail does not end in U+FFFD); `flush` emits the rest.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False) -> None:
        self.tok = tokenizer
        self.skip_special = skip_special
        self.ids: list[int] = []
        self.prefix = 0  # start of the decoding window
        self.read = 0  # ids before this have been emitted

    def push(self, id: int) -> str:
        self.ids.append(int(id))
        before = self.tok.decode(self.ids[self.prefix:self.read], self.skip_special)
        now = self.tok.decode(self.ids[self.prefix:], self.skip_special)
        if now.endswith("\ufffd") or len(now) <= len(before) or not now.startswith(before):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(before):]

    def flush(self) -> str:
        before = self.tok.decode(self.ids[self.prefix:self.read], self.skip_special)
        now = self.tok.decode(self.ids[self.prefix:], self.skip_special)
        self.prefix = self.read = len(self.ids)
        return now[len(before):] if now.startswith(before) else now


# ---- tokenizer.json ------------------------------------------------------------------------------------------


def _from_tokenizer_json(path: Path) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    try:
        hf = HFTokenizer.from_file(str(path))
    except Exception as e:
        raise CamelidError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0][:200]}); "
                           "re-export it with tokenizers/transformers") from e
    spec = json.loads(hf.to_str())
    model = spec.get("model", {})
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) or "ByteLevel" in json.dumps(spec.get("decoder"))
    kind = "bpe" if byte_level else "spm"
    if model.get("type") not in ("BPE", None):
        raise CamelidError(f"{path}: a {model.get('type')} tokenizer.json; camelid supports BPE vocabularies "
                           "(Llama, Llama 3, Qwen2, GPT-2, SmolLM)")
    unk = model.get("unk_token")
    unk_id = hf.token_to_id(unk) if unk else None
    pre = _guess_pre(spec) if kind == "bpe" else None
    tok = Tokenizer(hf, kind=kind, pre=pre, unk_id=unk_id)
    # BOS: the post-processor that adds it says which token and that it is added; EOS: by its usual name
    # (a tokenizer_config.json beside the file, read by from_dir, overrides both)
    single = (spec.get("post_processor") or {}).get("single") or []
    first = single[0].get("SpecialToken", {}).get("id") if single and isinstance(single[0], dict) else None
    if first in tok._ids:
        tok.bos_id, tok.add_bos = tok._ids[first], True
    else:
        tok.bos_id = next((tok._ids[t] for t in ("<s>", "<|begin_of_text|>") if t in tok.special_tokens), None)
    tok.eos_id = next((tok._ids[t] for t in ("</s>", "<|end_of_text|>", "<|endoftext|>")
                       if t in tok.special_tokens), None)
    return tok


def _guess_pre(spec: dict) -> str:
    """The GGUF pre-tokenizer name whose regexes this tokenizer.json uses."""
    text = json.dumps(spec.get("pre_tokenizer"))
    if "Digits" in text:
        return "smollm"
    if r"\\p{N}{1,3}" in text:
        return "llama-bpe"
    if r"[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}|" in text:
        return "qwen2"
    return "gpt-2"


def _apply_tokenizer_config(tok: Tokenizer, cfg: dict) -> None:
    def token_id(value: Any) -> int | None:
        if isinstance(value, dict):
            value = value.get("content")
        return tok._ids.get(value) if isinstance(value, str) else None

    for attr, key in (("bos_id", "bos_token"), ("eos_id", "eos_token"), ("unk_id", "unk_token"),
                      ("pad_id", "pad_token")):
        found = token_id(cfg.get(key))
        if found is not None:
            setattr(tok, attr, found)
    if "add_bos_token" in cfg:
        tok.add_bos = bool(cfg["add_bos_token"])
    elif tok.kind == "spm" and tok.bos_id is not None:
        tok.add_bos = True  # LlamaTokenizer's default
    template = cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if isinstance(template, str):
        tok.chat_template = template


# ---- SentencePiece -------------------------------------------------------------------------------------------


def _from_sentencepiece(path: Path) -> Tokenizer:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except Exception as e:
        raise CamelidError(f"{path}: neither a tokenizer.json, a tiktoken rank file nor a SentencePiece model; "
                           "pass the model's tokenizer file") from e
    trainer = _sentencepiece_trainer_spec(path.read_bytes())
    if trainer.get("model_type", 1) != 2:
        raise CamelidError(f"{path}: a SentencePiece {'unigram' if trainer.get('model_type', 1) == 1 else 'word/char'}"
                           " model; camelid supports SentencePiece BPE (Llama 1/2, Mistral)")
    # Llama's models leave text as it is; NFKC-style rules or whitespace folding would silently change ids
    normalizer = trainer.get("normalizer", "identity")
    if normalizer != "identity" or trainer.get("remove_extra_whitespaces", True):
        raise CamelidError(f"{path}: a SentencePiece model with the {normalizer!r} normalizer"
                           f"{' and whitespace folding' if trainer.get('remove_extra_whitespaces', True) else ''};"
                           " camelid reads identity-normalised models (Llama 1/2, Mistral): convert it to a "
                           "tokenizer.json with transformers and pass that")
    tokens, scores, types = [], [], []
    for i in range(sp.GetPieceSize()):
        tokens.append(sp.IdToPiece(i))
        scores.append(sp.GetScore(i))
        types.append(UNKNOWN if sp.IsUnknown(i) else CONTROL if sp.IsControl(i) else BYTE if sp.IsByte(i)
                     else UNUSED if sp.IsUnused(i) else NORMAL)
    # user-defined pieces are "normal" to the python API; the proto says which (type 4)
    for i in trainer.get("user_defined_ids", []):
        types[i] = USER_DEFINED
    from camelid.tokenizer.vocab import build_spm

    hf = build_spm(tokens, scores, types, add_space_prefix=trainer.get("add_dummy_prefix", True),
                   split_words=not trainer.get("allow_whitespace_only_pieces", False))
    bos, eos, unk = sp.bos_id(), sp.eos_id(), sp.unk_id()
    return Tokenizer(hf, kind="spm", bos_id=bos if bos >= 0 else None, eos_id=eos if eos >= 0 else None,
                     unk_id=unk if unk >= 0 else None, add_bos=bos >= 0, token_types=types, scores=scores)


def _varints(buf: bytes) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of one protobuf message, enough to read a SentencePiece header."""
    i = 0

    def varint() -> int:
        nonlocal i
        shift = result = 0
        while True:
            b = buf[i]
            i += 1
            result |= (b & 0x7F) << shift
            if b < 0x80:
                return result
            shift += 7

    while i < len(buf):
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            yield field, wire, varint()
        elif wire == 1:
            yield field, wire, buf[i:i + 8]
            i += 8
        elif wire == 2:
            n = varint()
            yield field, wire, buf[i:i + n]
            i += n
        elif wire == 5:
            yield field, wire, buf[i:i + 4]
            i += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def _sentencepiece_trainer_spec(data: bytes) -> dict[str, Any]:
    """model_type (1 unigram, 2 BPE), allow_whitespace_only_pieces, add_dummy_prefix and user-defined piece ids
    from a ModelProto (field numbers from sentencepiece_model.proto; protobuf itself is not needed)."""
    out: dict[str, Any] = {"user_defined_ids": []}
    piece_index = 0
    for field, _, value in _varints(data):
        if field == 1:  # repeated SentencePiece {piece=1, score=2, type=3}
            for f, _, v in _varints(value):
                if f == 3 and v == 4:
                    out["user_defined_ids"].append(piece_index)
            piece_index += 1
        elif field == 2:  # TrainerSpec: model_type = 3, allow_whitespace_only_pieces = 26
            for f, _, v in _varints(value):
                if f == 3:
                    out["model_type"] = v
                elif f == 26:
                    out["allow_whitespace_only_pieces"] = bool(v)
        elif field == 3:  # NormalizerSpec: name = 1, add_dummy_prefix = 3, remove_extra_whitespaces = 4
            for f, _, v in _varints(value):
                if f == 1:
                    out["normalizer"] = bytes(v).decode("utf-8", errors="replace")
                elif f == 3:
                    out["add_dummy_prefix"] = bool(v)
                elif f == 4:
                    out["remove_extra_whitespaces"] = bool(v)
    return out


# ---- tiktoken ------------------------------------------------------------------------------------------------


def _looks_like_tiktoken(head: bytes) -> bool:
    lines = head.splitlines()[:8]
    if not lines:
        return False
    try:
        for line in lines[:-1] or lines:
            token, rank = line.split()
            base64.b64decode(token, validate=True)
            int(rank)
    except (ValueError, TypeError):
        return False
    return True


def _from_tiktoken(path: Path, pattern: str | None = None, specials: list[str] | None = None) -> Tokenizer:
    """A tiktoken rank file; Llama 3's specials and regex unless told otherwise."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    try:
        ranks = load_tiktoken_bpe(str(path))
    except Exception as e:
        raise CamelidError(f"{path}: not a valid tiktoken rank file ({type(e).__name__}); pass Llama 3's "
                           "original tokenizer.model or the model's tokenizer.json") from e
    if specials is None:
        specials = LLAMA3_SPECIALS + [f"<|reserved_special_token_{i}|>"
                                      for i in range(2, LLAMA3_NUM_SPECIALS - len(LLAMA3_SPECIALS) + 2)]
    n = len(ranks)
    enc = tiktoken.Encoding(name=path.stem, pat_str=pattern or _LLAMA3, mergeable_ranks=ranks,
                            special_tokens={s: n + i for i, s in enumerate(specials)})
    ids = enc._special_tokens
    return Tokenizer(tiktoken_encoding=enc, kind="bpe", pre="llama-bpe",
                     bos_id=ids.get("<|begin_of_text|>"), eos_id=ids.get("<|end_of_text|>"), add_bos=True)


def _tiktoken_pieces(enc: Any) -> list[str]:
    b2u = bytes_to_unicode()
    pieces = [""] * enc.n_vocab
    for token, rank in enc._mergeable_ranks.items():
        pieces[rank] = "".join(b2u[b] for b in token)
    for s, i in enc._special_tokens.items():
        pieces[i] = s
    return pieces


def _tiktoken_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Recover BPE merges from tiktoken ranks: run BPE on each token with only lower ranks allowed;
    what is left is the pair that merges into it (tiktoken's own educational converter does this)."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best = None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best is None or r < best[1]):
                    best = (i, r)
            if best is None:
                break
            i = best[0]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
    return merges


def _tiktoken_to_hf(enc: Any) -> Any:
    from camelid.tokenizer.vocab import build_bpe

    b2u = bytes_to_unicode()
    ranks = enc._mergeable_ranks
    merges = [("".join(b2u[b] for b in a), "".join(b2u[b] for b in b_)) for a, b_ in _tiktoken_merges(ranks)]
    pieces = _tiktoken_pieces(enc)
    types = [NORMAL if i < len(ranks) else CONTROL for i in range(len(pieces))]
    return build_bpe(pieces, types, merges, pre="llama-bpe")


# ---- small helpers -------------------------------------------------------------------------------------------


def _builtin_template_for(tok: Tokenizer) -> str:
    from camelid.tokenizer.chat_template import BUILTIN_TEMPLATES

    if "<|start_header_id|>" in tok.special_tokens:
        return BUILTIN_TEMPLATES["llama3"]
    if "<|im_start|>" in tok.special_tokens:
        return BUILTIN_TEMPLATES["chatml"]
    return BUILTIN_TEMPLATES["llama2"]


def _clone_hf(hf: Any) -> Any:
    from tokenizers import Tokenizer as HFTokenizer

    return HFTokenizer.from_str(hf.to_str())


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CamelidError(f"{path}: not valid JSON ({e}); restore the file from the model's source") from e


