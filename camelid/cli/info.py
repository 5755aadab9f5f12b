"""`camelid info NAME`: sizes of a model config, computed on the meta device (405B costs nothing).
`camelid info --kernels`: which implementation each operation runs on this machine, and why."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.table import Table

from camelid.cli.app import app
from camelid.config import LlamaConfig
from camelid.errors import CamelidError
from camelid.formats import Format, detect
from camelid.model import Llama

# int8/int4 are weight-only group-wise formats: one fp16 scale per group (int4 adds a zero point)
BYTES_PER_PARAM = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0 + 2 / 32, "int4": 0.5 + 4 / 32}


def model_sizes(config: LlamaConfig) -> dict[str, float | int]:
    with torch.device("meta"):
        model = Llama(config)
    n = model.num_params()
    out: dict[str, float | int] = {"params": n, "params_non_embedding": model.num_params(exclude_embeddings=True)}
    for name, b in BYTES_PER_PARAM.items():
        out[f"weights_{name}_bytes"] = n * b
    out["kv_cache_bytes_per_token_bf16"] = config.kv_cache_bytes_per_token
    out["kv_cache_bytes_full_context_bf16"] = config.kv_cache_bytes_per_token * config.max_seq_len
    return out


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:,.1f} {unit}"
        nbytes /= 1024
    raise AssertionError


def _resolve(name: str) -> LlamaConfig:
    path = Path(name)
    if path.is_dir() and detect(path) is Format.HF:
        from camelid.interop.hf import config_from_hf, read_config

        return config_from_hf(read_config(path), str(path / "config.json"))
    return LlamaConfig.from_name(name)


def print_kernels(as_json: bool) -> None:
    """The implementation of every op on this machine (camelid.ops.implementations) and the C++ decode step's."""
    from camelid import ops
    from camelid.ops import native

    rows = {op: (c.impl, c.reason) for op, c in ops.implementations().items()}
    if native.loaded() is not None:
        rows["decode step"] = (f"C++ {native.label()}", "the whole batch-1 step of a fused fp32/int8/int4 model in "
                                                        "one call (camelid.variants.decode_step)")
    else:
        rows["decode step"] = ("PyTorch", f"per-layer path: {native.reason()}")
    cpu = sorted(f for f in native.cpu_flags() if f.startswith(("avx", "fma", "f16c", "amx")))
    if as_json:
        print(json.dumps({"cpu_flags": cpu, "isa": native.isa(), "build_dir": str(native.build_dir()),
                          "ops": {op: {"implementation": i, "reason": r} for op, (i, r) in rows.items()}}, indent=2))
        return
    table = Table(title=f"camelid operations on this machine (CPU: {' '.join(cpu) or 'no AVX flags'})")
    for col in ("op", "implementation", "why"):
        table.add_column(col)
    for op, (impl, why) in rows.items():
        table.add_row(op, impl, why)
    Console().print(table)


@app.command()
def info(
    name: str | None = typer.Argument(None, help="A config name (see `camelid configs`) or a HF model directory."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    kernels: bool = typer.Option(False, "--kernels", help="Show which implementation each operation uses here."),
) -> None:
    """Parameter count, weight memory at fp32/bf16/int8/int4 and KV-cache bytes per token (or, with --kernels,
    the implementation of each operation on this machine)."""
    if kernels:
        print_kernels(as_json)
        return
    if name is None:
        raise CamelidError("give a config name or a model directory (`camelid configs` lists the names), or --kernels")
    config = _resolve(name)
    sizes = model_sizes(config)
    if as_json:
        print(json.dumps({"config": config.to_dict(), **sizes}, indent=2, default=str))
        return
    c = config
    table = Table(title=f"{c.name}: {sizes['params'] / 1e9:.3f}B parameters", show_header=False)
    table.add_row("layers / dim / FFN", f"{c.n_layers} / {c.dim} / {c.intermediate_size}")
    kind = "MHA" if c.n_kv_heads == c.n_heads else ("MQA" if c.n_kv_heads == 1 else "GQA")
    table.add_row("heads (query / kv)", f"{c.n_heads} / {c.n_kv_heads} ({kind}), head_dim {c.head_dim}")
    table.add_row("vocab / context", f"{c.vocab_size:,} / {c.max_seq_len:,}")
    table.add_row("RoPE", f"theta {c.rope_theta:g}" + (f", llama3 scaling x{c.rope_scaling.factor:g}"
                                                          if c.rope_scaling else ""))
    table.add_row("tied embeddings", str(c.tie_embeddings))
    table.add_row("parameters", f"{sizes['params']:,} ({sizes['params_non_embedding']:,} without embeddings)")
    for dtype in BYTES_PER_PARAM:
        table.add_row(f"weights {dtype}", _human(sizes[f"weights_{dtype}_bytes"]))
    table.add_row("KV cache per token (bf16)", _human(sizes["kv_cache_bytes_per_token_bf16"]))
    table.add_row(f"KV cache at {c.max_seq_len:,} tokens (bf16)", _human(sizes["kv_cache_bytes_full_context_bf16"]))
    Console().print(table)


@app.command("configs")
def configs() -> None:
    """List the named model configs."""
    for name in LlamaConfig.names():
        print(name)
