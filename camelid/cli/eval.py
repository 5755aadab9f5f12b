"""`camelid eval`: perplexity, multiple-choice and generation tasks from local files, one table for several
models and precisions (camelid.eval)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from camelid.cli.app import app
from camelid.hub import DEFAULT_MODEL


@app.command("eval")
def eval_(
    tasks: list[str] = typer.Argument(
        None, help="task names (bigbench = the six BIG-bench sets, strategyqa, ..., persuasion, "
                   "natural_instructions) or files: .txt (perplexity), .jsonl with \"choices\" (multiple choice) "
                   "or \"output\" (generation). Default: bigbench persuasion"),
    model: list[str] = typer.Option([DEFAULT_MODEL], "--model", "-m",
                                    help="model name, HF dir, .gguf or Meta dir (repeatable: one column each)"),
    precision: str = typer.Option("fp32", "--precision", "-p",
                                  help="comma-separated: fp32 (as loaded), int8, int4 (weight-only quantised)"),
    num_fewshot: int = typer.Option(0, "--num-fewshot", "-k", min=0, help="solved examples before each question"),
    chat: bool = typer.Option(False, "--chat", help="prompts through the model's chat template (k-shot as turns)"),
    limit: int | None = typer.Option(None, "--limit", min=1,
                                     help="only the first N examples of each task (of a text: its first N "
                                          "paragraphs, blocks between blank lines)"),
    max_tokens: int | None = typer.Option(None, "--max-tokens", min=1,
                                          help="perplexity: score only the first N tokens of each text"),
    max_length: int | None = typer.Option(None, "--max-length", min=2,
                                          help="tokens a sequence may read (default: the model's context)"),
    stride: int | None = typer.Option(None, "--stride", min=1,
                                      help="perplexity: new tokens scored per window (default: the whole window)"),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1, max=4096, help="generation tasks"),
    batch_tokens: int = typer.Option(1024, "--batch-tokens", min=16, help="new tokens per forward pass"),
    threads: int | None = typer.Option(None, "--threads", min=1, help="torch threads (default: torch's)"),
    out: Path = typer.Option(Path("eval-out"), "--out", "-o", help="folder for eval.json, eval.md and eval.png"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
    server: str | None = typer.Option(None, "--server",
                                      help="score through a running server's /v1/completions (echo + logprobs), "
                                           "e.g. http://127.0.0.1:8000; -m names the served model (its tokenizer)"),
    api_key: str | None = typer.Option(None, "--api-key", envvar="CAMELID_API_KEY", help="the server's API key"),
) -> None:
    """Evaluate models on tasks; print a Markdown table and write JSON (every setting), Markdown and PNG."""
    import torch

    from camelid.eval import report
    from camelid.eval.runner import Settings, evaluate
    from camelid.eval.tasks import resolve_tasks

    if threads:
        torch.set_num_threads(threads)
    settings = Settings(num_fewshot=num_fewshot, chat=chat, limit=limit, max_tokens=max_tokens,
                        max_length=max_length, stride=stride, max_new_tokens=max_new_tokens, batch_tokens=batch_tokens)
    resolved = resolve_tasks(tasks or ["bigbench", "persuasion"])
    precisions = [p.strip() for p in precision.split(",") if p.strip()]
    results = evaluate(model, precisions, resolved, settings, show_progress=not quiet, server=server,
                       api_key=api_key)
    shots = f"{num_fewshot}-shot" + (", chat template" if chat else "")
    results["title"] = f"camelid eval: {', '.join(model)} ({shots})"
    paths = report.write(results, out)
    print(report.markdown(results))
    print(f"wrote {paths['json']}, {paths['markdown']} and {paths['png']}", file=sys.stderr)
