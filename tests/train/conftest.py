from __future__ import annotations

from pathlib import Path

import pytest
from train_helpers import AUSTEN


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """Two ~60 KB excerpts of Austen as train text and one as validation text."""
    d = tmp_path_factory.mktemp("corpus")
    for name in ("emma", "pride_and_prejudice", "persuasion"):
        text = (AUSTEN / f"{name}.txt").read_text(encoding="utf-8")
        (d / f"{name}.txt").write_text(text[20000:80000], encoding="utf-8")
    return d


@pytest.fixture(scope="session")
def small_tokenizer(small_corpus, tmp_path_factory) -> Path:
    from camelid.train.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    train_tokenizer([small_corpus / "emma.txt", small_corpus / "pride_and_prejudice.txt"], 512, out,
                    show_progress=False)
    return out / "tokenizer.json"


@pytest.fixture(scope="session")
def small_data(small_corpus, small_tokenizer, tmp_path_factory) -> Path:
    from camelid.train.data import prepare, read_documents

    out = tmp_path_factory.mktemp("data")
    docs = read_documents([small_corpus], val_files=["persuasion.txt"])
    prepare(docs, small_tokenizer, out, workers=2, progress=False)
    return out
