"""BERT's pre-training data: documents -> sentences -> sentence pairs for NSP, masked 80/10/10 for MLM.

Devlin et al. 2019, section 3.1 and appendix A.1:
- NSP: sentence A, then with probability 0.5 the sentence that really follows it (label 0, IsNext) and
  otherwise a random sentence from another document (label 1, NotNext, HF's convention).
- MLM: 15% of the non-special tokens are chosen; of those 80% become [MASK], 10% a random token and 10%
  stay as they are; the loss is read only at the chosen positions.

A prepared folder (`prepare_pairs`, `camelid prepare --objective mlm+nsp`) holds the sentence-split documents
and the WordPiece vocabulary; `load_pairs` reads it back as two `PretrainingData` (train, val), whose
`batch_at(seed, step, index)` draws a training micro-batch from those three numbers alone.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from camelid.bert.model import IGNORE
from camelid.errors import CamelidError
from camelid.fileio import atomic_write, read_json_or_none
from camelid.tokenizer.wordpiece import WordPiece

_CHAPTER_RE = re.compile(r"^\s*(?:CHAPTER|Chapter)\b.*$", re.MULTILINE)
_SENTENCE_END_RE = re.compile(r"(?<=[.!?])[\"'”’)]*\s+(?=[\"'“‘(]*[A-Z])")


def split_documents(text: str) -> list[str]:
    """A novel -> its chapters (documents for NSP's 'random sentence from another document')."""
    parts = [p.strip() for p in _CHAPTER_RE.split(text)]
    return [p for p in parts if len(p) > 200] or [text]


def split_sentences(document: str) -> list[str]:
    """Paragraphs, then sentences at . ! ? followed by a capital; whitespace normalised; very short ones merged."""
    out: list[str] = []
    for para in re.split(r"\n\s*\n", document):
        para = " ".join(para.split())
        for s in _SENTENCE_END_RE.split(para):
            s = s.strip()
            if not s:
                continue
            if out and len(s) < 20:
                out[-1] += " " + s  # "Yes." alone is too little context to predict anything from
            else:
                out.append(s)
    return out


def mask_tokens(input_ids: Tensor, special: Tensor, vocab_size: int, mask_id: int, prob: float = 0.15,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """BERT's 80/10/10 masking. special: bool [B, T], True at [CLS]/[SEP]/[PAD] (never chosen).

    Returns (corrupted input ids, labels with the original id at chosen positions and IGNORE elsewhere).
    """
    g = generator
    chosen = (torch.rand(input_ids.shape, generator=g) < prob) & ~special
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    u = torch.rand(input_ids.shape, generator=g)
    to_mask = chosen & (u < 0.8)
    to_random = chosen & (u >= 0.8) & (u < 0.9)  # the last 10% keep their token
    corrupted = input_ids.clone()
    corrupted[to_mask] = mask_id
    corrupted[to_random] = torch.randint(vocab_size, (int(to_random.sum()),), generator=g)
    return corrupted, labels


def batch_seed(seed: int, step: int, index: int) -> int:
    """A 63-bit seed for micro-batch `index` of step `step`, mixed from the three (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([seed, step, index]).generate_state(1, np.uint64)[0]) >> 1


@dataclass
class PretrainingData:
    """Sentence pairs for NSP, tokenized and masked on the fly."""

    documents: list[list[str]]  # sentences per document
    tokenizer: WordPiece
    max_len: int = 128
    mask_prob: float = 0.15
    seed: int = 0
    _rng: random.Random = field(init=False, repr=False)
    _gen: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.documents = [d for d in self.documents if len(d) >= 2]
        if len(self.documents) < 2:
            raise CamelidError("the corpus needs at least two documents of two or more sentences for NSP; "
                               "give more text")
        self._rng = random.Random(self.seed)
        self._gen = torch.Generator().manual_seed(self.seed)

    @classmethod
    def from_texts(cls, texts: Sequence[str], tokenizer: WordPiece, **kw) -> PretrainingData:
        return cls(sentence_documents(texts), tokenizer, **kw)

    def pair(self, rng: random.Random | None = None) -> tuple[str, str, int]:
        """(A, B, label): label 0 if B really follows A, 1 if B is a random sentence from another document."""
        rng = rng or self._rng
        d = rng.randrange(len(self.documents))
        doc = self.documents[d]
        i = rng.randrange(len(doc) - 1)
        return self.pair_at(d, i, rng)

    def pair_at(self, d: int, i: int, rng: random.Random) -> tuple[str, str, int]:
        """Sentence i of document d as A; B is its successor or (half the time, by `rng`) a random sentence."""
        doc = self.documents[d]
        if rng.random() < 0.5:
            return doc[i], doc[i + 1], 0
        other = rng.randrange(len(self.documents) - 1)
        other += other >= d  # any document but this one
        return doc[i], rng.choice(self.documents[other]), 1

    def encode(self, pairs: Sequence[tuple[str, str, int]], generator: torch.Generator | None = None
               ) -> dict[str, Tensor]:
        """Tokenize sentence pairs, pad them, and mask 15% of their tokens (80/10/10)."""
        tok = self.tokenizer
        enc = tok([a for a, _, _ in pairs], [b for _, b, _ in pairs], max_len=self.max_len)
        ids = enc["input_ids"]
        special = (ids == tok.cls_id) | (ids == tok.sep_id) | (ids == tok.pad_id)
        enc["input_ids"], enc["mlm_labels"] = mask_tokens(ids, special, tok.vocab_size, tok.mask_id,
                                                          self.mask_prob, generator or self._gen)
        enc["nsp_labels"] = torch.tensor([label for _, _, label in pairs])
        return enc

    def batch(self, batch_size: int) -> dict[str, Tensor]:
        """The next batch of random pairs (from this object's own random state)."""
        return self.encode([self.pair() for _ in range(batch_size)])

    def batch_at(self, seed: int, step: int, index: int, batch_size: int) -> dict[str, Tensor]:
        """Micro-batch `index` of optimizer step `step`, drawn from (seed, step, index) alone: a resumed run,
        or the same global batch split over more processes, sees the very same pairs and masks."""
        s = batch_seed(seed, step, index)
        rng = random.Random(s)
        pairs = [self.pair(rng) for _ in range(batch_size)]
        return self.encode(pairs, torch.Generator().manual_seed(s))

    def heldout_batches(self, seed: int, batch_size: int, max_pairs: int = 0) -> Iterator[dict[str, Tensor]]:
        """Every sentence of every document (but its last) as sentence A once, in order, with its true next
        sentence or (half the time) a random one; masks and choices fixed by `seed`. The first `max_pairs`
        pairs only, when given."""
        rng = random.Random(seed)
        pairs = [self.pair_at(d, i, rng) for d, doc in enumerate(self.documents) for i in range(len(doc) - 1)]
        if max_pairs:
            pairs = pairs[:max_pairs]
        gen = torch.Generator().manual_seed(seed)
        for k in range(0, len(pairs), batch_size):
            yield self.encode(pairs[k:k + batch_size], gen)


def sentence_documents(texts: Iterable[str]) -> list[list[str]]:
    """Texts -> documents (chapters) -> sentences."""
    return [split_sentences(d) for t in texts for d in split_documents(t)]


# ---------------------------------------------------------------------------------------------------
# scoring against the unigram baseline


def unigram_counts(documents: list[list[str]], tokenizer: WordPiece) -> Counter[int]:
    counts: Counter[int] = Counter()
    for doc in documents:
        for ids in tokenizer.tokenizer.encode_batch(doc, add_special_tokens=False):
            counts.update(ids.ids)
    return counts


@torch.no_grad()
def score(model: torch.nn.Module, batches: Iterable[dict[str, Tensor]], unigram: Counter[int], vocab_size: int,
          device: torch.device | str = "cpu") -> dict[str, float]:
    """MLM accuracy/loss at the chosen positions and NSP accuracy/loss, beside two unigram baselines on the same
    positions: always predicting the most frequent training token, and the unigram distribution's loss."""
    was_training = model.training
    model.eval()
    total = sum(unigram.values())
    most_frequent = unigram.most_common(1)[0][0]
    V = vocab_size
    # add-one smoothed unigram log-probabilities
    logp = torch.full((V,), math.log(1 / (total + V)))
    for t, c in unigram.items():
        logp[t] = math.log((c + 1) / (total + V))
    n = correct = base_correct = nsp_correct = nsp_n = 0
    loss_sum = base_loss_sum = nsp_loss_sum = 0.0
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        chosen = b["mlm_labels"] != IGNORE
        logits, nsp_logits = model(b["input_ids"], b["token_type_ids"], b["attention_mask"], masked=chosen)
        logits, nsp_logits = logits.float(), nsp_logits.float()
        target = b["mlm_labels"][chosen]
        n += target.numel()
        correct += int((logits.argmax(-1) == target).sum())
        base_correct += int((target == most_frequent).sum())
        loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
        base_loss_sum += float(-logp[target.cpu()].sum())
        nsp_correct += int((nsp_logits.argmax(-1) == b["nsp_labels"]).sum())
        nsp_loss_sum += float(F.cross_entropy(nsp_logits, b["nsp_labels"], reduction="sum"))
        nsp_n += len(b["nsp_labels"])
    model.train(was_training)
    if n == 0 or nsp_n == 0:
        raise CamelidError("no held-out sentence pairs to evaluate on; give the validation split more text")
    return {"mlm_accuracy": correct / n, "mlm_loss": loss_sum / n,
            "unigram_top1_accuracy": base_correct / n, "unigram_loss": base_loss_sum / n,
            "nsp_accuracy": nsp_correct / nsp_n, "nsp_loss": nsp_loss_sum / nsp_n, "masked_tokens": n}


# ---------------------------------------------------------------------------------------------------
# a prepared folder for `camelid pretrain --objective mlm+nsp`
#
#     train.json, val.json   {"documents": [[sentence, ...], ...]}: chapters split into sentences
#     tokenizer.json, vocab.txt   the WordPiece vocabulary (trained on the train split, or the one given)
#     meta.json              written last: objective, vocab size, counts, a fingerprint of the inputs

PAIRS_OBJECTIVE = "mlm+nsp"


def prepare_pairs(texts: Sequence[tuple[str, bool]], out: str | Path, vocab_size: int = 8000,
                  tokenizer: str | Path | None = None) -> dict[str, object]:
    """(text, is_validation) documents -> a folder of sentence-split documents plus a WordPiece vocabulary.

    `tokenizer`: an existing BERT vocabulary (a folder with tokenizer.json or vocab.txt, or either file);
    else one of `vocab_size` tokens is trained on the training texts. A re-run on the same inputs does nothing."""
    out = Path(out)
    h = hashlib.sha256(f"{PAIRS_OBJECTIVE} {vocab_size} {tokenizer}".encode())
    if tokenizer is not None:  # a vocabulary changed in place is a new input
        for f in [Path(tokenizer)] if Path(tokenizer).is_file() else sorted(Path(tokenizer).glob("*")):
            if f.is_file():
                h.update(f.read_bytes())
    for text, val in texts:
        h.update(b"V" if val else b"T")
        h.update(hashlib.sha256(text.encode("utf-8")).digest())
    fingerprint = h.hexdigest()
    meta_path = out / "meta.json"
    old = read_json_or_none(meta_path) or {}
    if old.get("fingerprint") == fingerprint:
        return old
    splits = {name: sentence_documents(t for t, val in texts if val == is_val)
              for name, is_val in (("train", False), ("val", True))}
    for name in splits:
        splits[name] = [d for d in splits[name] if len(d) >= 2]
        if len(splits[name]) < 2:
            raise CamelidError(f"the {name} split has {len(splits[name])} document(s) of two or more sentences; NSP "
                               "needs at least two (hold out a longer file, or give more text)")
    if tokenizer is None:
        tok = WordPiece.train([t for t, val in texts if not val], vocab_size=vocab_size)
    else:
        path = Path(tokenizer)
        if path.is_dir():
            tok = WordPiece.from_dir(path)
        elif path.suffix == ".json":
            tok = WordPiece.from_file(path)
        else:
            tok = WordPiece.from_vocab(path)
    out.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)  # the folder is unfinished until meta.json reappears
    for name, docs in splits.items():
        atomic_write(out / f"{name}.json", lambda p, docs=docs: p.write_text(json.dumps({"documents": docs})))
    tok.save(out)
    meta: dict[str, object] = {"objective": PAIRS_OBJECTIVE, "vocab_size": tok.vocab_size,
                               **{f"{s}_docs": len(d) for s, d in splits.items()},
                               **{f"{s}_sentences": sum(map(len, d)) for s, d in splits.items()},
                               "fingerprint": fingerprint}
    atomic_write(meta_path, lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
    return meta


def load_pairs(data_dir: str | Path, max_len: int, seed: int = 0) -> tuple[PretrainingData, PretrainingData]:
    """(train, val) sentence-pair data of a folder written by `prepare_pairs`."""
    d = Path(data_dir)
    try:
        meta = json.loads((d / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise CamelidError(f"{d}: not a prepared data folder (no readable meta.json); run `camelid prepare "
                           "--objective mlm+nsp` (if it was interrupted, run it again)") from None
    if meta.get("objective") != PAIRS_OBJECTIVE:
        raise CamelidError(f"{d}: prepared for objective {meta.get('objective', 'clm')}, not {PAIRS_OBJECTIVE}; "
                           f"run `camelid prepare --objective {PAIRS_OBJECTIVE}` into another folder")
    tok = WordPiece.from_dir(d)
    splits = []
    for name in ("train", "val"):
        try:
            docs = json.loads((d / f"{name}.json").read_text())["documents"]
        except (OSError, json.JSONDecodeError, KeyError):
            raise CamelidError(f"{d}/{name}.json: corrupt or missing; run `camelid prepare` again") from None
        splits.append(PretrainingData(docs, tok, max_len=max_len, seed=seed))
    return splits[0], splits[1]
