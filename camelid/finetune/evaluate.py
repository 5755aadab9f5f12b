"""Scoring a fine-tune on held-out instructions: greedy answers, exact match and ROUGE-L against the references.

exact_match follows Super-NaturalInstructions' metric (lower-case, punctuation and English articles removed,
whitespace collapsed, then equal); rouge_l is ROUGE-L's F-measure (longest common subsequence of words) with the
tokenisation of Google's rouge-score package (lower-case, runs of characters other than a-z and 0-9 split
words), without stemming. tests/finetune/test_evaluate.py checks rouge_l against rouge-score.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from typing import Any

from camelid.finetune.data import Message

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NOT_WORD = re.compile(r"[^a-z0-9]+")


def normalize_answer(text: str) -> str:
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def rouge_words(text: str) -> list[str]:
    return _NOT_WORD.sub(" ", text.lower()).split()


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure: 2PR / (P + R) of the longest common subsequence of words."""
    p, r = rouge_words(prediction), rouge_words(reference)
    if not p or not r:
        return 0.0
    prev = [0] * (len(r) + 1)
    for a in p:
        cur = [0] * (len(r) + 1)
        for j, b in enumerate(r, 1):
            cur[j] = prev[j - 1] + 1 if a == b else max(prev[j], cur[j - 1])
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def score(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean exact match and ROUGE-L over pairs."""
    n = max(1, len(references))
    return {"exact_match": sum(map(exact_match, predictions, references)) / n,
            "rouge_l": sum(map(rouge_l, predictions, references)) / n, "examples": float(len(references))}


def answer_all(llm: Any, prompts: Sequence[list[Message]], max_new_tokens: int = 48,
               progress: bool = True, desc: str = "answers") -> list[str]:
    """The model's greedy reply to each conversation (camelid.LLM.chat), stripped."""
    from tqdm import tqdm

    return [llm.chat(messages, max_new_tokens=max_new_tokens).strip()
            for messages in tqdm(prompts, desc=desc, unit="example", disable=not progress, dynamic_ncols=True)]
