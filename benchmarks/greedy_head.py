"""The greedy head beside the whole fp32 head: batch-1 fp32 decode steps, and how many rows the bound keeps.

A/B in one process: the same C++ decode step returning the logits (the argmax taken from them) and returning
the argmax through the greedy head (`DecodeStep.argmax`), in interleaved rounds of steps after a 512-token
prompt; tok/s medians and the median of the per-round ratios. With --gguf, the model is that F32 file's (real
weights) and the script also counts the candidate rows (the rows the bound keeps for an fp32 product) for a few
prompts, with a float64 replica of the step's bound.

    python benchmarks/greedy_head.py --threads 2 --rounds 12
    python benchmarks/greedy_head.py --threads 2 --rounds 12 --gguf /tmp/ggufs/SmolLM2-135M-Instruct.F32.gguf

(`camelid convert smollm2-135m-instruct /tmp/ggufs/SmolLM2-135M-Instruct.F32.gguf --to gguf --qtype f32`
writes the file.)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

PROMPTS = {
    "chat": "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "text": "The quick brown fox jumps over the lazy dog. The quick brown fox",
}


def candidates(model: torch.nn.Module, ids: list[int]) -> int:
    """Rows the bound keeps for the prompt's last position (float64 replica of decode_step.cpp's greedy_share)."""
    from camelid.variants.decode_step import greedy_head

    q, scale, err, wq = greedy_head(model.output.weight)
    with torch.inference_mode():
        model.setup_cache(1, len(ids) + 1)
        h = model.hidden_states(torch.tensor([ids]), torch.arange(len(ids)))[0, -1].double()
        model.clear_cache()
    approx = (q.double() * scale.double()[:, None]) @ h
    nu = (h.numel() + 2) * 2.0 ** -24
    bound = h.norm() * err.double() + 2 * nu / (1 - nu) * h.norm() * wq.double()
    return int((approx + bound >= (approx - bound).max()).sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--gguf", help="an F32 GGUF file (real weights); default: random SmolLM2-135M weights")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import camelid
    from camelid.ops import native
    from camelid.variants.decode_step import decode_step

    native.module()
    if args.gguf:
        llm = camelid.load(args.gguf, quantize="fp32")
        model = llm.model
        prompts = {k: llm.tokenizer.encode(v) for k, v in PROMPTS.items()}
        prompts["synthetic (memory.py's ids)"] = [1 + (i * 7919) % 40000 for i in range(64)]
        for name, ids in prompts.items():
            print(f"candidate rows, {name}: {candidates(model, ids)} of {model.config.vocab_size}")
    else:
        from camelid.config import LlamaConfig
        from camelid.model import Llama
        from camelid.variants.quantized import quantize_model

        model = quantize_model(Llama(LlamaConfig.from_name("smollm2-135m")).eval(), "fp32")
    start = 512
    with torch.inference_mode():
        model.setup_cache(1, start + args.steps + 1)
        model(torch.randint(0, 40000, (1, start)), torch.arange(start), last_only=True)
        step = decode_step(model, greedy=True)
        if step is None or not step.greedy:
            raise SystemExit("no greedy head here (no C++ kernels, or the head is not fp32)")
        step(5, start)
        step.argmax(5, start)
        speed: dict[str, list[float]] = {"whole head": [], "greedy head": []}
        for _ in range(args.rounds):
            for kind in speed:
                tok = 100
                t = time.perf_counter()
                for i in range(args.steps):
                    if kind == "whole head":
                        tok = int(step(tok, start + i)[0, -1].argmax())
                    else:
                        tok = step.argmax(tok, start + i)
                speed[kind].append(args.steps / (time.perf_counter() - t))
    ratios = [g / w for w, g in zip(speed["whole head"], speed["greedy head"], strict=True)]
    print(f"{native.cpu_name()}, {args.threads} threads, {args.rounds} rounds of {args.steps} steps from position "
          f"{start}: whole head {statistics.median(speed['whole head']):.1f} tok/s, greedy head "
          f"{statistics.median(speed['greedy head']):.1f} tok/s; per-round ratio median "
          f"{statistics.median(ratios):.3f} ({min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
