"""Quality cost of camelid's weight-only quantisation on the real SmolLM2-135M-Instruct weights.

Usage: python benchmarks/quality.py PATH/SmolLM2-135M-Instruct.Q4_1.gguf [TEXT_FILE]

The only copy of the default model on this machine is llama.cpp's Q4_1 GGUF, so the "fp32" reference here is
that file dequantised to fp32 (exactly representable, so it is a real fp32 model); int8/int4 are camelid's
re-quantisation of it. Reports perplexity on held-out text and greedy-token agreement with fp32.
The loader below is a stand-in until camelid.interop.gguf lands.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize

from camelid.config import LlamaConfig
from camelid.model import Llama
from camelid.variants.quantized import quantize_model

NAMES = {"attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
         "attn_output": "attention.wo", "ffn_gate": "feed_forward.w1", "ffn_up": "feed_forward.w3",
         "ffn_down": "feed_forward.w2", "attn_norm": "attention_norm", "ffn_norm": "ffn_norm"}


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp stores q/k rows interleaved per head (Meta layout); camelid uses HF's rotate-half layout."""
    out, inp = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def load(path: str) -> Llama:
    reader = GGUFReader(path)
    cfg = LlamaConfig.from_name("smollm2-135m")
    model = Llama(cfg).eval()
    state = {}
    for t in reader.tensors:
        w = torch.from_numpy(np.ascontiguousarray(dequantize(t.data, t.tensor_type)).copy()).float()
        w = w.reshape([int(d) for d in reversed(t.shape)])
        name = t.name.removesuffix(".weight")
        if name == "token_embd":
            key = "tok_embeddings"
        elif name == "output_norm":
            key = "norm"
        elif name == "output":
            key = "output"
        else:
            _, i, kind = name.split(".")
            key = f"layers.{i}.{NAMES[kind]}"
            if kind == "attn_q":
                w = unpermute(w, cfg.n_heads)
            elif kind == "attn_k":
                w = unpermute(w, cfg.n_kv_heads)
        state[key + ".weight"] = w
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model


@torch.inference_mode()
def perplexity(model: Llama, ids: torch.Tensor, window: int = 512) -> float:
    nll, n = 0.0, 0
    for s in range(0, ids.numel() - 1, window):
        chunk = ids[s: s + window + 1][None]
        logits = model(chunk[:, :-1])
        nll += torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
        n += chunk.shape[1] - 1
    return float(np.exp(nll / n))


@torch.inference_mode()
def step_perplexity(model: Llama, ids: torch.Tensor, int8_activations: bool, window: int = 512) -> float | None:
    """Perplexity with every token fed through the one-call C++ decode step (the path generation uses), so
    the int8-activation kernels' error shows; None where the step cannot run."""
    from camelid.variants.decode_step import decode_step

    step = decode_step(model, int8_activations=int8_activations)
    if step is None:
        return None
    nll, n = 0.0, 0
    for s in range(0, ids.numel() - 1, window):
        chunk = ids[s: s + window + 1].tolist()
        model.setup_cache(1, len(chunk))
        for pos in range(len(chunk) - 1):
            logits = step(chunk[pos], pos)[0, -1]
            nll -= torch.log_softmax(logits, -1)[chunk[pos + 1]].item()
            n += 1
        model.clear_cache()
    return float(np.exp(nll / n))


def _agreement(ref_out: list[list[int]], outs: list[list[int]]) -> list[int]:
    return [next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
            for a, b in zip(ref_out, outs, strict=True)]


def main() -> None:
    from transformers import AutoTokenizer

    from camelid.generate import generate

    gguf_path = sys.argv[1]
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    tok = AutoTokenizer.from_pretrained(str(gguf_path).rsplit("/", 1)[0], gguf_file=gguf_path.rsplit("/", 1)[1])
    text_path = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).with_name("heldout.txt")
    text = text_path.read_text()
    ids = torch.tensor(tok(text)["input_ids"])[:2048]
    base = load(gguf_path)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
               for q in ("What is the capital of France?", "Write a haiku about camels.",
                         "Explain what a KV cache is.", "List three prime numbers.")]
    prompts = [p if isinstance(p, list) else p["input_ids"] for p in prompts]
    ref_out = [generate(base, p, 64) for p in prompts]
    fused = quantize_model(copy.deepcopy(base), "fp32")
    report = {"fp32": {"ppl": perplexity(base, ids), "step_ppl_fp32_activations": step_perplexity(fused, ids, False)}}
    print(report, flush=True)
    for label, mode, head in (("int8", "int8", None), ("int4 (int8 head)", "int4", "int8"),
                              ("int4 (int4 head)", "int4", "int4")):
        q = quantize_model(copy.deepcopy(base), mode, head=head)
        outs = [generate(q, p, 64) for p in prompts]  # decode steps with int8 activations (the default)
        os.environ["CAMELID_INT8_ACTIVATIONS"] = "0"
        outs_f32 = [generate(q, p, 64) for p in prompts]
        del os.environ["CAMELID_INT8_ACTIVATIONS"]
        report[label] = {"ppl": perplexity(q, ids),
                         "step_ppl_fp32_activations": step_perplexity(q, ids, False),
                         "step_ppl_int8_activations": step_perplexity(q, ids, True),
                         "greedy_prefix_agreement_tokens": _agreement(ref_out, outs),
                         "greedy_prefix_agreement_tokens_fp32_activations": _agreement(ref_out, outs_f32),
                         "exact_outputs": sum(a == b for a, b in zip(ref_out, outs, strict=True))}
        print(label, report[label], flush=True)
    report["eval_tokens"] = int(ids.numel())
    print(tok.decode(ref_out[0]))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
