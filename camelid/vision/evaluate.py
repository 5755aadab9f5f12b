"""A vision model measured the way it is used: answers by greedy generation through the Python API, and the
speed of decoding with an image."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from tqdm import tqdm

from camelid.generate import generate_tokens
from camelid.vision.data import KINDS, Question, Scene
from camelid.vision.image import to_pixels


def answer_accuracy(llm: Any, examples: list[tuple[Scene, Question]], max_new_tokens: int = 32,
                    progress: bool = True) -> dict[str, Any]:
    """Exact match of `llm.generate(question, image=picture)` against each answer, overall and by kind."""
    size = llm.model.vision_config.vit.image_size
    right: dict[str, list[bool]] = {k: [] for k in KINDS}
    mistakes = []
    for scene, q in tqdm(examples, desc="questions", unit="q", disable=not progress):
        answer = llm.generate(q.question, image=scene.render(size), max_new_tokens=max_new_tokens).strip()
        right[q.kind].append(answer == q.answer)
        if answer != q.answer and len(mistakes) < 20:
            mistakes.append({"question": q.question, "answer": answer, "truth": q.answer, "scene": scene.caption()})
    flat = [r for rs in right.values() for r in rs]
    return {"exact_match": sum(flat) / max(1, len(flat)), "questions": len(flat),
            "by_kind": {k: sum(rs) / len(rs) for k, rs in right.items() if rs}, "mistakes": mistakes}


@torch.inference_mode()
def decode_speed(llm: Any, scene: Scene, question: str = "What is in the picture?", new_tokens: int = 32,
                 repeats: int = 3) -> dict[str, float]:
    """Prefill seconds and decode tokens/s (median of `repeats`) for `new_tokens` tokens after a question about
    `scene`, stop tokens ignored; and the context tokens the prompt takes (the image's included)."""
    model, tok = llm.model, llm.tokenizer
    pixels = to_pixels(scene.render(model.vision_config.vit.image_size))
    prefill, decode = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with model.image(pixels):
            ids = model.with_image_tokens(tok.encode(question, add_bos=tok.add_bos))
            tokens = generate_tokens(model, ids, new_tokens)
            next(tokens)
            t1 = time.perf_counter()
            n = sum(1 for _ in tokens)
        t2 = time.perf_counter()
        prefill.append(t1 - t0)
        decode.append(n / (t2 - t1))
    return {"prefill_s": statistics.median(prefill), "decode_tok_s": statistics.median(decode),
            "prompt_tokens": len(ids), "image_tokens": model.image_tokens}
