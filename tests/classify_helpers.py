"""Labelled texts and a tiny vocabulary for the classification tests (`from classify_helpers import ...`)."""

from __future__ import annotations

import random
from pathlib import Path

from camelid.classify import Example
from camelid.tokenizer import Tokenizer
from camelid.tokenizer.train import train_tokenizer

CUES = {"pos": ["good", "great", "lovely"], "neg": ["bad", "awful", "poor"], "neu": ["okay", "average", "fine"]}
FILLER = ["the", "room", "was", "food", "and", "staff", "really", "quite", "very", "hotel", "service", "overall"]


def synthetic_examples(n: int, seed: int) -> list[Example]:
    """The label is given by one cue word hidden among filler words; labels take turns (balanced)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = list(CUES)[i % 3]
        words = [rng.choice(FILLER) for _ in range(rng.randint(4, 9))]
        words.insert(rng.randrange(len(words) + 1), rng.choice(CUES[label]))
        out.append(Example(" ".join(words), label))
    return out


def bpe_tokenizer(texts: list[str], folder: Path) -> Tokenizer:
    """A byte-level BPE vocabulary trained on the texts (every word of them becomes one or two tokens)."""
    (folder / "texts.txt").write_text("\n".join(texts) + "\n")
    train_tokenizer([folder / "texts.txt"], 400, folder, min_frequency=1, show_progress=False)
    (folder / "texts.txt").unlink()
    return Tokenizer.from_dir(folder)
