"""`camelid quantize SRC DST --mode int8|int4`: weight-only quantisation to a safetensors checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer

from camelid.cli.app import app
from camelid.errors import CamelidError


@app.command()
def quantize(
    source: str = typer.Argument(..., help="model to quantise (anything camelid.load accepts)"),
    output: Path = typer.Argument(..., help="output .safetensors file (config in its metadata)"),
    mode: str = typer.Option("int8", help="int8 (one scale per row) or int4 (groups of 32, scale + min)"),
) -> None:
    """Quantise a model's linear weights and save them; load the file with camelid.variants.quantized.load_quantized."""
    import camelid.llm
    from camelid.variants.quantized import quantize_model, save_quantized

    if mode not in ("int8", "int4"):
        raise CamelidError(f"unknown --mode {mode!r}; choose int8 or int4")
    if output.suffix != ".safetensors":
        raise CamelidError(f"{output}: the output must be a .safetensors file")
    llm = camelid.llm.load(source, tokenizer=False)
    save_quantized(quantize_model(llm.model, mode), output)
    print(f"wrote {output} ({output.stat().st_size / 2**20:.1f} MiB, {mode})")
