"""`camelid bert pretrain`: plain-text files in, a pre-trained BERT out, in one call, through the training loop.

The glue between text files and camelid/train: the texts become sentence-split documents and a WordPiece
vocabulary trained on the training files (`camelid.bert.data.prepare_pairs`, into OUT/training/data); the loop
trains a BertForPreTraining on them with the mlm+nsp objective (progress, OUT/training/log.csv, checkpoints and
exact --resume); OUT becomes a Hugging Face BertForPreTraining folder with the vocabulary, metrics.json and
loss.png. `camelid pretrain --objective mlm+nsp` runs the same loop from a config file.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from camelid.bert.data import load_pairs, prepare_pairs, score, unigram_counts
from camelid.fileio import atomic_write, atomic_write_text
from camelid.interop.bert_hf import load_bert_hf_dir
from camelid.train.config import TrainConfig
from camelid.train.loop import train


@dataclass
class PretrainArgs:
    config: str = "bert-mini"  # a BertConfig name; vocab_size and max_seq_len are set from the data
    vocab_size: int = 8000
    max_len: int = 128
    batch_size: int = 32
    steps: int = 1000
    lr: float = 5e-4  # linear warmup over `warmup` steps, then linear decay to 0 at the last step
    warmup: int = 100
    weight_decay: float = 0.01
    eval_batches: int = 20  # held-out batches per periodic evaluation; the last evaluation scores them all
    eval_interval: int = 100  # 0: evaluate only at the end
    checkpoint_interval: int = 100  # 0: no checkpoints (and no --resume)
    seed: int = 0
    time_budget_s: float | None = None  # stop (with the learning rate decayed to zero) after this much training
    threads: int = 0  # 0: torch's default


def pretrain_config(args: PretrainArgs, out: Path) -> TrainConfig:
    """The loop's settings for `args`: AdamW (0.9, 0.999), clipping at 1, as in BERT's recipe."""
    run = out / "training"
    return TrainConfig(
        objective="mlm+nsp", data=str(run / "data"), out=str(run), model=args.config, batch_size=args.batch_size,
        block_size=args.max_len, max_steps=args.steps, lr=args.lr, min_lr=0.0,
        warmup_steps=min(args.warmup, args.steps), lr_schedule="linear", weight_decay=args.weight_decay,
        beta1=0.9, beta2=0.999, grad_clip=1.0, eval_interval=args.eval_interval or args.steps,
        eval_tokens=args.eval_batches * args.batch_size * args.max_len, sample_interval=0,
        checkpoint_interval=args.checkpoint_interval, export_dir=str(out), seed=args.seed,
        time_budget_s=args.time_budget_s or 0.0, threads=args.threads)


def pretrain_bert(train_texts: Sequence[str], heldout_texts: Sequence[str], out: str | Path,
                  args: PretrainArgs | None = None, quiet: bool = False, resume: bool = False) -> dict[str, object]:
    """Train a WordPiece vocabulary and a BertForPreTraining on `train_texts`; evaluate on `heldout_texts`.

    Writes to `out`: a Hugging Face BertForPreTraining directory (config.json, model.safetensors, vocab.txt,
    tokenizer.json), metrics.json and loss.png; the run itself (prepared data, log, checkpoints) in out/training.
    `resume`: continue from out/training's latest checkpoint. Returns the metrics."""
    args = args or PretrainArgs()
    out = Path(out)
    cfg = pretrain_config(args, out)
    prepare_pairs([(t, False) for t in train_texts] + [(t, True) for t in heldout_texts], cfg.data,
                  vocab_size=args.vocab_size)
    result = train(cfg, resume=resume, progress=not quiet)
    v = result.val_metrics  # the last evaluation: every held-out pair
    heldout = {"mlm_accuracy": v["val_mlm_acc"], "mlm_loss": v["val_mlm_loss"],
               "unigram_top1_accuracy": v["val_unigram_acc"], "unigram_loss": v["val_unigram_loss"],
               "nsp_accuracy": v["val_nsp_acc"], "nsp_loss": v["val_nsp_loss"],
               "masked_tokens": int(v["val_masked_tokens"])}
    # the same scores on the first eval_batches batches of training pairs: how far held-out falls behind
    config, model, _ = load_bert_hf_dir(out, task="pretraining")
    train_data, _ = load_pairs(cfg.data, args.max_len, args.seed)
    pairs = train_data.heldout_batches(args.seed, args.batch_size, args.eval_batches * args.batch_size)
    train_sample = score(model, pairs, unigram_counts(train_data.documents, train_data.tokenizer),
                         train_data.tokenizer.vocab_size)
    metrics: dict[str, object] = {
        "heldout": heldout,
        "train_sample": train_sample,
        "train_seconds": round(result.seconds, 1),
        "steps_done": result.steps,
        "params": sum(p.numel() for p in model.parameters()),
        "args": asdict(args),
        "config": {**config.to_dict(), "name": args.config},
    }
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    atomic_write(out / "loss.png", lambda p: shutil.copyfile(Path(cfg.out) / "loss.png", p))
    return metrics
