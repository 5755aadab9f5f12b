"""Metrics, defined as lm-evaluation-harness defines them (so the two agree to the example)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value, the first one on ties (numpy.argmax's rule, which lm-eval uses)."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def multiple_choice(loglikelihoods: Sequence[float], choices: Sequence[str], answer: int) -> dict[str, float]:
    """acc: the most likely choice is right. acc_norm: the same after dividing each choice's log-likelihood
    by its length in characters (lm-eval's acc_norm). acc_bytes: by its length in UTF-8 bytes."""
    chars = [ll / len(c) for ll, c in zip(loglikelihoods, choices, strict=True)]
    nbytes = [ll / len(c.encode("utf-8")) for ll, c in zip(loglikelihoods, choices, strict=True)]
    return {"acc": float(argmax(loglikelihoods) == answer), "acc_norm": float(argmax(chars) == answer),
            "acc_bytes": float(argmax(nbytes) == answer)}


def bits_per_byte(loglikelihood: float, n_bytes: int) -> float:
    """-log2 p(text) / bytes: a tokenizer-independent measure (lm-eval's bits_per_byte)."""
    return -loglikelihood / (n_bytes * math.log(2))


def exact_match(prediction: str, reference: str) -> float:
    """1 when the two agree after stripping surrounding whitespace."""
    return float(prediction.strip() == reference.strip())


_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """rouge_score's default tokenizer: lowercase, anything but [a-z0-9] separates words (no stemming)."""
    return [t for t in _NON_ALNUM.sub(" ", text.lower()).split() if t]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1: the longest common subsequence of words against both lengths (as rouge_score computes it)."""
    pred, ref = rouge_tokens(prediction), rouge_tokens(reference)
    if not pred or not ref:
        return 0.0
    previous = [0] * (len(ref) + 1)
    for p in pred:
        current = [0]
        for j, r in enumerate(ref):
            current.append(previous[j] + 1 if p == r else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)
