"""`camelid bert ...`: BERT-only commands (pre-training with MLM + NSP)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from camelid.cli.app import app
from camelid.errors import CamelidError

bert_app = typer.Typer(help="BERT: pre-training with masked-LM + next-sentence prediction.", no_args_is_help=True)
app.add_typer(bert_app, name="bert")


def read_corpus(data: list[Path], holdout: list[str]) -> tuple[list[str], list[str]]:
    """Text files (or folders of *.txt) -> (training texts, held-out texts); `holdout` names files to keep out."""
    files: list[Path] = []
    for p in data:
        if p.is_dir():
            files += sorted(p.glob("*.txt"))
        elif p.is_file():
            files.append(p)
        else:
            raise CamelidError(f"{p}: no such file or folder; pass text files or folders of .txt files")
    if not files:
        raise CamelidError(f"no .txt files in {', '.join(map(str, data))}; pass a corpus of plain-text files")
    names = {f.name for f in files} | {f.stem for f in files}
    for h in holdout:
        if h not in names:
            raise CamelidError(f"--holdout {h}: not one of the corpus files ({', '.join(f.name for f in files)})")
    held = [f for f in files if f.name in holdout or f.stem in holdout]
    train = [f for f in files if f not in held]
    if not train or not held:
        raise CamelidError("need at least one training file and one held-out file; use --holdout FILE")
    return [f.read_text(encoding="utf-8") for f in train], [f.read_text(encoding="utf-8") for f in held]


@bert_app.command("pretrain")
def pretrain(
    data: list[Path] = typer.Argument(..., help="Plain-text files, or folders of .txt files."),
    holdout: list[str] = typer.Option(..., "--holdout", help="File(s) kept out of training, for evaluation."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (a Hugging Face BertForPreTraining); the "
                             "run's data, log and checkpoints go to OUT/training."),
    objective: str = typer.Option("mlm+nsp", help="Pre-training objective: mlm+nsp (the only one for BERT)."),
    config: str = typer.Option("bert-mini", help="BERT config name (vocab and context come from the data)."),
    vocab_size: int = typer.Option(8000, help="WordPiece vocabulary size to train."),
    max_len: int = typer.Option(128, help="Tokens per sentence pair."),
    batch_size: int = typer.Option(32),
    steps: int = typer.Option(1000),
    lr: float = typer.Option(5e-4, help="Peak learning rate: linear warmup, then linear decay to 0."),
    warmup: int = typer.Option(100),
    eval_batches: int = typer.Option(20, help="Held-out batches per periodic evaluation (the last one scores "
                                     "every held-out sentence pair)."),
    eval_interval: int = typer.Option(100, help="Evaluate every this many steps (0: only at the end)."),
    checkpoint_interval: int = typer.Option(100, help="Checkpoint every this many steps (0: never)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in OUT/training."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
    seed: int = typer.Option(0),
    time_budget: float = typer.Option(0, help="Stop after this many seconds of training, with the learning rate "
                                      "decayed to zero (0: run all steps)."),
) -> None:
    """Pre-train a BERT from scratch (WordPiece + MLM + NSP); report held-out MLM accuracy vs a unigram baseline."""
    from camelid.bert.pretrain import PretrainArgs, pretrain_bert

    if objective != "mlm+nsp":
        raise CamelidError(f"--objective {objective}: BERT pre-training supports mlm+nsp")
    train_texts, held_texts = read_corpus(data, holdout)
    args = PretrainArgs(config=config, vocab_size=vocab_size, max_len=max_len, batch_size=batch_size, steps=steps,
                        lr=lr, warmup=warmup, eval_batches=eval_batches, eval_interval=eval_interval,
                        checkpoint_interval=checkpoint_interval, seed=seed, time_budget_s=time_budget or None)
    metrics = pretrain_bert(train_texts, held_texts, out, args, quiet=not progress, resume=resume)
    h = metrics["heldout"]
    print(json.dumps(metrics["heldout"], indent=2))
    print(f"held-out MLM accuracy {h['mlm_accuracy']:.3f} (unigram baseline {h['unigram_top1_accuracy']:.3f}), "
          f"MLM loss {h['mlm_loss']:.3f} (unigram {h['unigram_loss']:.3f}), NSP accuracy {h['nsp_accuracy']:.3f}; "
          f"saved to {out}")
