"""`camelid compare --data FILE.jsonl`: fine-tuned BERT vs a decoder LLM (prompted, probed, fine-tuned, LoRA),
each trained arm tuned on the dev split, measured, with a bootstrap verdict."""

from __future__ import annotations

from pathlib import Path

import typer

from camelid.cli.app import app
from camelid.errors import CamelidError


def _rates(text: str, option: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        rates = []
    if not rates or any(r <= 0 for r in rates):
        raise CamelidError(f"{option} takes positive learning rates separated by commas (e.g. 5e-5,1e-4), "
                           f"got {text!r}")
    return rates


@app.command()
def compare(
    data: Path = typer.Option(..., "--data", help="jsonl of {\"text\", \"label\"[, \"split\"]} lines."),
    out: Path = typer.Option(Path("compare-out"), "--out", "-o", help="Folder for compare.md/.json/.png."),
    bert: str = typer.Option("all-minilm-l6-v2", help="BERT backbone (name or Hugging Face folder)."),
    llm: str = typer.Option("smollm2-135m-instruct", help="Decoder LLM (name, Hugging Face folder or .gguf)."),
    arms: str = typer.Option(",".join(["bert-finetune", "llm-zeroshot", "llm-kshot", "llm-probe", "llm-finetune",
                                       "llm-lora-head", "llm-lora-words"]), help="Comma-separated arms to run."),
    k_shot: int = typer.Option(4, help="Examples in the prompt for llm-kshot."),
    max_train: int = typer.Option(0, help="Cap on training examples (0: all)."),
    max_dev: int = typer.Option(200, help="Cap on dev examples, scored after every epoch (0: all)."),
    max_test: int = typer.Option(200, help="Cap on test examples (0: all)."),
    epochs: int = typer.Option(4, help="Most epochs of a trained arm (the probe: at least 20)."),
    patience: int = typer.Option(1, help="Stop a run after this many epochs without a lower dev loss."),
    bert_lr: str = typer.Option("5e-5,1e-4,2e-4", help="Learning rates bert-finetune tries."),
    llm_lr: str = typer.Option("1e-5,3e-5", help="Learning rates llm-finetune tries."),
    probe_lr: str = typer.Option("1e-3,1e-2", help="Learning rates of the linear-probe head."),
    lora_lr: str = typer.Option("3e-4,1e-3", help="Learning rates llm-lora-head and llm-lora-words try."),
    lora_rank: int = typer.Option(8, help="Rank of the LoRA arms' adapters (alpha = 2 x rank)."),
    batch_size: int = typer.Option(16),
    max_len: int = typer.Option(256, help="Tokens per text for the classifiers."),
    bootstrap: int = typer.Option(10000, help="Resamples of the test set for the verdict's 95% intervals."),
    seed: int = typer.Option(0),
) -> None:
    """Accuracy, macro-F1, the difference from the best arm (95% bootstrap interval), the chosen learning rate and
    epochs, training time, latency, throughput, peak memory and parameters, per arm; then the verdict."""
    from camelid.compare import CompareArgs, markdown_table, run_compare, verdict

    if epochs < 1 or patience < 0 or bootstrap < 100:
        raise CamelidError(f"need epochs >= 1, patience >= 0 and bootstrap >= 100, got {epochs}, {patience}, "
                           f"{bootstrap}")
    args = CompareArgs(data=str(data), bert=bert, llm=llm, arms=[a.strip() for a in arms.split(",") if a.strip()],
                       k_shot=k_shot, max_train=max_train, max_dev=max_dev, max_test=max_test, epochs=epochs,
                       patience=patience, bert_lr=_rates(bert_lr, "--bert-lr"), llm_lr=_rates(llm_lr, "--llm-lr"),
                       probe_lr=_rates(probe_lr, "--probe-lr"), lora_lr=_rates(lora_lr, "--lora-lr"),
                       lora_rank=lora_rank, batch_size=batch_size, max_len=max_len, bootstrap=bootstrap, seed=seed)
    results = run_compare(args, out)
    print(markdown_table(results, bootstrap, seed))
    if len(results) > 1:
        print("\n" + verdict(results, bootstrap, seed)["text"])
    print(f"\nwrote {out / 'compare.md'}, {out / 'compare.json'} and {out / 'compare.png'}")
