"""WordPiece tokenization for BERT: the camelid Tokenizer, plus what BERT's data needs (sentence pairs with
segment ids, padded batches as tensors, new vocabularies trained on text).

BERT's recipe: normalise (clean control characters, split CJK characters, lowercase and strip accents for
uncased models), split on whitespace and punctuation, then greedy longest-match-first into word pieces
(continuations marked '##'), and wrap as [CLS] A [SEP] (B [SEP]) with segment ids 0 for A, 1 for B.
Loads vocab.txt or tokenizer.json (`WordPiece.load` / `from_dir` / `from_file` / `from_vocab`, or any
`Tokenizer.load` of a BERT folder, which encodes and decodes the same), trains new vocabularies.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from camelid.errors import CamelidError
from camelid.fileio import atomic_write_text
from camelid.tokenizer import hf_json
from camelid.tokenizer.base import Tokenizer
from camelid.tokenizer.vocab import BERT_SPECIAL_TOKENS, Vocabulary, bert_pipeline, bert_specials

SPECIAL_TOKENS = BERT_SPECIAL_TOKENS


class WordPiece(Tokenizer):
    """A BERT tokenizer: `encode(text, add_bos=True)` gives [CLS] text [SEP], `encode_with_types` a pair with
    its segment ids, and calling it gives a padded batch as tensors."""

    def __init__(self, tokenizer: Any, max_len: int = 512, source: str = "the vocabulary") -> None:
        ids = bert_specials(tokenizer, source)
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (ids[t] for t in SPECIAL_TOKENS)
        super().__init__(tokenizer, kind="wordpiece", bos_id=self.cls_id, eos_id=self.sep_id, unk_id=self.unk_id,
                         pad_id=self.pad_id, add_bos=True, max_len=max_len)
        self.max_len: int = max_len

    @property
    def tokenizer(self) -> Any:
        """The underlying `tokenizers.Tokenizer`."""
        return self.hf_tokenizer()

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_vocabulary(cls, v: Vocabulary) -> WordPiece:
        if v.kind != "wordpiece" or v.hf is None:
            raise CamelidError(f"a {v.kind} vocabulary, not WordPiece; BERT needs a WordPiece vocabulary "
                               "(vocab.txt or a WordPiece tokenizer.json)")
        return cls(v.hf, v.max_len or 512)

    @classmethod
    def from_vocab(cls, vocab_file: str | os.PathLike, lowercase: bool = True,
                   strip_accents: bool | None = None, max_len: int = 512) -> WordPiece:
        """From a BERT vocab.txt (one token per line; the line number is the id)."""
        path = Path(vocab_file)
        if not path.is_file():
            raise CamelidError(f"{path}: no such vocabulary file; pass a BERT vocab.txt")
        v = hf_json.read_vocab_txt(path, lowercase=lowercase, strip_accents=strip_accents)
        return cls(v.hf, max_len, str(path))

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 8000, lowercase: bool = True,
              min_frequency: int = 2, max_len: int = 512) -> WordPiece:
        """Learn a new WordPiece vocabulary from texts; the specials take ids 0-4 ([PAD] = 0)."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import models, trainers

        hf = bert_pipeline(HFTokenizer(models.WordPiece(unk_token="[UNK]")), lowercase=lowercase)
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                            special_tokens=list(SPECIAL_TOKENS), continuing_subword_prefix="##",
                                            show_progress=False)
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf, max_len)

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """tokenizer.json, tokenizer_config.json, special_tokens_map.json and BERT's vocab.txt, each atomically."""
        out = super().save_pretrained(path)
        vocab = sorted(self.hf_tokenizer().get_vocab().items(), key=lambda kv: kv[1])
        atomic_write_text(out / "vocab.txt", "".join(t + "\n" for t, _ in vocab))
        return out

    save = save_pretrained

    def special_token_names(self) -> dict[str, str]:
        return {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                "mask_token": "[MASK]"}

    # -- use ---------------------------------------------------------------------------------------
    @property
    def special_ids(self) -> list[int]:
        return [self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id]

    def encode(self, text: str, add_bos: bool = False, *, pair: str | None = None) -> list[int]:
        """The ids of `text` (and a second sentence `pair`); `add_bos` wraps them as [CLS] A [SEP] (B [SEP])."""
        if pair is None:
            return super().encode(text, add_bos)
        return self.hf_tokenizer().encode(text, pair, add_special_tokens=add_bos).ids

    def encode_with_types(self, text: str, pair: str | None = None) -> tuple[list[int], list[int]]:
        """[CLS] A [SEP] (B [SEP]) ids and their segment ids, untruncated."""
        e = self.hf_tokenizer().encode(text, pair)
        return e.ids, e.type_ids

    def tokenize(self, text: str) -> list[str]:
        return self.hf_tokenizer().encode(text, add_special_tokens=False).tokens

    def __call__(self, texts: Sequence[str], pairs: Sequence[str] | None = None,
                 max_len: int | None = None) -> dict[str, Tensor]:
        """A padded batch: input_ids, token_type_ids, attention_mask ([B, T] int64); longest-first truncation."""
        if isinstance(texts, str):
            texts = [texts]
        if pairs is not None and len(pairs) != len(texts):
            raise CamelidError(f"{len(texts)} texts but {len(pairs)} second sentences; pairs must line up")
        n = max_len or self.max_len
        items = list(zip(texts, pairs, strict=True)) if pairs is not None else list(texts)
        hf = self.hf_tokenizer()
        hf.enable_truncation(n, strategy="longest_first")
        hf.enable_padding(pad_id=self.pad_id, pad_token="[PAD]", pad_type_id=0)
        try:
            encs = hf.encode_batch(items)
        finally:
            hf.no_truncation()
            hf.no_padding()
        return {
            "input_ids": torch.tensor([e.ids for e in encs], dtype=torch.long),
            "token_type_ids": torch.tensor([e.type_ids for e in encs], dtype=torch.long),
            "attention_mask": torch.tensor([e.attention_mask for e in encs], dtype=torch.long),
        }
