"""Scoring a fine-tune on held-out instructions: greedy answers, exact match and ROUGE-L against the references.

exact_match follows Super-NaturalInstructions' metric (lower-case, punctuation and English articles removed,
whitespace collapsed, then equal); rouge_l is camelid.eval.metrics.rouge_l (ROUGE-L's F-measure with rouge-score's
tokenisation, no stemming). tests/finetune/test_evaluate.py checks it against rouge-score.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from typing import Any

from camelid.eval.metrics import rouge_l
from camelid.finetune.data import Message

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


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
