"""Quality cost of the serving engine's fp16 KV cache (`camelid serve --kv-dtype fp16`) on the real
SmolLM2-135M-Instruct, against its fp32 cache, through the same C++ decode step.

    python benchmarks/kv_quality.py [--prompts 20] [--max-tokens 64] [--quantize int4] [--threads 1]
    CAMELID_INT8_ACTIVATIONS=0 python benchmarks/kv_quality.py   # the fp16 rounding alone (fp32 activations)

Prompts: the first test-split example of each of the first --prompts tasks of data/chat's Natural Instructions
(instruction + input as one user message, chat template applied). For each prompt and each cache dtype:
- the greedy reply of up to --max-tokens tokens (stopping at end-of-text), one engine step per token: are the
  fp16 and fp32 replies identical, and where not, at which token do they first differ;
- the log-likelihood of the dataset's reference answer (up to --max-tokens tokens), teacher-forced one token per
  step: the difference of the sums, and the largest difference of one token's log-probability.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"


def prompts(n: int) -> list[tuple[str, str]]:
    """(user message, reference answer) of the first test example of each of the first n tasks."""
    seen: dict[str, tuple[str, str]] = {}
    with gzip.open(ROOT / "data" / "chat" / "natural_instructions.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            ex = json.loads(line)
            if ex["split"] == "test" and ex["task"] not in seen:
                seen[ex["task"]] = (f"{ex['instruction']}\n\n{ex['input']}".strip(), ex["output"])
                if len(seen) == n:
                    break
    return list(seen.values())


def run(engine: Any, prompt: list[int], answer: list[int], max_tokens: int, stop: set[int]
        ) -> tuple[list[int], list[float]]:
    """(greedy reply, log-probabilities of the answer's tokens), each through cache row 0 of a fresh prefill."""
    import torch

    with torch.inference_mode():
        logits = engine._forward_row(0, prompt, 0, all_logits=False)[0, -1]
        reply: list[int] = []
        for pos in range(len(prompt), len(prompt) + max_tokens):
            token = int(logits.argmax())
            reply.append(token)
            if token in stop:
                break
            logits = engine.forward_rows([token], [pos], [0])[0]
        logits = engine._forward_row(0, prompt, 0, all_logits=False)[0, -1]
        logprobs = []
        for i, token in enumerate(answer):
            logprobs.append(float(torch.log_softmax(logits.double(), -1)[token]))
            if i + 1 < len(answer):
                logits = engine.forward_rows([token], [len(prompt) + i], [0])[0]
    return reply, logprobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--quantize", default="int4")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    import torch

    import camelid
    from camelid.serve.engine import Engine

    torch.set_num_threads(args.threads)
    llm = camelid.load(MODEL, quantize=args.quantize)
    tok = llm.tokenizer
    stop = {int(i) for i in tok.stop_ids}
    engines = {kv: Engine(camelid.load(MODEL, quantize=args.quantize, tokenizer=False).model, slots=1, context=2048,
                          prefix_cache_bytes=0, kv_dtype=kv) for kv in ("fp32", "fp16")}
    assert all(e.step is not None for e in engines.values()), "the C++ decode step is not available"
    same, first_diff, d_sum, d_max, n_answer, lengths = 0, [], [], [], 0, []
    for i, (message, answer) in enumerate(prompts(args.prompts)):
        text = tok.apply_chat_template([{"role": "user", "content": message}])
        ids = tok.encode(text, add_bos=tok.add_bos and not text.startswith(tok.bos_token or "\0"))
        answer_ids = tok.encode(answer, add_bos=False)[:args.max_tokens]
        out = {kv: run(e, ids, answer_ids, args.max_tokens, stop) for kv, e in engines.items()}
        (r32, lp32), (r16, lp16) = out["fp32"], out["fp16"]
        diffs = [abs(a - b) for a, b in zip(lp32, lp16, strict=True)]
        same += r32 == r16
        where = next((j for j, (a, b) in enumerate(zip(r32, r16)) if a != b), None)  # noqa: B905 - lengths differ
        if r32 != r16:
            first_diff.append(where if where is not None else min(len(r32), len(r16)))
        d_sum.append(sum(lp16) - sum(lp32))
        d_max.append(max(diffs))
        n_answer += len(answer_ids)
        lengths.append(len(ids))
        print(f"{i:2d}: prompt {len(ids):4d} tokens, reply {len(r32):2d}/{len(r16):2d} tokens "
              f"{'same' if r32 == r16 else f'differs at token {first_diff[-1]}'}; answer {len(answer_ids):2d} tokens "
              f"log-likelihood fp32 {sum(lp32):9.4f} fp16 {sum(lp16):9.4f} (largest token difference "
              f"{max(diffs):.2e})", flush=True)
    print(f"{args.quantize}, {args.prompts} prompts of {min(lengths)}-{max(lengths)} tokens "
          f"(median {statistics.median(lengths):.0f}): greedy replies identical {same}/{args.prompts}"
          + (f" (the others first differ at tokens {sorted(first_diff)})" if first_diff else "")
          + f"; answer log-likelihood ({n_answer} tokens) fp16 - fp32: sum {sum(d_sum):+.4f}, per prompt "
          f"largest |difference| {max(abs(d) for d in d_sum):.4f}, largest per-token |difference| {max(d_max):.2e}; "
          f"load average {[round(x, 2) for x in os.getloadavg()]}")


if __name__ == "__main__":
    main()
