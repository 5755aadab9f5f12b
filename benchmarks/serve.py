"""Serving benchmark: `camelid serve` against llama.cpp's servers on the same machine and model, in one run.

    python benchmarks/serve.py [--engines camelid:int4,camelid:fp32,llama-server:GGUF,llama-cpp-python:GGUF]
                               [--streams 1,4,8,16] [--max-tokens 128] [--threads 2] [--out benchmarks/results]
    python benchmarks/serve.py steps [--threads 2]       # the batched decode step: C++ rows vs per-layer path
    python benchmarks/serve.py steps --threads 1 --cpu-time  # the same in CPU time (a busy machine's yardstick)
    python benchmarks/serve.py steps --threads 1 --cpu-time --modes int4 --position 300 --spread 1 \
        --no-per-layer --root DIR                        # another checkout's C++ step, to alternate with this one
    python benchmarks/serve.py steps ... --kv-dtypes fp32,fp16   # the step over an fp32 and an fp16 KV cache
    python benchmarks/serve.py steps ... --shared 256 --interleave  # rows sharing a 256-position prefix (read
                                                         # from the first row); int8/int4 weights interleaved
    python benchmarks/serve.py loop [--threads 2] [--kv-dtypes fp16]  # the engine's loop without HTTP: where a
                                                         # step's time goes, and the process's CPU ms per token
    python benchmarks/serve.py prefix [--threads 1] [--cpu-time]  # a prefix-cache hit's prefill against a miss's,
                                                         # in-process (Engine._forward_row), int4

Each engine is started alone (a subprocess on a loopback port), warmed up, then driven by N concurrent streams
(N = 1, 4, 8, 16), each sending streamed chat requests one after another: a shared 256-token system prompt and
a distinct question, greedy, end-of-text banned (logit_bias) so every reply is exactly --max-tokens long.
Metrics are vLLM's benchmark_serving ones: TTFT (request sent -> first content chunk), TPOT ((end - first
chunk) / (tokens - 1)), ITL (between chunks), p50/p99, and the aggregate output tokens per second of each
concurrency level (all tokens / its wall time). Then the prefix cache at one stream: TTFT of a request whose
system prompt was seen before (a hit) against one whose system prompt starts with a fresh nonce (a miss).

Engines:
  camelid:MODE[:OPTS]   `camelid serve smollm2-135m-instruct --quantize MODE --slots 8 --ctx 2048`; OPTS, comma-
                        separated: fp16 or fp32 (--kv-dtype), interleave (--interleave)
  llama-server:GGUF     llama.cpp's server, `-np 8 -c 16384` (8 slots of 2048), continuous batching on; the
                        binary from --llama-server, else `llama-server` on PATH, else the one that
                        `python benchmarks/llama_server.py` built (once, into a cache folder) from the llama.cpp
                        sources that the installed llama-cpp-python's sdist vendors
  llama-cpp-python:GGUF `python -m llama_cpp.server` (pip install 'llama-cpp-python[server]'): one request at a
                        time, no batching
GGUF: the default model's own Q4_1 file (`python -c "import camelid.hub as h; print(h.pull('smollm2-135m-instruct'))"`)
compares with camelid:int4 (4-bit weights in groups of 32 with a scale and a minimum); for fp32,
`camelid convert smollm2-135m-instruct /tmp/SmolLM2-F32.gguf --to gguf --qtype f32`.

Writes OUT/serve.json (settings, machine load, every request's numbers summarised) and OUT/serve.png.
Timing runs belong on a quiet machine: the load average before and after each engine is printed and saved.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
SLOTS, CTX = 8, 2048


# -- one streamed request -------------------------------------------------------------------------------------------
@dataclass
class Result:
    ttft: float
    itl: list[float]
    e2e: float
    tokens: int

    @property
    def tpot(self) -> float:
        return (self.e2e - self.ttft) / max(1, self.tokens - 1)


def stream_chat(port: int, system: str, question: str, max_tokens: int, ban: dict[str, float]) -> Result:
    body = json.dumps({"messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
                       "max_tokens": max_tokens, "temperature": 0, "stream": True, "logit_bias": ban,
                       "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    times, usage = [], None
    for raw in iter(resp.readline, b""):
        line = raw.strip()
        if not line.startswith(b"data: "):
            continue
        if line == b"data: [DONE]":
            break
        chunk = json.loads(line[6:])
        choices = chunk.get("choices") or []
        if choices and (choices[0].get("delta") or {}).get("content"):
            times.append(time.perf_counter())
        if chunk.get("usage"):
            usage = chunk["usage"].get("completion_tokens")
    end = time.perf_counter()
    conn.close()
    if not times:
        raise RuntimeError("no content came back")
    itl = [b - a for a, b in zip(times, times[1:], strict=False)]
    return Result(times[0] - t0, itl, end - t0, usage or len(times))


# -- engines ---------------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(engine: str, threads: int, llama_server: str | None, log: Path) -> tuple[subprocess.Popen, int, str]:
    kind, _, arg = engine.partition(":")
    port = free_port()
    if kind == "camelid":
        # camelid:int4:fp16 serves with --kv-dtype fp16, camelid:int4:interleave (or :fp16,interleave) with
        # --interleave
        mode, _, opts = arg.partition(":")
        kv = next((o for o in opts.split(",") if o in ("fp16", "fp32")), "")
        cmd = [sys.executable, "-m", "camelid", "serve", MODEL, "--quantize", mode or "int4", "--slots", str(SLOTS),
               "--ctx", str(CTX), "--threads", str(threads), "--port", str(port), "--quiet",
               *(["--kv-dtype", kv] if kv else []), *(["--interleave"] if "interleave" in opts.split(",") else [])]
        ready = "/health"
    elif kind == "llama-server":
        binary = llama_server or shutil.which("llama-server") or built_llama_server()
        if not binary:
            raise SystemExit("llama-server not found: build it with `python benchmarks/llama_server.py` or pass "
                             "--llama-server PATH")
        cmd = [binary, "-m", arg, "-np", str(SLOTS), "-c", str(SLOTS * CTX), "-t", str(threads), "-tb", str(threads),
               "--host", "127.0.0.1", "--port", str(port), "-cb"]
        ready = "/health"
    elif kind == "llama-cpp-python":
        # --interrupt_requests False: by default a new request ends the one being streamed
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", arg, "--n_threads", str(threads),
               "--n_ctx", str(CTX), "--host", "127.0.0.1", "--port", str(port), "--interrupt_requests", "False"]
        ready = "/v1/models"
    else:
        raise SystemExit(f"unknown engine {engine!r}")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "wb"), cwd=ROOT)  # noqa: SIM115
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{engine} exited: {log.read_text()[-1500:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", ready)
            if conn.getresponse().status == 200:
                return proc, port, " ".join(cmd)
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"{engine} did not start")


def built_llama_server() -> str | None:
    """The llama-server that benchmarks/llama_server.py built for the installed llama-cpp-python, if any."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from llama_server import binary_path, default_cache, installed_version

    binary = binary_path(installed_version(), default_cache())
    return str(binary) if binary.is_file() else None


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- the workload ------------------------------------------------------------------------------------------------
def system_prompt(tokens: int = 256) -> str:
    """A system prompt of `tokens` SmolLM2 tokens: the opening of Emma (data/austen, public domain)."""
    from camelid.tokenizer import Tokenizer

    tok = Tokenizer.load(MODEL)
    text = (ROOT / "data" / "austen" / "emma.txt").read_text(encoding="utf-8")
    start = text.find("Emma Woodhouse")
    ids = tok.encode("You answer questions about this passage.\n\n" + text[start:start + 4000])[:tokens]
    return tok.decode(ids)


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


@dataclass
class Level:
    streams: int
    requests: int
    tokens: int
    wall_s: float
    tok_s: float
    ttft_p50: float
    ttft_p99: float
    tpot_p50: float
    tpot_p99: float
    itl_p50: float
    itl_p99: float


def run_level(port: int, streams: int, per_stream: int, system: str, max_tokens: int,
              ban: dict[str, float]) -> Level:
    counter = iter(range(10**9))
    lock = threading.Lock()

    def client(_: int) -> list[Result]:
        out = []
        for _ in range(per_stream):
            with lock:
                i = next(counter)
            out.append(stream_chat(port, system, f"Question {i}: what does the passage say about Emma's "
                                                 f"{['home', 'father', 'friends', 'temper'][i % 4]}?",
                                   max_tokens, ban))
        return out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        results = [r for rs in pool.map(client, range(streams)) for r in rs]
    wall = time.perf_counter() - t0
    tokens = sum(r.tokens for r in results)
    itl = [x for r in results for x in r.itl]
    ttft, tpot = [r.ttft for r in results], [r.tpot for r in results]
    return Level(streams, len(results), tokens, wall, tokens / wall, percentile(ttft, 50), percentile(ttft, 99),
                 percentile(tpot, 50), percentile(tpot, 99), percentile(itl, 50), percentile(itl, 99))


def prefix_ttft(port: int, system: str, ban: dict[str, float], rounds: int = 5) -> dict[str, float]:
    """TTFT at one stream: the shared system prompt (cached by now) against fresh ones (a nonce in front)."""
    hits, misses = [], []
    for i in range(rounds):
        misses.append(stream_chat(port, f"Session {uuid.uuid4().hex[:8]}. {system}", f"Question {i}?", 4, ban).ttft)
        hits.append(stream_chat(port, system, f"Question {i}?", 4, ban).ttft)
    hit, miss = statistics.median(hits), statistics.median(misses)
    return {"hit_ttft_s": hit, "miss_ttft_s": miss, "miss_over_hit": miss / hit}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


@dataclass
class EngineRun:
    engine: str
    command: str
    load_before: list[float]
    load_after: list[float] = field(default_factory=list)
    levels: list[Level] = field(default_factory=list)
    prefix: dict[str, float] = field(default_factory=dict)


def bench(args: argparse.Namespace) -> None:
    from camelid.tokenizer import Tokenizer

    system = system_prompt()
    ban = {str(i): -100.0 for i in Tokenizer.load(MODEL).stop_ids}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    streams = [int(s) for s in args.streams.split(",")]
    runs = []
    for engine in args.engines.split(","):
        log = out / f"serve-{engine.split(':')[0]}.log"
        print(f"== {engine}  (load average {load_average()})", flush=True)
        proc, port, command = start(engine, args.threads, args.llama_server, log)
        run = EngineRun(engine, command, load_average())
        try:
            stream_chat(port, system, "Warm up.", 8, ban)
            for n in streams:
                level = run_level(port, n, max(1, args.requests // n) if n < args.requests else 1, system,
                                  args.max_tokens, ban)
                run.levels.append(level)
                print(f"  {n:>2} streams: {level.tok_s:7.1f} tok/s  TTFT p50 {level.ttft_p50 * 1000:7.0f} ms "
                      f"p99 {level.ttft_p99 * 1000:7.0f}  TPOT p50 {level.tpot_p50 * 1000:6.1f} ms  "
                      f"ITL p50 {level.itl_p50 * 1000:6.1f} p99 {level.itl_p99 * 1000:6.1f}", flush=True)
            run.prefix = prefix_ttft(port, system, ban)
            print(f"  prefix: hit TTFT {run.prefix['hit_ttft_s'] * 1000:.0f} ms, miss "
                  f"{run.prefix['miss_ttft_s'] * 1000:.0f} ms ({run.prefix['miss_over_hit']:.1f}x)", flush=True)
        except (RuntimeError, OSError) as e:  # one engine failing must not lose the others' numbers
            print(f"  {engine} failed ({e}); left out of the report (its log: {log})", flush=True)
            continue
        finally:
            stop(proc)
        run.load_after = load_average()
        runs.append(run)
    if not runs:
        raise SystemExit("no engine completed")
    report(runs, streams, args, out)


def report(runs: list[EngineRun], streams: list[int], args: argparse.Namespace, out: Path) -> None:
    from camelid.fileio import atomic_write
    from camelid.train.plot import BarPanel, plot_bars

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    print(f"\n{cpu}, {os.cpu_count()} CPUs, {args.threads} threads per engine, {args.max_tokens} tokens per reply, "
          "256-token shared system prompt")
    header = "| engine | " + " | ".join(f"{n} streams tok/s" for n in streams) + \
        " | TTFT p50 @8 | TPOT p50 @8 | ITL p99 @8 | prefix hit / miss TTFT |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for run in runs:
        at8 = next((lv for lv in run.levels if lv.streams == 8), run.levels[-1])
        print(f"| {run.engine} | " + " | ".join(f"{lv.tok_s:.1f}" for lv in run.levels) +
              f" | {at8.ttft_p50 * 1000:.0f} ms | {at8.tpot_p50 * 1000:.1f} ms | {at8.itl_p99 * 1000:.0f} ms | "
              f"{run.prefix['hit_ttft_s'] * 1000:.0f} / {run.prefix['miss_ttft_s'] * 1000:.0f} ms "
              f"({run.prefix['miss_over_hit']:.1f}x) |")
    for run in runs:
        if run.engine.startswith("camelid") and len(run.levels) > 1:
            one = run.levels[0].tok_s
            print(f"{run.engine}: {' '.join(f'{lv.streams} streams {lv.tok_s / one:.2f}x' for lv in run.levels)} "
                  "its single stream")
    payload = {"cpu": cpu, "threads": args.threads, "max_tokens": args.max_tokens, "streams": streams,
               "runs": [{**asdict(r), "levels": [asdict(lv) for lv in r.levels]} for r in runs]}
    atomic_write(out / "serve.json", lambda p: p.write_text(json.dumps(payload, indent=1)))
    plot_bars([str(n) for n in streams], [
        BarPanel("aggregate output tok/s", {r.engine: [lv.tok_s for lv in r.levels] for r in runs}),
        BarPanel("TTFT p50 (s)", {r.engine: [lv.ttft_p50 for lv in r.levels] for r in runs}, yscale="log"),
        BarPanel("TPOT p50 (ms)", {r.engine: [lv.tpot_p50 * 1000 for lv in r.levels] for r in runs}),
    ], out / "serve.png", title="concurrent streams (x axis): SmolLM2-135M-Instruct, 256-token shared system prompt")
    print(f"wrote {out / 'serve.json'} and {out / 'serve.png'}")


# -- the batched decode step -------------------------------------------------------------------------------------
def steps(args: argparse.Namespace) -> None:
    """ms per decode step for B sequences at different positions: the C++ whole-model step with one row per
    sequence (DecodeStep.rows) against the per-layer forward with positions [B, 1] (C++ GEMVs up to 8 rows,
    the C++ attention call), same model and cache; interleaved rounds, medians. Row r sits at position
    --position + --spread * r. --root imports another checkout of camelid instead (with its own
    CAMELID_KERNEL_CACHE), so two versions can be timed one after the other in separate processes."""
    if args.root:
        sys.path.insert(0, os.path.abspath(args.root))
    import torch

    import camelid
    from camelid.serve.engine import Engine

    torch.set_num_threads(args.threads)
    # CPU time of this thread: with --threads 1 it is the step's whole cost, and other jobs' load barely moves it
    clock = time.thread_time if args.cpu_time else time.perf_counter
    for mode, kv in [(m, kv) for m in args.modes.split(",") for kv in args.kv_dtypes.split(",")]:
        model = camelid.load(MODEL, quantize=mode).model
        context = args.position + args.spread * 15 + 1
        # not started: its cache and step (kv_dtype only where asked, so that older checkouts run too)
        engine = Engine(model, slots=16, context=context, prefix_cache_bytes=0, **kv_option(kv),
                        **({"interleave": True} if args.interleave else {}))
        label = (mode if kv == "default" else f"{mode} {kv} KV") + (f", {args.shared} shared" if args.shared else "")
        one = None
        with torch.inference_mode():
            for b in (1, 4, 8, 16):
                rows, tokens = list(range(b)), [5] * b
                positions = [args.position + args.spread * r for r in rows]
                times: dict[str, list[float]] = {"C++ rows": [], **({"per-layer": []} if args.per_layer else {})}
                # every row after the first reads positions [0, --shared) from the first row (as rows that took
                # the same system prompt from the prefix cache do)
                shared = {"shared": ([0] * b, [0] + [args.shared] * (b - 1))} if args.shared and b > 1 else {}
                step = engine.step
                for _ in range(args.rounds):
                    for name in times:
                        engine.step = step if name == "C++ rows" else None
                        engine.forward_rows(tokens, positions, rows, **shared)  # warm
                        t0 = clock()
                        for _ in range(5):
                            engine.forward_rows(tokens, positions, rows, **shared)
                        times[name].append((clock() - t0) / 5 * 1000)
                engine.step = step
                med = {k: statistics.median(v) for k, v in times.items()}
                one = one or med["C++ rows"]
                print(f"{label} B={b:>2}: C++ rows {med['C++ rows']:6.1f} ms ({b / med['C++ rows'] * 1000:6.1f} tok/s, "
                      f"{med['C++ rows'] / one:.2f} x one row)" + (f"   per-layer {med['per-layer']:6.1f} ms "
                      f"({b / med['per-layer'] * 1000:6.1f} tok/s)" if args.per_layer else ""), flush=True)
    print(f"{camelid.__file__}; load average {load_average()}")


def kv_option(kv: str) -> dict[str, str]:
    """Engine keyword arguments for a --kv-dtypes entry ("default": none, which any camelid version takes)."""
    return {} if kv == "default" else {"kv_dtype": kv}


# -- the engine's loop ---------------------------------------------------------------------------------------------
def loop_once(model: Any, tok: Any, system: str, b: int, max_tokens: int, kv: str = "default") -> dict[str, float]:
    """One batch of `b` sequences through a fresh engine (after a warm-up that fills the prefix cache): the wall
    time, the process's CPU time, the decode steps, and the seconds spent in forward_rows, _choose and
    _forward_row (prefill)."""
    from camelid.serve.engine import Done, Engine, Sequence

    engine = Engine(model, slots=max(b, 8), context=CTX, prefix_cache_bytes=256 << 20, **kv_option(kv))
    spent = {"step": 0.0, "choose": 0.0, "prefill": 0.0}
    cpu = {"step": 0.0, "choose": 0.0, "prefill": 0.0}  # the engine thread's CPU seconds in each

    def timed(name: str, fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                spent[name] += time.perf_counter() - t0
                cpu[name] += time.thread_time() - c0
        return wrapper

    engine.forward_rows = timed("step", engine.forward_rows)  # type: ignore[method-assign]
    engine._choose = timed("choose", engine._choose)  # type: ignore[method-assign]
    if hasattr(engine, "_greedy"):  # a step's greedy rows, picked in one call (sampling too)
        engine._greedy = timed("choose", engine._greedy)  # type: ignore[method-assign]
    engine._forward_row = timed("prefill", engine._forward_row)  # type: ignore[method-assign]
    ban = {int(i): -100.0 for i in tok.stop_ids}
    finished = threading.Semaphore(0)

    def emit(event: Any) -> None:
        if isinstance(event, Done):
            finished.release()

    def chat(question: str) -> list[int]:
        text = tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": question}])
        return tok.encode(text, add_bos=tok.add_bos and not text.startswith(tok.bos_token or "\0"))

    engine.start()
    try:
        engine.submit([Sequence(chat("Hi"), 2, emit)])  # the system prompt into the prefix cache, kernels warm
        finished.acquire()
        spent.update(step=0.0, choose=0.0, prefill=0.0)
        cpu.update(step=0.0, choose=0.0, prefill=0.0)
        steps0 = engine.steps
        seqs = [Sequence(chat(f"Question {i}: what about Emma?"), max_tokens, emit, logit_bias=ban) for i in range(b)]
        t0, c0 = time.perf_counter(), time.process_time()
        engine.submit(seqs)
        for _ in seqs:
            finished.acquire()
        wall, process = time.perf_counter() - t0, time.process_time() - c0
    finally:
        engine.stop()
    return {"wall": wall, "cpu": process, "steps": engine.steps - steps0, **spent,
            **{f"cpu_{k}": v for k, v in cpu.items()}}


def loop(args: argparse.Namespace) -> None:
    """The engine's loop in-process (no HTTP): B sequences with the benchmark's system prompt and end-of-text
    banned, `--max-tokens` each, all admitted at once. Per decode step: wall ms, of which the C++ step
    (forward_rows), sampling and reporting (_choose), and the rest (scheduling, emit); prefill ms per sequence.
    Then the process's CPU time per generated token outside prefill, split the same way (with --threads 1 the
    step's CPU time is all of its work): what a token costs besides the step is the Python loop's overhead."""
    import torch

    import camelid

    torch.set_num_threads(args.threads)
    llm = camelid.load(MODEL, quantize="int4")
    system = system_prompt()
    for kv in args.kv_dtypes.split(","):
        for b in (1, 4, 8, 16):
            r = loop_once(llm.model, llm.tokenizer, system, b, args.max_tokens, kv)
            n, decode = r["steps"], r["wall"] - r["prefill"]
            print(f"{kv} KV B={b:>2}: {b * args.max_tokens / r['wall']:6.1f} tok/s, CPU "
                  f"{r['cpu'] / (b * args.max_tokens) * 1000:5.2f} ms/token; {n} steps of {decode / n * 1000:6.1f} "
                  f"ms = C++ step {r['step'] / n * 1000:6.1f} + choose {r['choose'] / n * 1000:5.2f} + other "
                  f"{(decode - r['step'] - r['choose']) / n * 1000:5.2f}; prefill {r['prefill'] / b * 1000:5.1f} "
                  "ms per sequence", flush=True)
            tokens = b * args.max_tokens
            decode_cpu = r["cpu"] - r["cpu_prefill"]
            print(f"      CPU per generated token (prefill excluded): {decode_cpu / tokens * 1000:5.2f} ms = C++ step "
                  f"{r['cpu_step'] / tokens * 1000:5.2f} + choose {r['cpu_choose'] / tokens * 1000:5.3f} + other "
                  f"{(decode_cpu - r['cpu_step'] - r['cpu_choose']) / tokens * 1000:5.3f}", flush=True)
    print(f"load average {load_average()}")


def prefix(args: argparse.Namespace) -> None:
    """A prefix-cache hit's prefill against a miss's, in-process: the benchmark's chat prompt (256-token system
    prompt, a short question) through `Engine._forward_row` of an int4 engine with the benchmark's slots and
    context, whole (a miss) and after its first 256 positions (a hit: the rest after the cached blocks).
    Median of --rounds, wall or (--cpu-time) the thread's CPU time."""
    import torch

    import camelid
    from camelid.serve.engine import Engine

    torch.set_num_threads(args.threads)
    llm = camelid.load(MODEL, quantize="int4")
    tok, system = llm.tokenizer, system_prompt()

    def chat(question: str) -> list[int]:
        text = tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": question}])
        return tok.encode(text, add_bos=tok.add_bos and not text.startswith(tok.bos_token or "\0"))

    ids = chat("Question 3?")
    cached = len(os.path.commonprefix([ids, chat("Question 4?")])) // 16 * 16  # what another question left cached
    clock = time.thread_time if args.cpu_time else time.perf_counter

    def median_ms(fn: Any) -> float:
        fn()
        times = []
        for _ in range(args.rounds):
            t0 = clock()
            fn()
            times.append(clock() - t0)
        return statistics.median(times) * 1000

    with torch.inference_mode():
        engine = Engine(llm.model, slots=SLOTS, context=CTX)
        engine._forward_row(0, ids[:cached], 0, False)
        hit = median_ms(lambda: engine._forward_row(0, ids[cached:], cached, False))
        miss = median_ms(lambda: engine._forward_row(0, ids, 0, False))
    what = "CPU" if args.cpu_time else "wall"
    print(f"{len(ids)}-token prompt, {args.threads} threads, {what} ms: miss (whole) {miss:.1f}, hit (last "
          f"{len(ids) - cached} after {cached} cached) {hit:.1f}: {miss / hit:.1f}x; load average {load_average()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="?", default="bench", choices=["bench", "steps", "loop", "prefix"])
    parser.add_argument("--engines", default="camelid:int4")
    parser.add_argument("--streams", default="1,4,8,16")
    parser.add_argument("--requests", type=int, default=16, help="requests per concurrency level (at least one "
                                                                 "per stream)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="(steps) interleaved rounds; (prefix) timed runs")
    parser.add_argument("--llama-server", default=None, help="path of the llama-server binary")
    parser.add_argument("--cpu-time", action="store_true",
                        help="(steps, prefix) CPU time of the calling thread, not wall")
    parser.add_argument("--modes", default="int4,fp32", help="(steps) weight formats")
    parser.add_argument("--position", type=int, default=200, help="(steps) the first row's position")
    parser.add_argument("--spread", type=int, default=7, help="(steps) positions between one row and the next")
    parser.add_argument("--kv-dtypes", default="default", help="(steps, loop) the engine's KV cache: fp32, fp16 "
                                                                   "or default (the model's dtype), comma-separated")
    parser.add_argument("--root", default=None, help="(steps) a camelid checkout to import instead of this one")
    parser.add_argument("--shared", type=int, default=0, help="(steps) positions every row shares with the first "
                                                              "(a multiple of 16, below --position)")
    parser.add_argument("--interleave", action="store_true",
                        help="(steps) the engine's interleaved int8/int4 weights for batched steps (--interleave)")
    parser.add_argument("--per-layer", action=argparse.BooleanOptionalAction, default=True,
                        help="(steps) also time the per-layer forward, alternating with the C++ step")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    {"steps": steps, "loop": loop, "bench": bench, "prefix": prefix}[args.what](args)


if __name__ == "__main__":
    main()
