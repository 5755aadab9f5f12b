"""BERT pre-training: masked-LM + next-sentence prediction from the sentences of a plain-text corpus.

Data (Devlin et al. 2019, section 3.1 and appendix A.1):
- NSP: sentence A, then with probability 0.5 the sentence that really follows it (label 0, IsNext) and
  otherwise a random sentence from another document (label 1, NotNext, HF's convention).
- MLM: 15% of the non-special tokens are chosen; of those 80% become [MASK], 10% a random token and 10%
  stay as they are; the loss is read only at the chosen positions.
The loss is the sum of the two cross-entropies (what `transformers.BertForPreTraining` computes).

Two ways to train: `camelid pretrain --objective mlm+nsp` runs BERT through the full training loop
(camelid/train: checkpoints with exact resume, validation, logs, DDP), reading a folder written by
`prepare_pairs` (`camelid prepare --objective mlm+nsp`) and drawing its batches with
`PretrainingData.batch_at`; `pretrain_bert` (`camelid bert pretrain`) is a small self-contained loop (AdamW,
linear warmup and decay, a time budget) that goes from text files to a model in one call.
"""

from __future__ import annotations

import json
import math
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from camelid.bert.model import BertConfig, BertForPreTraining
from camelid.errors import CamelidError
from camelid.fileio import atomic_write, read_json_or_none
from camelid.tokenizer.wordpiece import WordPiece

IGNORE = -100  # label of positions that carry no MLM loss (as in PyTorch's cross_entropy default)

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


def pretraining_loss(mlm_logits: Tensor, nsp_logits: Tensor, mlm_labels: Tensor, nsp_labels: Tensor) -> Tensor:
    """Mean MLM cross-entropy over chosen positions + mean NSP cross-entropy."""
    mlm = F.cross_entropy(mlm_logits.reshape(-1, mlm_logits.shape[-1]).float(), mlm_labels.reshape(-1),
                          ignore_index=IGNORE)
    return mlm + F.cross_entropy(nsp_logits.float(), nsp_labels)


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
        docs = [split_sentences(d) for t in texts for d in split_documents(t)]
        return cls(docs, tokenizer, **kw)

    def pair(self, rng: random.Random | None = None) -> tuple[str, str, int]:
        """(A, B, label): label 0 if B really follows A, 1 if B is a random sentence from another document."""
        rng = rng or self._rng
        d = rng.randrange(len(self.documents))
        doc = self.documents[d]
        i = rng.randrange(len(doc) - 1)
        return self._pair_at(d, i, rng)

    def _pair_at(self, d: int, i: int, rng: random.Random) -> tuple[str, str, int]:
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
        pairs = [self._pair_at(d, i, rng) for d, doc in enumerate(self.documents) for i in range(len(doc) - 1)]
        if max_pairs:
            pairs = pairs[:max_pairs]
        gen = torch.Generator().manual_seed(seed)
        for k in range(0, len(pairs), batch_size):
            yield self.encode(pairs[k:k + batch_size], gen)


def unigram_counts(documents: list[list[str]], tokenizer: WordPiece) -> Counter[int]:
    counts: Counter[int] = Counter()
    for doc in documents:
        for ids in tokenizer.tokenizer.encode_batch(doc, add_special_tokens=False):
            counts.update(ids.ids)
    return counts


def evaluate(model: BertForPreTraining, data: PretrainingData, n_batches: int, batch_size: int,
             unigram: Counter[int]) -> dict[str, float]:
    """MLM accuracy/loss at the chosen positions and NSP accuracy on `n_batches` random batches of `data`."""
    return score(model, (data.batch(batch_size) for _ in range(n_batches)), unigram, data.tokenizer.vocab_size)


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


@dataclass
class PretrainArgs:
    config: str = "bert-mini"  # a BertConfig name; vocab_size and max_seq_len are set from the data
    vocab_size: int = 8000
    max_len: int = 128
    batch_size: int = 32
    steps: int = 1000
    lr: float = 5e-4
    warmup: int = 100
    weight_decay: float = 0.01
    eval_batches: int = 20
    seed: int = 0
    time_budget_s: float | None = None  # stop (with the learning rate decayed to zero) after this much training


def pretrain_bert(train_texts: Sequence[str], heldout_texts: Sequence[str], out: str | Path,
                  args: PretrainArgs | None = None, quiet: bool = False) -> dict[str, object]:
    """Train a WordPiece vocabulary and a BertForPreTraining on `train_texts`; evaluate on `heldout_texts`.

    Writes to `out`: a Hugging Face BertForPreTraining directory (config.json, model.safetensors, vocab.txt,
    tokenizer.json), metrics.json and loss.png. Returns the metrics.
    """
    from camelid.interop.bert_hf import save_bert_hf_dir

    args = args or PretrainArgs()
    out = Path(out)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    tok = WordPiece.train(train_texts, vocab_size=args.vocab_size, max_len=args.max_len)
    train = PretrainingData.from_texts(train_texts, tok, max_len=args.max_len, seed=args.seed)
    heldout = PretrainingData.from_texts(heldout_texts, tok, max_len=args.max_len, seed=args.seed + 1)
    config = BertConfig.from_name(args.config, vocab_size=tok.vocab_size, max_seq_len=args.max_len,
                                  pad_token_id=tok.pad_id)
    model = BertForPreTraining(config)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]  # biases and LayerNorms
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.999))
    losses: list[float] = []
    model.train()
    bar = tqdm(range(args.steps), desc="bert pretrain", file=sys.stderr, disable=quiet)
    t_train = time.perf_counter()
    for step in bar:
        # linear warmup, then linear decay to zero at the last step or at the time budget, whichever comes first
        progress = step / args.steps
        if args.time_budget_s:
            progress = max(progress, (time.perf_counter() - t_train) / args.time_budget_s)
        if progress >= 1:
            break
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup) * (1 - progress)
        b = train.batch(args.batch_size)
        chosen = b["mlm_labels"] != IGNORE
        mlm_logits, nsp_logits = model(b["input_ids"], b["token_type_ids"], b["attention_mask"], masked=chosen)
        loss = pretraining_loss(mlm_logits, nsp_logits, b["mlm_labels"][chosen], b["nsp_labels"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    train_seconds = time.perf_counter() - t0
    unigram = unigram_counts(train.documents, tok)
    metrics: dict[str, object] = {
        "heldout": evaluate(model, heldout, args.eval_batches, args.batch_size, unigram),
        "train_sample": evaluate(model, train, args.eval_batches, args.batch_size, unigram),
        "train_seconds": round(train_seconds, 1),
        "steps_done": len(losses),
        "params": sum(p.numel() for p in model.parameters()),
        "args": asdict(args),
        "config": config.to_dict(),
    }
    save_bert_hf_dir(model, out)
    tok.save(out)
    atomic_write(out / "metrics.json", lambda p: p.write_text(json.dumps(metrics, indent=2) + "\n"))
    _plot_losses(losses, out / "loss.png")
    return metrics


def _plot_losses(losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = max(1, len(losses) // 100)
    smooth = [sum(losses[i:i + k]) / len(losses[i:i + k]) for i in range(0, len(losses), k)]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([i * k for i in range(len(smooth))], smooth)
    ax.set_xlabel("step")
    ax.set_ylabel("MLM + NSP loss")
    ax.set_title("BERT pre-training")
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)


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
    import hashlib

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
    splits = {name: [split_sentences(d) for t, val in texts if val == is_val for d in split_documents(t)]
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
