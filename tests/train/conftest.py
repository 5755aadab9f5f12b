from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def small_data(small_corpus, small_tokenizer, tmp_path_factory) -> Path:
    from camelid.train.data import prepare, read_documents

    out = tmp_path_factory.mktemp("data")
    docs = read_documents([small_corpus], val_files=["persuasion.txt"])
    prepare(docs, small_tokenizer, out, workers=2, progress=False)
    return out
