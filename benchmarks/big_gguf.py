"""An 8B-class model on a small machine: a Llama-3-8B-shaped GGUF with random weights, run by camelid and llama.cpp.

The file is written tensor by tensor with the `gguf` library (Q4_0 or Q8_0 blocks of random codes with small
scales, Llama 3's vocabulary from camelid's cache so that llama.cpp accepts it), never whole in memory. Then
each engine, in its own process, loads it and decodes a few tokens after a short prompt, and reports its peak
resident memory (VmHWM) and decode speed; the runs alternate. Random weights cost what real ones cost.

    python benchmarks/big_gguf.py --qtype q4_0 --dir /tmp/big --rounds 2 --threads 2

camelid loads Q4_0 as int4 (its blocks taken as they are) and Q8_0 as int8 (one scale per row, re-quantised
one slice of rows at a time). Check `free -g` first: each run needs the file's size in memory, plus the page
cache. The file is kept for later runs (`--keep`), else deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np
from memory import run

SHAPE = dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, intermediate_size=14336,
             rope_theta=500000.0, max_seq_len=8192, norm_eps=1e-5)
MODES = {"q4_0": "int4", "q8_0": "int8"}


def _blocks(rows: int, width: int, qtype: str, rng: np.random.Generator) -> np.ndarray:
    """Random blocks of 32 weights: an fp16 scale giving weights of about 0.02 standard deviation, then codes."""
    import gguf

    kind = gguf.GGMLQuantizationType[qtype.upper()]
    size = gguf.GGML_QUANT_SIZES[kind][1]
    data = rng.integers(0, 256, (rows, width // 32, size), dtype=np.uint8)
    scale = 0.02 / (4.6 if qtype == "q4_0" else 73.0)  # std of the codes: uniform 4-bit - 8, uniform int8
    data[..., 0:2] = np.frombuffer(np.float16(scale).tobytes(), np.uint8)
    return data.reshape(rows, -1)


def write(path: Path, qtype: str) -> None:
    import gguf
    from tqdm import tqdm

    from camelid import hub
    from camelid.tokenizer import Tokenizer

    s = SHAPE
    kind = gguf.GGMLQuantizationType[qtype.upper()]
    tokenizer = Tokenizer.load(hub.pull("llama3-tokenizer", quiet=True))
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_name("random-llama3-8b-shape")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0 if qtype == "q4_0" else gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_vocab_size(s["vocab_size"])
    w.add_context_length(s["max_seq_len"])
    w.add_embedding_length(s["dim"])
    w.add_block_count(s["n_layers"])
    w.add_feed_forward_length(s["intermediate_size"])
    w.add_head_count(s["n_heads"])
    w.add_head_count_kv(s["n_kv_heads"])
    w.add_rope_dimension_count(s["dim"] // s["n_heads"])
    w.add_rope_freq_base(s["rope_theta"])
    w.add_layer_norm_rms_eps(s["norm_eps"])
    tokenizer.write_gguf(w)
    d, f, kv = s["dim"], s["intermediate_size"], s["n_kv_heads"] * (s["dim"] // s["n_heads"])
    tensors: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (s["vocab_size"], d))]
    for i in range(s["n_layers"]):
        tensors += [(f"blk.{i}.attn_norm.weight", (d,)), (f"blk.{i}.attn_q.weight", (d, d)),
                    (f"blk.{i}.attn_k.weight", (kv, d)), (f"blk.{i}.attn_v.weight", (kv, d)),
                    (f"blk.{i}.attn_output.weight", (d, d)), (f"blk.{i}.ffn_norm.weight", (d,)),
                    (f"blk.{i}.ffn_gate.weight", (f, d)), (f"blk.{i}.ffn_up.weight", (f, d)),
                    (f"blk.{i}.ffn_down.weight", (d, f))]
    tensors += [("output_norm.weight", (d,)), ("output.weight", (s["vocab_size"], d))]
    size = gguf.GGML_QUANT_SIZES[kind][1]
    for name, shape in tensors:
        if len(shape) == 1:
            w.add_tensor_info(name, shape, np.dtype(np.float32), shape[0] * 4, raw_dtype=gguf.GGMLQuantizationType.F32)
        else:
            nbytes = shape[0] * shape[1] // 32 * size
            w.add_tensor_info(name, (shape[0], shape[1] // 32 * size), np.dtype(np.uint8), nbytes, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for _name, shape in tqdm(tensors, desc=f"writing {path.name}", unit="tensor"):
        w.write_tensor_data(np.ones(shape, np.float32) if len(shape) == 1 else _blocks(*shape, qtype, rng))
    w.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--qtype", choices=sorted(MODES), default="q4_0")
    p.add_argument("--dir", default="/tmp/camelid-big-gguf")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--new", type=int, default=8)
    p.add_argument("--engines", default="camelid,llama.cpp", help="as memory.py's (camelid@DIR: another checkout)")
    p.add_argument("--keep", action="store_true", help="keep the GGUF file for the next run")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "big_gguf.json"))
    args = p.parse_args()
    path = Path(args.dir) / f"random-llama3-8b.{args.qtype.upper()}.gguf"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        write(tmp, args.qtype)
        tmp.rename(path)
    print(f"{path}: {path.stat().st_size / 2**30:.2f} GiB", file=sys.stderr)
    mode = MODES[args.qtype]
    runs: dict[str, list[dict]] = {engine: [] for engine in args.engines.split(",")}
    loads = []
    for r in range(args.rounds):
        for engine in runs:
            res = run(engine, path, mode, args, vocab=120000, tokenizer=False)
            runs[engine].append(res)
            print(f"round {r + 1}: {engine}: {res}", file=sys.stderr, flush=True)
        loads.append(os.getloadavg()[0])
    med = {e: {k: statistics.median(x[k] for x in v) for k in v[0]} for e, v in runs.items()}
    ref = med.get("llama.cpp", next(iter(med.values())))
    print(f"\n{path.name} ({path.stat().st_size / 2**30:.2f} GiB), {args.threads} threads, {args.prompt}-token "
          f"prompt, {args.new} new tokens, median of {args.rounds} alternating rounds; load average after each "
          "round: " + " / ".join(f"{x:.1f}" for x in loads))
    print("| engine | peak RSS MiB | load s | decode tok/s | peak vs llama.cpp | decode vs llama.cpp |")
    print("|---|---|---|---|---|---|")
    for engine, m in med.items():
        label = f"{engine} ({mode})" if engine.startswith("camelid") else engine
        print(f"| {label} | {m['peak_rss_mib']:.0f} | {m['load_s']:.1f} | {m['decode_tok_s']:.2f} | "
              f"{m['peak_rss_mib'] / ref['peak_rss_mib']:.2f}x | {m['decode_tok_s'] / ref['decode_tok_s']:.2f}x |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": vars(args), "file": str(path), "load_average": loads, "runs": runs,
                               "medians": med}, indent=1))
    if not args.keep:
        path.unlink()


if __name__ == "__main__":
    main()
