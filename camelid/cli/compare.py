"""`camelid compare --data FILE.jsonl`: fine-tuned BERT vs a decoder LLM (prompted, probed, fine-tuned), measured."""

from __future__ import annotations

from pathlib import Path

import typer

from camelid.cli.app import app


@app.command()
def compare(
    data: Path = typer.Option(..., "--data", help="jsonl of {\"text\", \"label\"[, \"split\"]} lines."),
    out: Path = typer.Option(Path("compare-out"), "--out", "-o", help="Folder for compare.md/.json/.png."),
    bert: str = typer.Option("all-minilm-l6-v2", help="BERT backbone (name or Hugging Face folder)."),
    llm: str = typer.Option("smollm2-135m-instruct", help="Decoder LLM (name, Hugging Face folder or .gguf)."),
    arms: str = typer.Option(",".join(["bert-finetune", "llm-zeroshot", "llm-kshot", "llm-probe", "llm-finetune"]),
                             help="Comma-separated arms to run."),
    k_shot: int = typer.Option(4, help="Examples in the prompt for llm-kshot."),
    max_train: int = typer.Option(0, help="Cap on training examples (0: all)."),
    max_test: int = typer.Option(200, help="Cap on test examples (0: all)."),
    epochs: int = typer.Option(3),
    bert_lr: float = typer.Option(5e-5, help="Learning rate of the BERT fine-tuning arm."),
    llm_lr: float = typer.Option(2e-5, help="Learning rate of the LLM fine-tuning arm."),
    probe_lr: float = typer.Option(1e-2, help="Learning rate of the linear-probe head."),
    batch_size: int = typer.Option(16),
    max_len: int = typer.Option(256, help="Tokens per text for the classifiers."),
    seed: int = typer.Option(0),
) -> None:
    """Accuracy, macro-F1, training time, latency, throughput, peak memory and parameters, per arm."""
    from camelid.compare import CompareArgs, markdown_table, run_compare

    args = CompareArgs(data=str(data), bert=bert, llm=llm, arms=[a.strip() for a in arms.split(",") if a.strip()],
                       k_shot=k_shot, max_train=max_train, max_test=max_test, epochs=epochs, bert_lr=bert_lr,
                       llm_lr=llm_lr, probe_lr=probe_lr, batch_size=batch_size,
                       max_len=max_len, seed=seed)
    results = run_compare(args, out)
    print(markdown_table(results))
    print(f"\nwrote {out / 'compare.md'}, {out / 'compare.json'} and {out / 'compare.png'}")
