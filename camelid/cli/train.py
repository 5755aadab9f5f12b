"""`camelid tokenizer train`, `camelid prepare` and `camelid pretrain`: training a LLaMA from nothing."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from camelid.cli.app import app
from camelid.errors import CamelidError


def _tokenizer_group() -> typer.Typer:
    """The `tokenizer` command group, shared with any other module that registered it first."""
    for group in app.registered_groups:
        if group.name == "tokenizer" and group.typer_instance is not None:
            return group.typer_instance
    group = typer.Typer(help="Tokenizers: train one on your text.", no_args_is_help=True)
    app.add_typer(group, name="tokenizer")
    return group


tokenizer_app = _tokenizer_group()


@tokenizer_app.command("train")
def tokenizer_train(
    files: list[Path] = typer.Argument(..., help="Text files or directories (their .txt/.md files)."),
    vocab_size: int = typer.Option(8192, "--vocab-size", "-v", help="Vocabulary size, special tokens included."),
    out: Path = typer.Option(Path("tokenizer"), "--out", "-o", help="Folder for tokenizer.json."),
    special: list[str] = typer.Option(None, "--special", help="Special tokens (repeat); the first one ends "
                                      "documents. Default: <|endoftext|> <|im_start|> <|im_end|> (ChatML)."),
    min_frequency: int = typer.Option(2, help="Merge only pairs seen at least this often."),
) -> None:
    """Train a byte-level BPE tokenizer (Hugging Face tokenizers) and save it as tokenizer.json."""
    from camelid.tokenizer import Tokenizer
    from camelid.tokenizer.train import train_tokenizer

    path = train_tokenizer(files, vocab_size, out, special_tokens=special or None, min_frequency=min_frequency)
    typer.echo(f"wrote {path} ({Tokenizer.from_file(path).vocab_size} tokens)")


@app.command()
def prepare(
    sources: list[str] = typer.Argument(None, help="Text files, directories or .jsonl files."),
    tokenizer: Path = typer.Option(None, "--tokenizer", "-t", help="tokenizer.json (or its folder); for mlm+nsp "
                                   "optional: a BERT vocabulary (vocab.txt, tokenizer.json or a model folder)."),
    out: Path = typer.Option(Path("data"), "--out", "-o", help="Folder for train.bin, val.bin and meta.json."),
    field: str = typer.Option("text", help="The text field of jsonl records or dataset rows."),
    val_files: list[str] = typer.Option(None, "--val-files", help="Hold these files out for validation "
                                        "(names or globs; repeat)."),
    val_fraction: float = typer.Option(0.0, help="Else hold out this fraction of documents (at random)."),
    hf_dataset: str = typer.Option(None, "--hf-dataset", help="A Hugging Face dataset (Hub name, or json/text/"
                                   "parquet with the sources as its data files), read through `datasets`."),
    hf_split: str = typer.Option("train", "--hf-split", help="The dataset split to read."),
    workers: int = typer.Option(0, help="Encoding processes (0: one per core)."),
    seed: int = typer.Option(0, help="Seed of the random validation split."),
    objective: str = typer.Option("clm", "--objective", help="clm: token shards for a LLaMA; mlm+nsp: "
                                  "sentence-split documents and a WordPiece vocabulary for BERT pre-training."),
    vocab_size: int = typer.Option(8000, "--vocab-size", help="mlm+nsp without --tokenizer: the WordPiece "
                                   "vocabulary to train on the training files."),
) -> None:
    """Turn text into token shards (numpy memmaps) with a held-out validation split (or, with --objective
    mlm+nsp, into sentence-split documents and a WordPiece vocabulary for BERT)."""
    from camelid.train.config import OBJECTIVES
    from camelid.train.data import hf_documents, prepare, read_documents

    if objective not in OBJECTIVES:
        raise CamelidError(f"--objective {objective}: choose one of {', '.join(OBJECTIVES)}")
    if tokenizer is None and objective == "clm":
        raise CamelidError("--tokenizer is required: a tokenizer.json (train one with `camelid tokenizer train`)")

    if hf_dataset:
        docs = hf_documents(hf_dataset, hf_split, field, data_files=list(sources) or None,
                            val_fraction=val_fraction, seed=seed)
    elif not sources:
        raise CamelidError("no input given; pass text files, directories or .jsonl files (or --hf-dataset)")
    else:
        docs = read_documents(sources, field=field, val_files=val_files, val_fraction=val_fraction, seed=seed)
    if objective == "mlm+nsp":
        from camelid.bert.data import prepare_pairs

        meta = prepare_pairs([(d.text, d.val) for d in docs], out, vocab_size=vocab_size, tokenizer=tokenizer)
        typer.echo(f"{out}: train {meta['train_sentences']:,} sentences ({meta['train_docs']} documents), "
                   f"val {meta['val_sentences']:,} sentences ({meta['val_docs']} documents), "
                   f"WordPiece vocabulary of {meta['vocab_size']}")
        return
    meta = prepare(docs, tokenizer, out, workers=workers or None)
    typer.echo(f"{out}: train {meta['train_tokens']:,} tokens ({meta['train_docs']} documents), "
               f"val {meta['val_tokens']:,} tokens ({meta['val_docs']} documents), {meta['dtype']}")


@app.command()
def pretrain(
    config: Path = typer.Argument(None, help="A YAML or TOML file of training settings."),
    set_: list[str] = typer.Option(None, "--set", "-s", help="Override a setting: key=value (repeat); "
                                   "model fields as model.dim=256."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in the out folder."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
    objective: str = typer.Option(None, "--objective", help="clm (a LLaMA, next-token prediction; the default) "
                                  "or mlm+nsp (a BERT: masked-LM + next-sentence prediction); = --set objective=..."),
) -> None:
    """Pretrain a LLaMA (or, with --objective mlm+nsp, a BERT) from scratch; under torchrun, on many processes
    (DDP, or FSDP2 with distributed=fsdp)."""
    from camelid.train import load_config, train
    from camelid.train.objectives import describe

    overrides = [*(set_ or []), *([f"objective={objective}"] if objective is not None else [])]
    cfg = load_config(config, overrides)
    result = train(cfg, resume=resume, progress=progress)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, one report is enough
        return
    typer.echo(f"done: {result.steps} steps, train loss {result.final_loss:.4f}, "
               f"{describe(cfg, result.val_metrics)}; logs, plot and checkpoints in {result.out}")
