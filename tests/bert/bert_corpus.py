"""A tiny corpus with something to learn for MLM and NSP (`from bert_corpus import synthetic_text`)."""

from __future__ import annotations

import random

ANIMALS = ["cat", "dog", "llama", "camel", "horse", "sheep"]
PLACES = ["mat", "field", "barn", "hill", "road", "river"]
VERBS = ["sat on", "ran to", "slept by", "looked at"]


def synthetic_text(seed: int, n_docs: int = 6, n_sent: int = 40) -> str:
    """Documents in a tiny grammar: in each chapter one animal; sentences follow a fixed template."""
    rng = random.Random(seed)
    chapters = []
    for c in range(n_docs):
        animal = ANIMALS[c % len(ANIMALS)]
        sents = [f"The {animal} {rng.choice(VERBS)} the {rng.choice(PLACES)}." for _ in range(n_sent)]
        chapters.append(f"CHAPTER {c + 1}\n\n" + " ".join(sents) + "\n")
    return "\n".join(chapters)
