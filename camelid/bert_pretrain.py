"""BERT pre-training: masked-LM + next-sentence prediction from the sentences of a plain-text corpus.

Data (Devlin et al. 2019, section 3.1 and appendix A.1):
- NSP: sentence A, then with probability 0.5 the sentence that really follows it (label 0, IsNext) and
  otherwise a random sentence from another document (label 1, NotNext, HF's convention).
- MLM: 15% of the non-special tokens are chosen; of those 80% become [MASK], 10% a random token and 10%
  stay as they are; the loss is read only at the chosen positions.
The loss is the sum of the two cross-entropies (what `transformers.BertForPreTraining` computes).

`pretrain_bert` is a small self-contained training loop (AdamW, linear warmup and decay) kept here so that
BERT does not depend on the LLaMA training loop; `camelid pretrain --objective mlm+nsp` can call
`PretrainingData.batch` for its batches and `pretraining_loss` for its loss.
"""

from __future__ import annotations

import json
import math
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from camelid.bert import BertConfig, BertForPreTraining
from camelid.errors import CamelidError
from camelid.wordpiece import WordPiece

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

    def pair(self) -> tuple[str, str, int]:
        """(A, B, label): label 0 if B really follows A, 1 if B is a random sentence from another document."""
        rng = self._rng
        d = rng.randrange(len(self.documents))
        doc = self.documents[d]
        i = rng.randrange(len(doc) - 1)
        if rng.random() < 0.5:
            return doc[i], doc[i + 1], 0
        other = rng.randrange(len(self.documents) - 1)
        other += other >= d  # any document but this one
        return doc[i], rng.choice(self.documents[other]), 1

    def batch(self, batch_size: int) -> dict[str, Tensor]:
        pairs = [self.pair() for _ in range(batch_size)]
        tok = self.tokenizer
        enc = tok([a for a, _, _ in pairs], [b for _, b, _ in pairs], max_len=self.max_len)
        ids = enc["input_ids"]
        special = (ids == tok.cls_id) | (ids == tok.sep_id) | (ids == tok.pad_id)
        enc["input_ids"], enc["mlm_labels"] = mask_tokens(ids, special, tok.vocab_size, tok.mask_id,
                                                          self.mask_prob, self._gen)
        enc["nsp_labels"] = torch.tensor([label for _, _, label in pairs])
        return enc


def unigram_counts(documents: list[list[str]], tokenizer: WordPiece) -> Counter[int]:
    counts: Counter[int] = Counter()
    for doc in documents:
        for ids in tokenizer.tokenizer.encode_batch(doc, add_special_tokens=False):
            counts.update(ids.ids)
    return counts


@torch.no_grad()
def evaluate(model: BertForPreTraining, data: PretrainingData, n_batches: int, batch_size: int,
             unigram: Counter[int]) -> dict[str, float]:
    """MLM accuracy/loss at the chosen positions and NSP accuracy, beside two unigram baselines on the same
    positions: always predicting the most frequent training token, and the unigram distribution's loss."""
    model.eval()
    total = sum(unigram.values())
    most_frequent = unigram.most_common(1)[0][0]
    V = data.tokenizer.vocab_size
    # add-one smoothed unigram log-probabilities
    logp = torch.full((V,), math.log(1 / (total + V)))
    for t, c in unigram.items():
        logp[t] = math.log((c + 1) / (total + V))
    n = correct = base_correct = nsp_correct = nsp_n = 0
    loss_sum = base_loss_sum = 0.0
    for _ in range(n_batches):
        b = data.batch(batch_size)
        mlm_logits, nsp_logits = model(b["input_ids"], b["token_type_ids"], b["attention_mask"])
        chosen = b["mlm_labels"] != IGNORE
        target = b["mlm_labels"][chosen]
        logits = mlm_logits[chosen]
        n += target.numel()
        correct += int((logits.argmax(-1) == target).sum())
        base_correct += int((target == most_frequent).sum())
        loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
        base_loss_sum += float(-logp[target].sum())
        nsp_correct += int((nsp_logits.argmax(-1) == b["nsp_labels"]).sum())
        nsp_n += len(b["nsp_labels"])
    return {"mlm_accuracy": correct / n, "mlm_loss": loss_sum / n,
            "unigram_top1_accuracy": base_correct / n, "unigram_loss": base_loss_sum / n,
            "nsp_accuracy": nsp_correct / nsp_n, "masked_tokens": n}


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
    from camelid.fileio import atomic_write
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
        hidden, pooled = model.bert(b["input_ids"], b["token_type_ids"], b["attention_mask"])
        chosen = b["mlm_labels"] != IGNORE
        # the vocabulary projection only where there is a loss to read: ~15% of the positions
        mlm_logits = model.mlm(hidden[chosen])
        loss = pretraining_loss(mlm_logits, model.nsp(pooled), b["mlm_labels"][chosen], b["nsp_labels"])
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

    from camelid.fileio import atomic_write

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
