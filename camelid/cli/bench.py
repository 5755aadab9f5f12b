"""`camelid bench`: camelid beside transformers (and llama-cpp-python when installed) on the same model shapes, prompt
length and machine, in one run. Each (engine, round) runs in its own subprocess so peak RSS is the engine's
own; rounds are interleaved across engines so machine noise hits all of them alike; medians are reported.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from camelid.cli.app import app
from camelid.errors import CamelidError
from camelid.fileio import atomic_write


def _peak_rss_mib() -> float:
    """Peak resident memory of this process. /proc's VmHWM belongs to this program alone; getrusage's maxrss
    can carry the parent's peak over fork + exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _read_bandwidth(threads: int) -> float:
    """GB/s of a streaming read of 1 GiB of fp32 (torch's sum over `threads` threads), best of 5: the memory
    bandwidth a batch-1 fp32 decode step, which reads every weight once per token, is bound by."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(1 << 28)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        best = max(best, x.numel() * 4 / (time.perf_counter() - t0) / 1e9)
    return best


def _measure_bandwidth(threads: int) -> float:
    """`_read_bandwidth` in a process of its own (the 1 GiB never counts in another engine's peak RSS)."""
    code = f"from camelid.cli.bench import _read_bandwidth; print('BW', _read_bandwidth({threads}))"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("BW "):
            return float(line[3:])
    raise CamelidError(f"the memory-bandwidth measurement failed: {proc.stderr.strip()[-300:]}")


def _time_camelid(model_name: str, precision: str, prompt_len: int, new_tokens: int, threads: int,
                  checkpoint: str | None = None) -> dict:
    """precision: fp32-eager (the plain model), fp32 (fused + C++ decode step), fp16, int8 or int4 (loaded from a
    quantised checkpoint, as a user would, so peak RSS never includes an fp32 copy); a "-compile" suffix runs the decode
    steps through torch.compile and reports the one-off compile time."""
    import torch

    from camelid.config import LlamaConfig
    from camelid.model import Llama
    from camelid.variants.decode_step import decode_step
    from camelid.variants.quantized import load_quantized, quantize_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    base, compiled = precision.removesuffix("-compile"), precision.endswith("-compile")
    cfg = LlamaConfig.from_name(model_name)
    if checkpoint:
        model = load_quantized(checkpoint)
    else:
        model = Llama(cfg).eval()
        if base != "fp32-eager":
            quantize_model(model, base)
    ids = torch.randint(0, cfg.vocab_size, (1, prompt_len))
    extra = {}
    with torch.inference_mode():
        model.setup_cache(1, prompt_len + new_tokens)
        # warm-up (kernel load, allocator); the token is made exactly as in the timed loop below, so the
        # compiled step sees the same strides and does not recompile
        tok = model(ids[:, :8], torch.arange(8), last_only=True)[:, -1].argmax(-1, keepdim=True)
        step = model
        if compiled:
            step = torch.compile(model, dynamic=False)
            t = time.perf_counter()
            step(tok, torch.tensor([8]), last_only=True)
            extra["compile_s"] = time.perf_counter() - t
        # as generate_tokens does: fused models decode through the one-call C++ step when it can run
        fast = None if compiled else decode_step(model)
        if fast is not None:
            fast(int(tok), 8)  # warm-up: binds the cache
        t0 = time.perf_counter()
        logits = model(ids, torch.arange(prompt_len), last_only=True)
        t1 = time.perf_counter()
        tok = logits[:, -1].argmax(-1, keepdim=True)
        for i in range(new_tokens - 1):
            if fast is not None and fast.greedy:  # fp32 head: the greedy head, as generate_tokens
                tok = torch.tensor([[fast.argmax(int(tok), prompt_len + i)]])
            elif fast is not None:
                tok = fast(int(tok), prompt_len + i)[:, -1].argmax(-1, keepdim=True)
            else:
                tok = step(tok, torch.tensor([prompt_len + i]), last_only=True)[:, -1].argmax(-1, keepdim=True)
        t2 = time.perf_counter()
    if fast is not None and base == "fp32":  # what a step reads: the layers, and the head (its int8 copy if greedy)
        head = model.output.weight
        layers = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                     if not n.startswith(("tok_embeddings.", "output.")))
        extra["read_gb_per_token"] = (layers + (head.shape[0] * (head.shape[1] + 12) if fast.greedy
                                                else head.numel() * 4)) / 1e9
    return {"prefill_tok_s": prompt_len / (t1 - t0), "decode_tok_s": (new_tokens - 1) / (t2 - t1), **extra}


def _time_transformers(model_name: str, precision: str, prompt_len: int, new_tokens: int, threads: int) -> dict:
    import torch
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    from camelid.config import LlamaConfig
    from camelid.interop.hf import config_to_hf

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = LlamaConfig.from_name(model_name)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = LlamaForCausalLM(HFConfig(**config_to_hf(cfg))).to(dtype).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, prompt_len))
    with torch.inference_mode():
        model(ids[:, :8])
        t0 = time.perf_counter()
        out = model(ids, use_cache=True, logits_to_keep=1)
        t1 = time.perf_counter()
        past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(new_tokens - 1):
            out = model(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        t2 = time.perf_counter()
    return {"prefill_tok_s": prompt_len / (t1 - t0), "decode_tok_s": (new_tokens - 1) / (t2 - t1)}


def _cpu_has_amx() -> bool:
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _time_llamacpp(gguf: str, prompt_len: int, new_tokens: int, threads: int) -> dict:
    import llama_cpp
    from llama_cpp import Llama as LlamaCpp

    if _cpu_has_amx():
        # llama.cpp's AMX/repacked weight buffers crash (general protection fault) on VMs that report AMX
        # without enabling it; its plain CPU buffers are the AVX2/AVX-512 path the figures describe
        default_params = llama_cpp.llama_cpp.llama_model_default_params

        def plain_buffers():  # noqa: ANN202 - returns llama.cpp's ctypes struct
            params = default_params()
            params.use_extra_bufts = False
            return params

        llama_cpp.llama_cpp.llama_model_default_params = plain_buffers

    llm = LlamaCpp(model_path=gguf, n_ctx=prompt_len + new_tokens + 8, n_threads=threads, n_batch=prompt_len,
                   verbose=False)
    ids = [1 + (i * 7919) % 40000 for i in range(prompt_len)]
    llm.eval(ids[:8])
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    t1 = time.perf_counter()
    for _ in range(new_tokens - 1):
        llm.eval([1 + (llm.n_tokens * 31) % 40000])  # decode cost does not depend on which token
    t2 = time.perf_counter()
    return {"prefill_tok_s": prompt_len / (t1 - t0), "decode_tok_s": (new_tokens - 1) / (t2 - t1)}


CAMELID_PRECISIONS = ("fp32-eager", "fp32", "fp16", "int8", "int4")


def _worker(spec: dict) -> None:
    engine = spec["engine"]
    args = (spec["prompt_len"], spec["new_tokens"], spec["threads"])
    if engine == "camelid":
        res = _time_camelid(spec["model"], spec["precision"], *args, checkpoint=spec.get("checkpoint"))
    elif engine == "transformers":
        res = _time_transformers(spec["model"], spec["precision"], *args)
    else:
        res = _time_llamacpp(spec["gguf"], *args)
    res["peak_rss_mib"] = _peak_rss_mib()
    print("BENCH " + json.dumps(res), flush=True)


def _run_one(spec: dict) -> dict:
    code = f"import json; from camelid.cli.bench import _worker; _worker(json.loads({json.dumps(json.dumps(spec))}))"
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH "):
            return json.loads(line[6:])
    why = proc.stderr.strip()[-300:] or f"exit status {proc.returncode}"  # a crash can leave stderr empty
    raise CamelidError(f"benchmark of {spec['engine']} {spec['precision']} failed: {why}")


@app.command()
def bench(
    model: str = typer.Option("smollm2-135m", help="config name; weights are random-init (same speed)"),
    prompt_len: int = typer.Option(512, help="prompt tokens"),
    new_tokens: int = typer.Option(128, help="greedy new tokens"),
    rounds: int = typer.Option(3, help="interleaved rounds; medians are reported"),
    threads: int = typer.Option(os.cpu_count() or 1, help="threads for every engine"),
    engines: str = typer.Option("camelid:fp32-eager,camelid:fp32,camelid:int8,camelid:int4,transformers:fp32",
                                help="comma-separated engine:precision list; llama.cpp:FILE.gguf adds llama.cpp"),
    out: Path = typer.Option(Path("runs/bench"), help="folder for JSON and the PNG chart (benchmarks/results holds "
                                                      "the committed ones; --out there to replace them)"),
) -> None:
    """Measure prefill/decode tok/s and peak RSS of camelid beside other engines, side by side."""
    specs = []
    for item in engines.split(","):
        engine, _, precision = item.strip().partition(":")
        spec = {"engine": engine, "precision": precision, "model": model, "prompt_len": prompt_len,
                "new_tokens": new_tokens, "threads": threads}
        if engine == "llama.cpp":
            if importlib.util.find_spec("llama_cpp") is None:
                print("llama-cpp-python is not installed; skipping the llama.cpp engine", file=sys.stderr)
                continue
            if not Path(precision).is_file():
                raise CamelidError(f"llama.cpp engine: {precision!r} is not a file; give llama.cpp:PATH.gguf")
            spec["gguf"], spec["precision"] = precision, Path(precision).stem.rsplit(".", 1)[-1]
        elif engine == "camelid" and precision.removesuffix("-compile") not in CAMELID_PRECISIONS:
            raise CamelidError(f"camelid engine: unknown precision {precision!r}; choose one of "
                               f"{', '.join(CAMELID_PRECISIONS)} (optionally with -compile)")
        elif engine == "transformers" and precision not in ("fp32", "bf16"):
            raise CamelidError(f"transformers engine: unknown precision {precision!r}; choose fp32 or bf16")
        elif engine not in ("camelid", "transformers", "llama.cpp"):
            raise CamelidError(f"unknown engine {engine!r}; use camelid:P, transformers:P or llama.cpp:FILE.gguf")
        specs.append(spec)
    results: dict[str, list[dict]] = {f"{s['engine']} {s['precision']}": [] for s in specs}
    bandwidth: list[float] = []
    with tempfile.TemporaryDirectory(prefix="camelid-bench-") as tmp:
        _in_child(_write_checkpoints, specs, tmp)
        _run_rounds(specs, rounds, results, bandwidth)
    _report(model, prompt_len, new_tokens, threads, rounds, specs, results, out, bandwidth)


def _in_child(fn, specs: list[dict], folder: str) -> None:  # noqa: ANN001
    """Run fn(specs, folder) in a fresh interpreter (keeps this process, the parent of every measured run,
    small) and take back the specs it filled in."""
    code = (f"import json, sys; from camelid.cli.bench import {fn.__name__} as f; s = json.loads(sys.argv[1]); "
            f"f(s, sys.argv[2]); print('SPECS ' + json.dumps(s))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(specs), folder], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("SPECS "):
            specs[:] = json.loads(line[6:])
            return
    raise CamelidError(f"writing the quantised benchmark checkpoints failed: {proc.stderr.strip()[-300:]}")


def _write_checkpoints(specs: list[dict], folder: str) -> None:
    """fp16/int8/int4 engines load a quantised checkpoint of the random model (written here, once per mode)."""
    import torch

    from camelid.config import LlamaConfig
    from camelid.model import Llama
    from camelid.variants.quantized import quantize_model, save_quantized

    for s in specs:
        mode = s["precision"].removesuffix("-compile")
        if s["engine"] != "camelid" or mode not in ("fp16", "int8", "int4"):
            continue
        path = Path(folder) / f"{s['model']}-{mode}.safetensors"
        if not path.exists():
            torch.manual_seed(0)
            save_quantized(quantize_model(Llama(LlamaConfig.from_name(s["model"])).eval(), mode), path)
        s["checkpoint"] = str(path)


def _run_rounds(specs: list[dict], rounds: int, results: dict[str, list[dict]], bandwidth: list[float]) -> None:
    """Interleave the engines round by round, each round after a memory-bandwidth reading; an engine that fails
    is reported once and dropped."""
    failed: set[str] = set()
    for r in range(rounds):
        bandwidth.append(_measure_bandwidth(specs[0]["threads"]))
        print(f"round {r + 1}/{rounds} memory read: {bandwidth[-1]:.1f} GB/s", file=sys.stderr, flush=True)
        for s in specs:
            key = f"{s['engine']} {s['precision']}"
            if key in failed:
                continue
            try:
                res = _run_one(s)
            except CamelidError as e:
                print(f"skipping {key}: {e}", file=sys.stderr, flush=True)
                failed.add(key)
                del results[key]
                continue
            results[key].append(res)
            print(f"round {r + 1}/{rounds} {key}: {res}", file=sys.stderr, flush=True)
    if not results:
        raise CamelidError("every engine failed; see the messages above")


def _report(model: str, prompt_len: int, new_tokens: int, threads: int, rounds: int, specs: list[dict],
            results: dict[str, list[dict]], out: Path, bandwidth: list[float]) -> None:
    rows = {k: {m: statistics.median(x[m] for x in v) for m in v[0]} for k, v in results.items()}
    base = rows.get("transformers fp32")
    table = Table(title=f"{model}, batch 1, {prompt_len}-token prompt, {new_tokens} greedy tokens, {threads} threads")
    for col in ("engine", "prefill tok/s", "decode tok/s", "peak RSS MiB", "decode vs transformers fp32",
                "compile s"):
        table.add_column(col)
    for k, v in rows.items():
        ratio = f"{v['decode_tok_s'] / base['decode_tok_s']:.2f}x" if base else "-"
        table.add_row(k, f"{v['prefill_tok_s']:.0f}", f"{v['decode_tok_s']:.1f}", f"{v['peak_rss_mib']:.0f}", ratio,
                      f"{v['compile_s']:.0f}" if "compile_s" in v else "-")
    Console().print(table)
    from camelid.config import LlamaConfig

    read = statistics.median(bandwidth)
    weight_gb = LlamaConfig.from_name(model).num_params() * 4 / 1e9  # fp32: every weight read once per token
    # bytes per token: camelid's step reports its own (its greedy head reads an int8 copy of the head)
    per_token = {k: v.get("read_gb_per_token", weight_gb) for k, v in rows.items()
                 if k.split()[-1].split("-")[0] in ("fp32", "F32")}
    streamed = {k: rows[k]["decode_tok_s"] * gb for k, gb in per_token.items()}
    print(f"memory read bandwidth: {read:.1f} GB/s (median of {len(bandwidth)}, {threads} threads); fp32 decode "
          "streams " + ", ".join(f"{k} {streamed[k]:.1f} GB/s ({streamed[k] / read:.0%}, {gb * 1e3:.0f} MB a token)"
                                 for k, gb in per_token.items()))
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: specs[0][k] for k in ("model", "prompt_len", "new_tokens", "threads")} | {"rounds": rounds}
    body = json.dumps({"settings": settings, "medians": rows, "runs": results,
                       "read_bandwidth_gb_s": {"median": read, "rounds": bandwidth},
                       "fp32_weight_gb_s": streamed}, indent=2)
    atomic_write(out / "bench.json", lambda tmp: tmp.write_text(body))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.5))
        ax.barh(list(rows), [v["decode_tok_s"] for v in rows.values()])
        ax.set_xlabel("decode tok/s (batch 1)")
        fig.tight_layout()
        atomic_write(out / "bench.png", lambda tmp: fig.savefig(tmp, format="png"))
    except ImportError:
        print("matplotlib not installed; skipped the chart", file=sys.stderr)
