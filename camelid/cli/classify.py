"""`camelid classify train|eval|predict`: a classification head on BERT or LLaMA, from a jsonl of {text, label}."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from camelid.cli.app import app
from camelid.errors import CamelidError
from camelid.fileio import iter_jsonl

classify_app = typer.Typer(help="Text classification with BERT ([CLS] + head) or LLaMA (last token + head).",
                           no_args_is_help=True)
app.add_typer(classify_app, name="classify")


@classify_app.command("train")
def train(
    data: Path = typer.Option(..., "--data", help="jsonl of {\"text\", \"label\"[, \"split\"]} lines."),
    model: str = typer.Option("all-minilm-l6-v2", "--model", "-m",
                              help="Backbone: a model name, a Hugging Face folder (BERT or LLaMA) or a .gguf."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write the trained classifier to."),
    mode: str = typer.Option("finetune", help="finetune (all weights), probe (frozen backbone, linear head) or "
                                              "lora (LLaMA: LoRA adapters and the head; saved merged)."),
    epochs: int = typer.Option(3),
    lr: float = typer.Option(0.0, help="Learning rate (0: 5e-5 BERT / 2e-5 LLaMA finetune, 5e-4 lora, "
                                            "1e-2 probe)."),
    batch_size: int = typer.Option(16),
    max_len: int = typer.Option(0, help="Tokens per text (0: 128 for BERT, 256 for LLaMA)."),
    limit: int = typer.Option(0, help="Use only the first N training examples (0: all)."),
    seed: int = typer.Option(0),
) -> None:
    """Train a classifier (through the training loop: progress, OUT/training/log.csv and loss.png, scored on the
    file's dev split if it has one); then report accuracy and macro-F1 on the test split."""
    import torch

    from camelid.classify import (
        add_to_classifier_json,
        dev_split,
        evaluate_classifier,
        label_set,
        new_classifier,
        read_jsonl,
        train_test_split,
    )
    from camelid.train.classify import TrainArgs, train_classifier

    torch.manual_seed(seed)
    examples = read_jsonl(data)
    train_set, test_set = train_test_split(examples, seed=seed)
    if limit:
        train_set = train_set[:limit]
    labels = label_set(examples)
    clf = new_classifier(model, labels, max_len or None)
    stats = train_classifier(clf, train_set, TrainArgs(mode=mode, epochs=epochs, lr=lr or None, batch_size=batch_size,
                                                       seed=seed), dev=dev_split(examples), out=out / "training",
                             export_dir=out, backbone_source=model)
    result = evaluate_classifier(clf, test_set)
    result.pop("predictions")
    add_to_classifier_json(out, train=stats, test=result)
    print(json.dumps({"train": stats, "test": result}, indent=2))
    print(f"test accuracy {result['accuracy']:.3f}, macro-F1 {result['macro_f1']:.3f} on {result['n']} examples; "
          f"saved to {out}")


@classify_app.command("eval")
def evaluate(
    model: Path = typer.Option(..., "--model", "-m", help="A folder written by `camelid classify train`."),
    data: Path = typer.Option(..., "--data", help="jsonl of {\"text\", \"label\"} lines."),
    split: str = typer.Option("test", help="Which split to score: test, train, dev or all."),
) -> None:
    """Accuracy, macro-F1, latency and throughput of a trained classifier on a jsonl file."""
    from camelid.classify import evaluate_classifier, load_classifier, read_jsonl, train_test_split

    examples = read_jsonl(data)
    if split == "test":
        examples = train_test_split(examples)[1]
    elif split == "train":
        examples = train_test_split(examples)[0]
    elif split != "all":
        examples = [e for e in examples if e.split == split]
        if not examples:
            raise CamelidError(f"--split {split}: no examples with that split in {data}")
    clf = load_classifier(model)
    result = evaluate_classifier(clf, examples)
    result.pop("predictions")
    print(json.dumps(result, indent=2))


@classify_app.command("predict")
def predict(
    texts: list[str] = typer.Argument(None, help="Texts to classify (or give --data, or pipe lines on stdin)."),
    model: Path = typer.Option(..., "--model", "-m", help="A folder written by `camelid classify train`."),
    data: Path = typer.Option(None, "--data", help="jsonl with a \"text\" field per line."),
) -> None:
    """Print one JSON line {"text", "label"} per input text."""
    from camelid.classify import load_classifier, read_jsonl

    if data is not None:
        items = [e.text for e in read_jsonl(data)] if _has_labels(data) else _texts_only(data)
    elif texts:
        items = list(texts)
    else:
        items = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not items:
        raise CamelidError("no texts to classify; pass texts as arguments, --data FILE or lines on stdin")
    clf = load_classifier(model)
    for text, label in zip(items, clf.predict(items), strict=True):
        print(json.dumps({"text": text, "label": clf.labels[label]}, ensure_ascii=False))


def _has_labels(path: Path) -> bool:
    first = next((line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()), "{}")
    try:
        return "label" in json.loads(first)
    except json.JSONDecodeError:
        return False


def _texts_only(path: Path) -> list[str]:
    fix = "each line must be a JSON object with a \"text\" field"
    out = []
    for n, d in iter_jsonl(path, fix):
        if not isinstance(d, dict) or "text" not in d:
            raise CamelidError(f"{path}:{n}: {fix}")
        out.append(str(d["text"]))
    return out
