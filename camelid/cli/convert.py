"""`camelid convert SRC DST --to hf|gguf|meta`: any checkpoint camelid loads, written in another format."""

from __future__ import annotations

import shutil
import sys
import time
from enum import Enum
from pathlib import Path

import torch
import typer

from camelid.cli.app import app
from camelid.errors import CamelidError
from camelid.llm import model_tokenizer
from camelid.tokenizer import Tokenizer

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


class Target(str, Enum):
    hf = "hf"
    gguf = "gguf"
    meta = "meta"


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _tokenizer_for(path: Path) -> Tokenizer | None:
    """The source's tokenizer, to carry over; a checkpoint without one still converts (with a note)."""
    try:
        return model_tokenizer(path)
    except CamelidError as e:
        print(f"note: no tokenizer carried over ({e})", file=sys.stderr)
        return None


def convert_checkpoint(src: str, dst: Path, to: str, dtype: str | None = None, qtype: str = "f32",
                       shards: int = 1) -> Path:
    """Load `src` (name, HF dir, .gguf, Meta dir) and write it to `dst` in format `to`; returns what was written."""
    import camelid

    if dtype is not None and dtype not in DTYPES:
        raise CamelidError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if to == "gguf" and qtype not in ("f32", "f16", "q8_0"):
        raise CamelidError(f"unknown GGUF type {qtype!r}; choose one of f32, f16, q8_0")
    if to == "gguf" and dst.suffix != ".gguf":
        raise CamelidError(f"{dst}: a GGUF destination must be a file ending in .gguf")
    if to != "gguf" and dst.is_file():
        raise CamelidError(f"{dst}: is a file; {to} checkpoints are directories, give a directory path")
    torch_dtype = DTYPES[dtype] if dtype else None
    llm = camelid.load(src, dtype=torch_dtype, tokenizer=False)
    src_path = Path(llm.source)
    llm.tokenizer = _tokenizer_for(src_path)
    if to == "hf":
        return llm.save_pretrained(dst, dtype=torch_dtype)
    if to == "gguf":
        from camelid.interop.gguf import save_gguf

        tok = llm.tokenizer if llm.tokenizer is not None and llm.tokenizer.kind in ("spm", "bpe") else None
        if tok is None:
            print(f"warning: {src} has no tokenizer camelid can embed; llama.cpp will refuse {dst.name} "
                  "(camelid and transformers read it)", file=sys.stderr)
        return save_gguf(llm.model, dst, tokenizer=tok, qtype=qtype)
    if to == "meta":
        from camelid.interop.meta import save_meta_dir

        out = save_meta_dir(llm.model, dst, n_shards=shards, dtype=torch_dtype)
        if src_path.is_dir() and (src_path / "tokenizer.model").is_file():
            shutil.copyfile(src_path / "tokenizer.model", out / "tokenizer.model")
        return out
    raise CamelidError(f"unknown target format {to!r}; choose hf, gguf or meta")


@app.command()
def convert(
    src: str = typer.Argument(..., help="A model name, HF directory, .gguf file or Meta directory."),
    dst: Path = typer.Argument(..., help="Where to write: a directory (hf, meta) or a .gguf file."),
    to: Target = typer.Option(..., "--to", help="Output format."),
    dtype: str = typer.Option(None, "--dtype", help="Weight dtype for hf/meta: f32, f16 or bf16 (default: as loaded)."),
    qtype: str = typer.Option("f32", "--qtype", help="GGUF tensor type: f32, f16 or q8_0."),
    shards: int = typer.Option(1, "--shards", help="Model-parallel shards for --to meta."),
) -> None:
    """Convert a checkpoint between Hugging Face, GGUF and Meta formats (atomic writes)."""
    start = time.perf_counter()
    out = convert_checkpoint(src, dst, to.value, dtype=dtype, qtype=qtype, shards=shards)
    print(f"wrote {out} ({to.value}, {_size(out) / 2**20:,.1f} MiB) in {time.perf_counter() - start:.1f}s",
          file=sys.stderr)
