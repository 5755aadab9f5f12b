"""Peak memory of loading a GGUF file and generating from it, camelid beside llama.cpp, one process per run.

Each run is a fresh subprocess that imports its engine, loads the file, runs a prompt and decodes greedily; it
reports its own peak resident memory (/proc/self/status VmHWM: anonymous memory and the file pages it maps),
the resident memory after the imports alone, the load time and decode tok/s. Rounds interleave the engines;
the table gives medians. Engines per file:

    camelid       camelid.load(file, quantize=MODE): built tensor by tensor in its final format
    camelid-old   load_gguf(file) to fp32, then quantize_model(model, MODE): the dequantise-then-quantise path
    camelid@DIR   camelid as another checkout at DIR has it (e.g. `git worktree add DIR main`), to compare
                  two versions in one run
    llama.cpp     llama-cpp-python's Llama(file) with its default settings (except on CPUs that report AMX,
                  where its AMX/repacked buffers crash and are turned off, as `camelid bench` does)

    python benchmarks/memory.py --rounds 5 --threads 2 \\
        --files "fp32=/tmp/ggufs/SmolLM2-135M-Instruct.F32.gguf,int8=/tmp/ggufs/SmolLM2-135M-Instruct.Q8_0.gguf,\\
int4=PATH/SmolLM2-135M-Instruct.Q4_1.gguf"

(`camelid convert smollm2-135m-instruct /tmp/ggufs/SmolLM2-135M-Instruct.F32.gguf --to gguf --qtype f32` writes
the F32 and Q8_0 files.) Writes results/memory.json. `--stages` instead runs camelid once in this process and
prints its memory after each stage (imports, vocabulary, model, prompt, generation).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _child(engine: str, path: str, mode: str, prompt_len: int, new_tokens: int, threads: int,
           vocab: int = 40000, tokenizer: bool = True) -> dict:
    """One run in this (fresh) process: load, prompt, decode; `tokenizer=False` for files without a vocabulary."""
    ids = [1 + (i * 7919) % vocab for i in range(prompt_len)]
    if engine.startswith("camelid"):
        import torch

        import camelid  # noqa: F401 - counted in the imports' memory
        from camelid.generate import generate_tokens
        from camelid.ops import native

        torch.set_num_threads(threads)
        native.module()  # the kernels load before the clock starts, as in a warm `camelid generate`
        imported = _status_mib("VmRSS")
        t0 = time.perf_counter()
        if engine == "camelid":
            llm = camelid.load(path, quantize=mode, tokenizer=tokenizer)  # as a user loads it, and keeps it
            model = llm.model
        else:
            from camelid.interop.gguf import load_gguf
            from camelid.tokenizer import Tokenizer
            from camelid.variants.quantized import quantize_model

            vocabulary = Tokenizer.from_gguf(path)  # noqa: F841 - kept, as camelid.load keeps it
            model = quantize_model(load_gguf(path)[1], mode).eval()
        loaded = time.perf_counter()
        ids = [i % model.config.vocab_size for i in ids]
        n = 0
        with torch.inference_mode():
            for _ in generate_tokens(model, ids, new_tokens, stop_ids=()):
                n += 1
                if n == 1:
                    t1 = time.perf_counter()
        t2 = time.perf_counter()
    else:
        import llama_cpp
        from llama_cpp import Llama as LlamaCpp

        if "amx_tile" in Path("/proc/cpuinfo").read_text():  # see camelid/cli/bench.py
            default_params = llama_cpp.llama_cpp.llama_model_default_params

            def plain_buffers():  # noqa: ANN202 - llama.cpp's ctypes struct
                params = default_params()
                params.use_extra_bufts = False
                return params

            llama_cpp.llama_cpp.llama_model_default_params = plain_buffers
        imported = _status_mib("VmRSS")
        t0 = time.perf_counter()
        llm = LlamaCpp(model_path=path, n_ctx=prompt_len + new_tokens + 8, n_threads=threads, n_batch=prompt_len,
                       verbose=False)
        loaded = time.perf_counter()
        llm.eval(ids)
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            llm.eval([1 + (llm.n_tokens * 31) % vocab])
        t2 = time.perf_counter()
    return {"peak_rss_mib": _status_mib("VmHWM"), "imports_rss_mib": imported, "load_s": loaded - t0,
            "decode_tok_s": (new_tokens - 1) / (t2 - t1)}


def stages(path: str, mode: str, prompt_len: int, new_tokens: int, threads: int) -> None:
    """Where camelid's memory goes: VmRSS (anonymous / file pages) and the peak after each stage of one run."""
    def show(stage: str) -> None:
        v = {k: _status_mib(k) for k in ("VmHWM", "VmRSS", "RssAnon", "RssFile")}
        print(f"| {stage} | {v['VmRSS']:.0f} | {v['RssAnon']:.0f} | {v['RssFile']:.0f} | {v['VmHWM']:.0f} | "
              f"{len(sys.modules)} |", flush=True)

    print("| stage | VmRSS MiB | anonymous | file pages | peak (VmHWM) | Python modules |\n|---|---|---|---|---|---|")
    show("python")
    import torch

    show("import torch")
    from camelid.generate import generate_tokens
    from camelid.interop.gguf import load_gguf
    from camelid.llm import model_tokenizer
    from camelid.ops import native

    torch.set_num_threads(threads)
    native.module()
    show("camelid, its C++ kernels")
    tokenizer = model_tokenizer(Path(path))  # noqa: F841 - kept, as camelid.load keeps it
    show("the vocabulary")
    model = load_gguf(path, quantize=mode)[1]
    show(f"the model ({mode})")
    ids = [(1 + (i * 7919) % 40000) % model.config.vocab_size for i in range(prompt_len)]
    for n, _ in enumerate(generate_tokens(model, ids, new_tokens, stop_ids=())):
        if n == 0:
            show(f"{prompt_len}-token prompt")
    show(f"{new_tokens} tokens")


def run(engine: str, path: str, mode: str, args: argparse.Namespace, **options: object) -> dict:
    """_child in a fresh interpreter (its peak RSS is its own); options: _child's vocab and tokenizer."""
    engine, _, checkout = engine.partition("@")
    path = str(Path(path).resolve())
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from memory import _child; "
            f"print('MEMORY ' + json.dumps(_child({engine!r}, {path!r}, {mode!r}, {args.prompt}, {args.new}, "
            f"{args.threads}, **{options!r})))")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    if checkout:  # run in it: its camelid package comes before the installed one
        checkout = str(Path(checkout).resolve())
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=checkout or None)
    for line in proc.stdout.splitlines():
        if line.startswith("MEMORY "):
            return json.loads(line[7:])
    raise SystemExit(f"{engine} {mode} {path} failed: {proc.stderr.strip()[-400:] or proc.returncode}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", required=True, help="MODE=PATH,...: camelid's mode (fp32, int8, int4) for each GGUF")
    p.add_argument("--engines", default="camelid,camelid-old,llama.cpp")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "memory.json"))
    p.add_argument("--stages", action="store_true", help="instead: camelid's memory after each stage, this process, "
                   "the first of --files")
    args = p.parse_args()
    files = [tuple(item.split("=", 1)) for item in args.files.split(",")]
    if args.stages:
        stages(files[0][1], files[0][0], args.prompt, args.new, args.threads)
        return
    engines = args.engines.split(",")
    runs: dict[str, list[dict]] = {}
    loads = []
    for r in range(args.rounds):
        for mode, path in files:
            for engine in engines:
                key = f"{engine} {mode} {Path(path).name}"
                res = run(engine, path, mode, args)
                runs.setdefault(key, []).append(res)
                print(f"round {r + 1}: {key}: {res['peak_rss_mib']:.0f} MiB peak, {res['decode_tok_s']:.1f} tok/s",
                      file=sys.stderr, flush=True)
        loads.append(os.getloadavg()[0])
    print(f"\n{os.uname().nodename}, {args.threads} threads, {args.prompt}-token prompt, {args.new} new tokens, "
          f"median of {args.rounds} interleaved rounds; load average after each round: "
          + " / ".join(f"{x:.1f}" for x in loads))
    print("| engine | file | peak RSS MiB (each round) | median | after imports MiB | load s | decode tok/s | "
          "peak vs llama.cpp |")
    print("|---|---|---|---|---|---|---|---|")
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
    for mode, path in files:
        ref = med.get(f"llama.cpp {mode} {Path(path).name}")
        for engine in engines:
            m = med[f"{engine} {mode} {Path(path).name}"]
            vs = f"{m['peak_rss_mib'] - ref['peak_rss_mib']:+.0f} MiB" if ref and engine != "llama.cpp" else ""
            label = f"{engine} ({mode})" if engine.startswith("camelid") else engine
            rounds = " / ".join(f"{r['peak_rss_mib']:.0f}" for r in runs[f"{engine} {mode} {Path(path).name}"])
            print(f"| {label} | {Path(path).name} | {rounds} | {m['peak_rss_mib']:.0f} | {m['imports_rss_mib']:.0f} | "
                  f"{m['load_s']:.2f} | {m['decode_tok_s']:.1f} | {vs} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": vars(args), "load_average": loads, "runs": runs, "medians": med},
                              indent=1))


if __name__ == "__main__":
    main()
