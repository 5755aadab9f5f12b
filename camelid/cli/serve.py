"""`camelid serve MODEL`: an OpenAI-compatible HTTP server with continuous batching, and a web chat at /.

It binds 127.0.0.1 unless --host says otherwise; --api-key (or CAMELID_API_KEY) is required on every endpoint
but /health and the page. Startup lines go to stderr; the address is the last of them.
"""

from __future__ import annotations

import sys
from typing import Any

import typer

from camelid.cli.app import app
from camelid.cli.generate import QuantizeOpt
from camelid.errors import CamelidError
from camelid.hub import DEFAULT_MODEL


def build(model: str, *, quantize: str = "fp32", slots: int = 8, context: int | None = None, max_queue: int = 64,
          prefix_cache_mb: int = 256, max_tokens: int = 4096, timeout: float = 600.0, max_body_kb: int = 1024,
          api_key: str | None = None, cors_origin: list[str] | None = None, embedding_model: str | None = None,
          name: str | None = None, adapters: list[str] | None = None, kv_dtype: str = "fp32",
          interleave: bool = False, quiet: bool = True) -> Any:
    """Load the model, start the engine and return the FastAPI app (its engine is app.state.served.engine).
    `adapters`: NAME=DIR LoRA adapters, each served as the model NAME (the base with the adapter merged, loaded
    as `camelid.load(model, quantize=..., adapter=DIR)` loads it). `kv_dtype`: fp32 or fp16 KV cache.
    `interleave`: int8/int4 weights also kept in the layout of batched steps (`Engine`)."""
    import camelid
    from camelid.ops import native
    from camelid.serve.app import Limits, Served, create_app
    from camelid.serve.engine import KV_DTYPES, Engine
    from camelid.serve.metrics import ServerMetrics

    if quantize not in ("none", "fp32", "fp16", "int8", "int4"):
        raise CamelidError(f"--quantize {quantize!r}: choose one of none, fp32, fp16, int8, int4")
    if kv_dtype not in KV_DTYPES:
        raise CamelidError(f"--kv-dtype {kv_dtype!r}: choose one of {', '.join(KV_DTYPES)}")
    camelid.llm.resolve(model)  # a wrong name is the one line on stderr, before anything else is said
    if quantize != "none":
        native.load(quiet=quiet)  # a server waits for its kernels (built once per CPU)
    mode = None if quantize == "none" else quantize
    adapter_dirs = parse_adapters(adapters or [], name or model)
    llm = camelid.load(model, quantize=mode)
    if llm.tokenizer is None:
        raise CamelidError(f"{model}: no tokenizer found beside the weights; a server needs one")
    ctx = min(context or 4096, llm.config.max_seq_len)
    metrics = ServerMetrics()
    adapted = {n: camelid.load(model, quantize=mode, adapter=d, tokenizer=False).model for n, d in adapter_dirs.items()}
    engine = Engine(llm.model, slots=slots, context=ctx, max_queue=max_queue,
                    prefix_cache_bytes=prefix_cache_mb << 20, metrics=metrics, adapters=adapted,
                    kv_dtype=kv_dtype, interleave=interleave).start()
    served = Served(name=name or model, engine=engine, tokenizer=llm.tokenizer, adapters=adapter_dirs)
    if embedding_model:
        from camelid.serve.embeddings import bert_embedder

        served.embed, served.embed_name = bert_embedder(embedding_model), embedding_model
    if not quiet:
        from camelid.variants.decode_step import refusal

        kv_mb = engine.kv.numel() * engine.kv.element_size() / 2**20
        extra = engine.step.interleaved_bytes if engine.step is not None else 0
        how = ("the C++ batched decode step" + (f" (+{extra / 2**20:.0f} MiB of weights interleaved for it)"
                                                if extra else "")) if engine.step is not None else \
            f"the per-layer path ({refusal(llm.model) or native.reason()})"
        print(f"camelid: serving {llm.config.name} ({llm.config.num_params() / 1e6:.1f}M parameters, {quantize}) "
              f"from {llm.source}: {slots} slots x {ctx} positions ({kv_mb:.0f} MiB {kv_dtype} KV cache), "
              f"decoding through {how}", file=sys.stderr)
        for n, d in adapter_dirs.items():
            print(f"camelid: LoRA adapter {d} served as model {n!r}", file=sys.stderr)
    return create_app(served, limits=Limits(max_body_bytes=max_body_kb << 10, max_tokens=max_tokens,
                                            request_timeout=timeout),
                      api_key=api_key, cors_origins=cors_origin, metrics=metrics)


def parse_adapters(specs: list[str], base_name: str) -> dict[str, str]:
    """NAME=DIR options as {name: dir}; a clear error for a malformed one, a repeated name or a missing folder."""
    from pathlib import Path

    out: dict[str, str] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        name, folder = name.strip(), folder.strip()
        if not sep or not name or not folder:
            raise CamelidError(f"--adapter {spec!r}: write it as NAME=DIR (the model name requests use, and the "
                               "adapter's folder)")
        if name in out or name == base_name:
            raise CamelidError(f"--adapter {spec!r}: the name {name!r} is already served; give each adapter its "
                               "own name")
        if not Path(folder).is_dir():
            raise CamelidError(f"--adapter {spec!r}: {folder} is not a folder (expected a LoRA adapter folder: "
                               "adapter_config.json + adapter_model.safetensors)")
        out[name] = folder
    return out


@app.command()
def serve(
    model: str = typer.Argument(DEFAULT_MODEL, help="model name (camelid list), HF dir, .gguf or Meta dir"),
    host: str = typer.Option("127.0.0.1", help="address to bind (0.0.0.0: every interface; mind --api-key)"),
    port: int = typer.Option(8000, min=0, max=65535),
    api_key: str | None = typer.Option(None, "--api-key", envvar="CAMELID_API_KEY",
                                       help="required as 'Authorization: Bearer KEY' on every endpoint but /health"),
    quantize: str = QuantizeOpt,
    slots: int = typer.Option(8, min=1, max=256, help="sequences decoded together (continuous batching)"),
    ctx: int | None = typer.Option(None, "--ctx", min=2, help="positions per sequence (default: 4096 or the "
                                                              "model's context, whichever is smaller)"),
    max_queue: int = typer.Option(64, min=0, help="requests waiting for a slot; beyond it: 429"),
    max_tokens: int = typer.Option(4096, min=1, help="the largest max_tokens a request may ask for"),
    timeout: float = typer.Option(600.0, min=1.0, help="seconds a request may run (then finish_reason 'length')"),
    prefix_cache_mb: int = typer.Option(256, min=0, help="memory for reusable prompt prefixes (0: off)"),
    max_body_kb: int = typer.Option(1024, min=1, help="the largest request body"),
    cors_origin: list[str] = typer.Option([], "--cors-origin", help="allow browser pages from this origin "
                                                                    "(repeatable; CORS is off without it)"),
    embedding_model: str | None = typer.Option(None, help="a BERT model for /v1/embeddings (default: the "
                                                          "served model's mean-pooled hidden states)"),
    served_model_name: str | None = typer.Option(None, help="the model's name in the API (default: MODEL)"),
    adapter: list[str] = typer.Option([], "--adapter", help="NAME=DIR: serve a LoRA adapter as the model NAME "
                                                            "(repeatable; requests choose it by `model`)"),
    kv_dtype: str = typer.Option("fp32", "--kv-dtype", help="what the KV cache stores: fp32, or fp16 (half the "
                                                            "memory and attention reads; keys and values rounded)"),
    interleave: bool = typer.Option(False, help="int8/int4: keep a copy of the weights laid out for batched "
                                               "steps (~1.4x faster; +1 or +0.56 bytes per weight; logits equal "
                                               "`camelid generate`'s only up to float summation order)"),
    threads: int | None = typer.Option(None, min=1, help="CPU threads for the model (default: PyTorch's)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="only errors on stderr"),
) -> None:
    """Serve MODEL over OpenAI's API (chat, completions, embeddings, ...) with a web chat at /."""
    import torch
    import uvicorn

    if threads:
        torch.set_num_threads(threads)
    api = build(model, quantize=quantize, slots=slots, context=ctx, max_queue=max_queue,
                prefix_cache_mb=prefix_cache_mb, max_tokens=max_tokens, timeout=timeout, max_body_kb=max_body_kb,
                api_key=api_key, cors_origin=cors_origin, embedding_model=embedding_model,
                name=served_model_name, adapters=adapter, kv_dtype=kv_dtype, interleave=interleave, quiet=quiet)
    if not quiet:
        auth = "API key required" if api_key else "no API key"
        print(f"camelid: http://{host}:{port} ({auth}; web chat at /, OpenAI API under /v1)", file=sys.stderr)
    try:
        uvicorn.run(api, host=host, port=port, log_level="warning" if quiet else "info", access_log=False,
                    timeout_graceful_shutdown=5)
    finally:
        api.state.served.engine.stop()
