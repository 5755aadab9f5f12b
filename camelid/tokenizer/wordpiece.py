"""WordPiece tokenization for BERT, through the `tokenizers` library.

BERT's recipe: normalise (clean control characters, split CJK characters, lowercase and strip accents for
uncased models), split on whitespace and punctuation, then greedy longest-match-first into word pieces
(continuations marked '##'), and wrap as [CLS] A [SEP] (B [SEP]) with segment ids 0 for A, 1 for B.
Loads vocab.txt or tokenizer.json, trains new vocabularies, and batches with padding and attention masks.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from torch import Tensor

from camelid.errors import CamelidError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _bert_pipeline(tok: Tokenizer, lowercase: bool, strip_accents: bool | None) -> Tokenizer:
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=strip_accents, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


class WordPiece:
    """A BERT tokenizer: `encode` for one text (or pair), `__call__` for padded batches as tensors."""

    def __init__(self, tokenizer: Tokenizer, max_len: int = 512) -> None:
        self.tokenizer = tokenizer
        self.max_len = max_len
        for t in SPECIAL_TOKENS:
            if tokenizer.token_to_id(t) is None:
                raise CamelidError(f"the vocabulary has no {t} token; a BERT vocabulary needs "
                                   f"{', '.join(SPECIAL_TOKENS)}")
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
            tokenizer.token_to_id(t) for t in SPECIAL_TOKENS)
        # marked special (ids unchanged): "[MASK]" in a text stays one token, decode can skip them
        tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
        # [CLS] A [SEP] and [CLS] A [SEP] B [SEP], B's tokens (and its [SEP]) in segment 1
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", self.cls_id), ("[SEP]", self.sep_id)])

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_vocab(cls, vocab_file: str | os.PathLike, lowercase: bool = True,
                   strip_accents: bool | None = None, max_len: int = 512) -> WordPiece:
        """From a BERT vocab.txt (one token per line; the line number is the id)."""
        path = Path(vocab_file)
        if not path.is_file():
            raise CamelidError(f"{path}: no such vocabulary file; pass a BERT vocab.txt")
        vocab: dict[str, int] = {}
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            vocab.setdefault(line.rstrip("\r"), i)
        tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
        return cls(_bert_pipeline(tok, lowercase, strip_accents), max_len)

    @classmethod
    def from_file(cls, tokenizer_json: str | os.PathLike, max_len: int = 512) -> WordPiece:
        try:
            tok = Tokenizer.from_file(str(tokenizer_json))
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception on bad files
            raise CamelidError(f"{tokenizer_json}: not a readable tokenizer.json ({e}); re-download it") from None
        if not isinstance(tok.model, models.WordPiece):
            raise CamelidError(f"{tokenizer_json}: a {type(tok.model).__name__} tokenizer, not WordPiece; "
                               "BERT needs a WordPiece vocabulary")
        tok.no_padding()
        tok.no_truncation()
        return cls(tok, max_len)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> WordPiece:
        """From a Hugging Face BERT folder: tokenizer.json if present, else vocab.txt + tokenizer_config.json."""
        path = Path(path)
        conf = {}
        if (path / "tokenizer_config.json").is_file():
            conf = json.loads((path / "tokenizer_config.json").read_text())
        max_len = int(conf.get("model_max_length", 512))
        max_len = max_len if max_len < 1_000_000 else 512  # HF writes a huge sentinel when unset
        if (path / "tokenizer.json").is_file():
            return cls.from_file(path / "tokenizer.json", max_len)
        if (path / "vocab.txt").is_file():
            return cls.from_vocab(path / "vocab.txt", lowercase=conf.get("do_lower_case", True),
                                  strip_accents=conf.get("strip_accents"), max_len=max_len)
        raise CamelidError(f"{path}: no tokenizer.json or vocab.txt; is this a BERT model folder?")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 8000, lowercase: bool = True,
              min_frequency: int = 2, max_len: int = 512) -> WordPiece:
        """Learn a new WordPiece vocabulary from texts; the specials take ids 0-4 ([PAD] = 0)."""
        tok = _bert_pipeline(Tokenizer(models.WordPiece(unk_token="[UNK]")), lowercase, None)
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                            special_tokens=list(SPECIAL_TOKENS), continuing_subword_prefix="##",
                                            show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok, max_len)

    def save(self, path: str | os.PathLike) -> Path:
        """Write tokenizer.json and vocab.txt into the folder `path` (atomically)."""
        from camelid.fileio import atomic_write, atomic_write_text

        path = Path(path)
        vocab = sorted(self.tokenizer.get_vocab().items(), key=lambda kv: kv[1])
        atomic_write(path / "tokenizer.json", lambda p: self.tokenizer.save(str(p)))
        atomic_write_text(path / "vocab.txt", "".join(t + "\n" for t, _ in vocab))
        return path

    # -- use ---------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @property
    def special_ids(self) -> list[int]:
        return [self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id]

    def encode(self, text: str, pair: str | None = None, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, pair, add_special_tokens=add_special_tokens).ids

    def encode_with_types(self, text: str, pair: str | None = None) -> tuple[list[int], list[int]]:
        """[CLS] A [SEP] (B [SEP]) ids and their segment ids, untruncated."""
        e = self.tokenizer.encode(text, pair)
        return e.ids, e.type_ids

    def tokenize(self, text: str) -> list[str]:
        return self.tokenizer.encode(text, add_special_tokens=False).tokens

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def __call__(self, texts: Sequence[str], pairs: Sequence[str] | None = None,
                 max_len: int | None = None) -> dict[str, Tensor]:
        """A padded batch: input_ids, token_type_ids, attention_mask ([B, T] int64); longest-first truncation."""
        if isinstance(texts, str):
            texts = [texts]
        if pairs is not None and len(pairs) != len(texts):
            raise CamelidError(f"{len(texts)} texts but {len(pairs)} second sentences; pairs must line up")
        n = max_len or self.max_len
        items = list(zip(texts, pairs, strict=True)) if pairs is not None else list(texts)
        self.tokenizer.enable_truncation(n, strategy="longest_first")
        self.tokenizer.enable_padding(pad_id=self.pad_id, pad_token="[PAD]", pad_type_id=0)
        try:
            encs = self.tokenizer.encode_batch(items)
        finally:
            self.tokenizer.no_truncation()
            self.tokenizer.no_padding()
        return {
            "input_ids": torch.tensor([e.ids for e in encs], dtype=torch.long),
            "token_type_ids": torch.tensor([e.type_ids for e in encs], dtype=torch.long),
            "attention_mask": torch.tensor([e.attention_mask for e in encs], dtype=torch.long),
        }
