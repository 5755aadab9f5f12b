"""The Tokenizer: one interface over every vocabulary camelid meets, and StreamDecoder for streaming text.

Every backend exposes the same thing: ids, the vocabulary strings (`token_to_piece` / `id_of`), special
tokens, BOS/EOS and the stop ids, the chat template, and it can be written back out as a Hugging Face
folder (`save_pretrained`) or as GGUF `tokenizer.ggml.*` keys (`write_gguf`). The encoder is a Hugging Face
`tokenizers.Tokenizer` (tokenizer.json; also what GGUF vocabularies and SentencePiece models are converted
into, the way transformers and llama.cpp's converters do it) or `tiktoken` for Llama 3's tokenizer.model.

Special-token strings in the text (``<|im_start|>``) are always parsed as specials, as llama.cpp and HF do
for chat prompts.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from camelid import hub
from camelid.errors import CamelidError
from camelid.formats import TOKENIZER_FILES, Format, detect
from camelid.tokenizer import hf_json
from camelid.tokenizer import tiktoken as tiktoken_backend
from camelid.tokenizer.bpe import decode_byte_level
from camelid.tokenizer.chat_template import BUILTIN_TEMPLATES, render_chat
from camelid.tokenizer.gguf import read_gguf_vocab, write_gguf_vocab
from camelid.tokenizer.sentencepiece import read_sentencepiece
from camelid.tokenizer.vocab import (
    BYTE,
    CONTROL,
    END_OF_TURN_TOKENS,
    NORMAL,
    UNKNOWN,
    USER_DEFINED,
    Vocabulary,
)


class Tokenizer:
    """Text <-> ids, with the specials, stop ids and chat template of one model. Load one with `Tokenizer.load`."""

    def __init__(self, hf: Any = None, *, tiktoken_encoding: Any = None, kind: str | None = None,
                 pre: str | None = None, bos_id: int | None = None, eos_id: int | None = None,
                 unk_id: int | None = None, pad_id: int | None = None, add_bos: bool = False,
                 chat_template: str | None = None, token_types: list[int] | None = None,
                 scores: list[float] | None = None, max_len: int | None = None, encoder: Any = None,
                 build_hf: Callable[[], Any] | None = None, pieces: Sequence[str] | None = None) -> None:
        if (hf is None and build_hf is None) == (tiktoken_encoding is None) or (build_hf is None) != (pieces is None):
            raise ValueError("give exactly one backend")
        self._hf = hf
        # GGUF byte-level BPE: `tokenizers` built on first use; `encoder` encodes, decode_byte_level decodes
        self._build_hf = build_hf
        self._tt = tiktoken_encoding
        self._encoder = encoder  # text -> ids instead of `hf` (GGUF BPE vocabularies: llama.cpp's exact rules)
        # "spm" (SentencePiece-style BPE), "bpe" (byte-level BPE), "wordpiece", "wordlevel" or "unigram"
        self.kind = kind or ("bpe" if hf is None else hf_json.kind_of(hf))
        self.pre = pre  # the GGUF pre-tokenizer name, for byte-level BPE
        self.bos_id, self.eos_id, self.unk_id, self.pad_id = bos_id, eos_id, unk_id, pad_id
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.max_len = max_len
        self._scores = scores
        if self._tt is not None:
            self._pieces = tiktoken_backend.pieces(self._tt)
        elif pieces is not None:
            self._pieces = pieces
        else:
            n = self._hf.get_vocab_size(with_added_tokens=True)
            # interned: Tokenizers of one vocabulary (a server's, its workers') share the strings
            self._pieces = [sys.intern(self._hf.id_to_token(i) or "") for i in range(n)]
        self._ids: dict[str, int] | None = None  # built by the first id_of (a 50k vocabulary's: ~3 MiB)
        self._types = token_types or self._infer_types()
        self.special_tokens: dict[str, int] = {
            p: i for i, p in enumerate(self._pieces) if self._types[i] in (CONTROL, USER_DEFINED, UNKNOWN)}
        self._control = {i for i, t in enumerate(self._types) if t in (CONTROL, UNKNOWN)}
        self._end_of_turn = {i for p, i in self.special_tokens.items() if p in END_OF_TURN_TOKENS}

    @classmethod
    def from_vocabulary(cls, v: Vocabulary) -> Tokenizer:
        return cls(v.hf, tiktoken_encoding=v.tiktoken, kind=v.kind, pre=v.pre, bos_id=v.bos_id, eos_id=v.eos_id,
                   unk_id=v.unk_id, pad_id=v.pad_id, add_bos=v.add_bos, chat_template=v.chat_template,
                   token_types=v.token_types, scores=v.scores, max_len=v.max_len, encoder=v.encoder,
                   build_hf=v.build_hf, pieces=v.pieces)

    # ---- the interface -------------------------------------------------------------------------------------

    @property
    def stop_ids(self) -> set[int]:
        """Ids that end a reply: the end-of-turn tokens of the vocabulary and EOS."""
        return self._end_of_turn | ({self.eos_id} if self.eos_id is not None else set())

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """The ids of `text`; `add_bos` puts the model's BOS in front (BERT: [CLS] in front and [SEP] after)."""
        if not isinstance(text, str):
            raise CamelidError(f"encode expects a str, got {type(text).__name__}; decode bytes to text first")
        if self.kind == "wordpiece":  # BERT's post-processor wraps the text
            return self._hf.encode(text, add_special_tokens=add_bos).ids
        if self._encoder is not None:
            ids = self._encoder.encode(text)
        elif self._tt is not None:
            ids = self._tt.encode(text, allowed_special="all")
        else:
            ids = self._hf.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return list(ids)

    def encode_batch(self, texts: list[str], add_bos: bool = False) -> list[list[int]]:
        """`encode` of many texts at once (in parallel threads of the Rust/tiktoken encoder; one by one for GGUF BPE
        vocabularies, which encode as llama.cpp does)."""
        bad = next((t for t in texts if not isinstance(t, str)), None)
        if bad is not None:
            raise CamelidError(f"encode expects str, got {type(bad).__name__}; decode bytes to text first")
        if self.kind == "wordpiece":
            return [e.ids for e in self._hf.encode_batch(texts, add_special_tokens=add_bos)]
        if self._encoder is not None:
            batch = [self._encoder.encode(t) for t in texts]
        elif self._tt is not None:
            batch = self._tt.encode_batch(texts, allowed_special="all")
        else:
            batch = [e.ids for e in self._hf.encode_batch(texts, add_special_tokens=False)]
        head = [self.bos_id] if add_bos and self.bos_id is not None else []
        return [head + list(ids) for ids in batch]

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
        if self._build_hf is not None:  # the same text as `tokenizers`' decode, without building it
            return decode_byte_level(self._pieces, ids)
        return self._hf.decode(ids, skip_special_tokens=False)

    def token_to_piece(self, id: int) -> str:
        """The vocabulary string of a token (as in tokenizer.json / GGUF: 'Ġhello', '▁hello', '<0x0A>')."""
        if not 0 <= id < self.vocab_size:
            raise CamelidError(f"token id {id} is outside the vocabulary (size {self.vocab_size})")
        return self._pieces[id]

    def id_of(self, token: str) -> int:
        if self._ids is None:
            self._ids = {p: i for i, p in enumerate(self._pieces)}
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
        template = self.chat_template or self._builtin_template()
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
        return (f"{type(self).__name__}(kind={self.kind!r}, pre={self.pre!r}, vocab_size={self.vocab_size}, "
                f"bos_id={self.bos_id}, eos_id={self.eos_id}, backend={backend})")

    # ---- loading: `cls` builds the result, so WordPiece.load gives a WordPiece -------------------------------

    @classmethod
    def load(cls, source: str | os.PathLike) -> Tokenizer:
        """A registered name (camelid.hub), a Hub id, a GGUF file, a tokenizer file or a model folder."""
        path = hub.resolve(source)
        fmt = detect(path)
        if fmt is Format.GGUF:
            return cls.from_gguf(path)
        if fmt is Format.QUANTIZED:  # `camelid quantize` writes the tokenizer files beside the weights
            return cls.from_dir(path.parent)
        if fmt is Format.CHECKPOINT:
            raise CamelidError(f"{path}: a training checkpoint holds no tokenizer; pass the prepared data folder or "
                               "the tokenizer.json the run was trained with")
        return cls.from_file(path) if fmt.is_tokenizer_file else cls.from_dir(path)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """A tokenizer.json, a SentencePiece .model, a tiktoken rank file (Llama 3's tokenizer.model), BERT's
        vocab.txt or a GGUF file. A tokenizer_config.json beside a tokenizer.json/tokenizer.model/vocab.txt
        applies to it, as in a model folder."""
        path = Path(path)
        if not path.is_file():
            raise CamelidError(f"{path}: no such tokenizer file; pass a tokenizer.json or tokenizer.model")
        fmt = detect(path)
        if fmt is Format.GGUF:
            return cls.from_gguf(path)
        config_file = path.parent / "tokenizer_config.json"
        config = hf_json.read_tokenizer_config(config_file) if path.name in TOKENIZER_FILES and \
            config_file.is_file() else None
        if fmt is Format.TOKENIZER_JSON:
            v = hf_json.read_tokenizer_json(path)
        elif fmt is Format.TIKTOKEN:
            v = tiktoken_backend.read_tiktoken(path)
        elif fmt is Format.SENTENCEPIECE:
            v = read_sentencepiece(path)
        elif fmt is Format.WORDPIECE_VOCAB:
            v = hf_json.read_vocab_txt(path, lowercase=config.lowercase if config else True,
                                       strip_accents=config.strip_accents if config else None)
        else:
            raise CamelidError(f"{path}: a {fmt.value} file, not a tokenizer; pass the model's tokenizer file")
        if config is not None:
            hf_json.apply_tokenizer_config(v, config)
        return cls.from_vocabulary(v)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """A Hugging Face / Meta / BERT folder: tokenizer.json preferred, then tokenizer.model, then vocab.txt,
        with its tokenizer_config.json."""
        path = Path(path)
        if not path.is_dir():
            raise CamelidError(f"{path}: not a folder; pass the model folder that holds tokenizer.json")
        for name in TOKENIZER_FILES:
            if (path / name).is_file():
                return cls.from_file(path / name)
        raise CamelidError(f"{path}: has no {', '.join(TOKENIZER_FILES[:-1])} or {TOKENIZER_FILES[-1]}; copy the "
                           "model's tokenizer files into it")

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> Tokenizer:
        """The vocabulary embedded in a GGUF file (`tokenizer.ggml.*` keys)."""
        return cls.from_vocabulary(read_gguf_vocab(Path(path)))

    @classmethod
    def from_hf(cls, hf: Any, *, bos_id: int | None = None, eos_id: int | None = None,
                add_bos: bool | None = None) -> Tokenizer:
        """Wrap a `tokenizers.Tokenizer` built in code; BOS/EOS by their usual names unless given."""
        v = hf_json.vocabulary_from_hf(hf, "the tokenizer")
        v.bos_id = v.bos_id if bos_id is None else bos_id
        v.eos_id = v.eos_id if eos_id is None else eos_id
        v.add_bos = v.add_bos if add_bos is None else add_bos
        return cls.from_vocabulary(v)

    # ---- writing -------------------------------------------------------------------------------------------

    def hf_tokenizer(self) -> Any:
        """This vocabulary as a Hugging Face `tokenizers.Tokenizer` (converted from tiktoken if need be)."""
        if self._hf is None:
            self._hf = self._build_hf() if self._build_hf is not None else tiktoken_backend.to_hf(self._tt)
        return self._hf

    def special_token_names(self) -> dict[str, str]:
        """transformers' names for this model's special tokens ("bos_token": "<s>", ...)."""
        named = {"bos_token": self.bos_id, "eos_token": self.eos_id, "unk_token": self.unk_id, "pad_token": self.pad_id}
        return {k: self._pieces[v] for k, v in named.items() if v is not None}

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json (transformers can load them)."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import processors

        hf = HFTokenizer.from_str(self.hf_tokenizer().to_str())  # a copy: the post-processor changes below
        if self.kind != "wordpiece":  # (BERT's [CLS] A [SEP] post-processor stays)
            if self.add_bos and self.bos_id is not None:
                bos = self._pieces[self.bos_id]
                hf.post_processor = processors.TemplateProcessing(
                    single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, self.bos_id)])
            else:
                hf.post_processor = None
        return hf_json.save_pretrained(Path(path), hf, special_tokens=self.special_token_names(),
                                       add_bos=None if self.kind == "wordpiece" else self.add_bos,
                                       chat_template=self.chat_template, max_len=self.max_len)

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
        if self.kind not in ("spm", "bpe"):
            raise CamelidError(f"a {self.kind} vocabulary cannot be written into GGUF; camelid writes "
                               "SentencePiece-style and byte-level BPE vocabularies")
        arrays = self.gguf_arrays()
        write_gguf_vocab(writer, kind=self.kind, pre=self.pre, tokens=arrays["tokens"],
                         token_types=arrays["token_type"], scores=arrays["scores"], merges=arrays["merges"],
                         ids={"bos": self.bos_id, "eos": self.eos_id, "unk": self.unk_id, "pad": self.pad_id},
                         add_bos=self.add_bos, add_space_prefix=self.kind == "spm" and self._add_space_prefix(),
                         chat_template=self.chat_template)

    # ---- helpers -------------------------------------------------------------------------------------------

    def _builtin_template(self) -> str:
        if "<|start_header_id|>" in self.special_tokens:
            return BUILTIN_TEMPLATES["llama3"]
        if "<|im_start|>" in self.special_tokens:
            return BUILTIN_TEMPLATES["chatml"]
        return BUILTIN_TEMPLATES["llama2"]

    def _add_space_prefix(self) -> bool:
        """Whether a space goes in front of the text (SentencePiece's dummy prefix): a Prepend normalizer, or
        a Metaspace pre-tokenizer whose prepend scheme is not "never"."""
        spec = json.loads(self.hf_tokenizer().to_str())
        normalizer, pre = json.dumps(spec.get("normalizer")), json.dumps(spec.get("pre_tokenizer"))
        metaspace_prepends = '"Metaspace"' in pre and '"prepend_scheme": "never"' not in pre
        return '"Prepend"' in normalizer or metaspace_prepends

    def _infer_types(self) -> list[int]:
        if self._tt is not None:
            return tiktoken_backend.token_types(self._tt)
        types = [NORMAL] * len(self._pieces)
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
