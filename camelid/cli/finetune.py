"""`camelid finetune CONFIG --set ...` (SFT with LoRA, QLoRA or every weight) and `camelid adapter` (what to do
with an adapter afterwards: merge it into the base in any format, or write it for llama.cpp)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from camelid.cli.app import app
from camelid.errors import CamelidError


@app.command()
def finetune(
    config: Path = typer.Argument(None, help="A YAML or TOML file of fine-tuning settings (see docs/finetuning.md)."),
    set_: list[str] = typer.Option(None, "--set", "-s", help="Override a setting: key=value (repeat), e.g. "
                                   "--set model=smollm2-135m-instruct --set data=train.jsonl --set lora_rank=16."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in the out folder."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
    show_mask: int = typer.Option(0, "--show-mask", help="Print this many training examples with the learned "
                                  "tokens marked, and exit without training."),
) -> None:
    """Fine-tune a model on chat, instruction or text data (LoRA by default; method=full trains every weight;
    quantize=int4 is QLoRA), on preference pairs with objective=dpo, or from a teacher with objective=kd. Under
    torchrun, on many processes (DDP)."""
    from camelid.finetune import finetune as run
    from camelid.finetune import load_finetune_config

    cfg = load_finetune_config(config, set_ or [])
    if cfg.objective == "dpo":
        from camelid.finetune.dpo import dpo as run
    elif cfg.objective == "kd":
        from camelid.finetune.distill import distill as run
    if show_mask:
        _show_mask(cfg, show_mask)
        return
    result = run(cfg, resume=resume, progress=progress)
    if os.environ.get("RANK", "0") != "0":
        return
    accuracy = result.val_metrics.get("val_accuracy")
    typer.echo(f"done: {result.steps} steps, train loss {result.final_loss:.4f}, held-out loss "
               f"{result.val_loss:.4f}" + (f", preference accuracy {accuracy:.3f}" if accuracy is not None else "") +
               f"; {'adapter' if cfg.method == 'lora' else 'model'} in {cfg.export_path}, "
               f"logs, plot and checkpoints in {result.out}")


def _show_mask(cfg: object, n: int) -> None:
    from rich.console import Console

    from camelid.finetune.data import load_sft_data, show_mask
    from camelid.finetune.objective import load_tokenizer

    tok = load_tokenizer(cfg.model)  # type: ignore[attr-defined]
    data = load_sft_data(cfg, tok)  # type: ignore[arg-type]
    console = Console(highlight=False, soft_wrap=True)
    color = console.is_terminal
    legend = "learned tokens in bold green" if color else "learned tokens between « and »"
    lines: list[object] = [f"{len(data.train)} training examples; {legend}:", *(f"note: {x}" for x in data.notes)]
    for ex in data.train[:n]:
        lines += [f"--- {ex.where}: {len(ex.ids)} tokens, {ex.n_trained} learned ---", show_mask(tok, ex, color=color)]
    for line in lines:
        if color:
            console.print(line, markup=False)
        else:
            typer.echo(line)


@app.command("teacher-cache")
def teacher_cache(
    config: Path = typer.Argument(None, help="The distillation settings (objective: kd), as for `camelid finetune`."),
    set_: list[str] = typer.Option(None, "--set", "-s", help="Override a setting: key=value (repeat), e.g. "
                                   "--set teacher=smollm2-135m-instruct --set teacher_cache=topk.safetensors."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
) -> None:
    """Run the teacher once over the training examples and write its top-k logits (or, with
    teacher_cache_kind=sampled, tokens drawn from its distribution) at every learned position to
    teacher_cache, for `camelid finetune --set objective=kd --set teacher_cache=...` without the teacher in memory."""
    from camelid.finetune import load_finetune_config
    from camelid.finetune.distill import write_teacher_cache

    cfg = load_finetune_config(config, set_ or [])
    stats = write_teacher_cache(cfg, progress=progress)
    what = f"{cfg.teacher_samples} draws" if cfg.teacher_cache_kind == "sampled" else f"top-{cfg.teacher_topk} logits"
    typer.echo(f"wrote {cfg.teacher_cache}: {what} at {int(stats['tokens']):,} positions, "
               f"{stats['bytes'] / 1e6:.1f} MB ({stats['bytes_per_token']:.0f} bytes per token) in "
               f"{stats['seconds']:.1f} s")


adapter_app = typer.Typer(help="LoRA adapters: merge one into its base, or write it for llama.cpp.",
                          no_args_is_help=True)
app.add_typer(adapter_app, name="adapter")


@adapter_app.command("merge")
def adapter_merge(
    adapter: Path = typer.Argument(..., help="The adapter folder (adapter_config.json + adapter_model.safetensors)."),
    dst: Path = typer.Argument(..., help="Where to write: a directory (hf, meta) or a .gguf file."),
    model: str = typer.Option(None, "--model", "-m", help="The base model (default: the adapter's "
                              "base_model_name_or_path)."),
    to: str = typer.Option("hf", "--to", help="Output format: hf, gguf or meta."),
    qtype: str = typer.Option("f32", "--qtype", help="GGUF tensor type: f32, f16 or q8_0."),
) -> None:
    """Fold ADAPTER into its base model and write the merged model (like any model: hf, gguf or meta)."""
    from camelid.cli.convert import convert_checkpoint

    base = model or _adapter_base(adapter)
    out = convert_checkpoint(base, dst, to, qtype=qtype, adapter=str(adapter))
    print(f"wrote {out} ({to}: {base} with {adapter} merged)", file=sys.stderr)


@adapter_app.command("export")
def adapter_export(
    adapter: Path = typer.Argument(..., help="The adapter folder (adapter_config.json + adapter_model.safetensors)."),
    dst: Path = typer.Argument(..., help="The GGUF LoRA adapter file to write (.gguf)."),
    model: str = typer.Option(None, "--model", "-m", help="The base model (default: the adapter's "
                              "base_model_name_or_path); its config places the tensors."),
) -> None:
    """Write ADAPTER as a GGUF LoRA adapter that llama.cpp applies to the base model's GGUF (--lora)."""
    import camelid
    from camelid.variants.lora import load_adapter, save_gguf_adapter

    if dst.suffix != ".gguf":
        raise CamelidError(f"{dst}: a GGUF adapter is a file ending in .gguf")
    base = model or _adapter_base(adapter)
    llm = camelid.load(base, tokenizer=False)
    load_adapter(llm.model, adapter)
    save_gguf_adapter(llm.model, dst, name=adapter.name)
    print(f"wrote {dst} (GGUF LoRA adapter for {base})", file=sys.stderr)


def _adapter_base(adapter: Path) -> str:
    from camelid.variants.lora import read_adapter

    base = read_adapter(adapter)[2]
    if not base:
        raise CamelidError(f"{adapter}: adapter_config.json names no base model; give it with --model")
    return base
