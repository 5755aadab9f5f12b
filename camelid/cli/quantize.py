"""`camelid quantize SRC DST --mode int8|int4|fp16`: weight-only quantisation to a safetensors checkpoint, with the
model's tokenizer written beside it (where `camelid.load` and `camelid generate -m DST` look for it)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import typer

from camelid.cli.app import app
from camelid.errors import CamelidError
from camelid.tokenizer import Tokenizer


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether two tokenizers read text alike: vocabulary, special ids and chat template."""
    return (a.hf_tokenizer().get_vocab(with_added_tokens=True) == b.hf_tokenizer().get_vocab(with_added_tokens=True)
            and (a.bos_id, a.eos_id, a.stop_ids, a.chat_template) == (b.bos_id, b.eos_id, b.stop_ids, b.chat_template))


def check_tokenizer_folder(tok: Tokenizer, folder: Path, output: Path) -> bool:
    """True when `folder` already holds this tokenizer (nothing to write); an error when it holds another one."""
    if not (folder / "tokenizer.json").is_file():
        return False
    try:
        there = Tokenizer.from_dir(folder)
    except CamelidError:
        there = None
    if there is not None and same_tokenizer(tok, there):
        return True
    raise CamelidError(f"{folder} already holds another model's tokenizer.json, and the tokenizer of {output.name} "
                       f"goes beside it; write the output into a folder of its own (e.g. {output.stem}/{output.name})")


@app.command()
def quantize(
    source: str = typer.Argument(..., help="model to quantise (anything camelid.load accepts)"),
    output: Path = typer.Argument(..., help="output .safetensors file (config in its metadata); the tokenizer files "
                                            "go into the same folder"),
    mode: str = typer.Option("int8", help="int8 (one scale per row), int4 (groups of 32, scale + min) or fp16"),
) -> None:
    """Quantise a model's linear weights and save them, with its tokenizer beside them: `camelid generate -m
    OUTPUT` runs the file, and camelid.variants.quantized.load_quantized loads the model alone."""
    import camelid.llm
    from camelid.variants.quantized import quantize_model, save_quantized

    if mode not in ("int8", "int4", "fp16"):
        raise CamelidError(f"unknown --mode {mode!r}; choose int8, int4 or fp16")
    if output.suffix != ".safetensors":
        raise CamelidError(f"{output}: the output must be a .safetensors file")
    path = camelid.llm.resolve(source)
    tok = camelid.llm.model_tokenizer(path)
    folder = output.parent
    has_it = tok is not None and check_tokenizer_folder(tok, folder, output)  # before the slow part
    llm = camelid.llm.load(path, tokenizer=False)
    folder.mkdir(parents=True, exist_ok=True)
    save_quantized(quantize_model(llm.model, mode), output)
    if tok is None:
        note = f"the source has no tokenizer: for `camelid generate -m {output}` put one (tokenizer.json) beside it"
    elif has_it:
        note = f"its tokenizer is the one already in {folder}"
    else:
        with tempfile.TemporaryDirectory(dir=folder, prefix=".tokenizer-") as tmp:
            for f in tok.save_pretrained(tmp).iterdir():
                f.replace(folder / f.name)
        note = f"its tokenizer beside it in {folder}"
    print(f"wrote {output} ({output.stat().st_size / 2**20:.1f} MiB, {mode}); {note}")
