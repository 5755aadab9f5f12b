"""Fixtures of the reliability tests: every file a case needs is made in the test."""

from __future__ import annotations

from pathlib import Path

import pytest
from reliability_helpers import AUSTEN


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A prepared token folder (a 400-token BPE vocabulary, 30 KB of Emma, 10% held out) for tiny training runs."""
    from camelid.tokenizer.train import train_tokenizer
    from camelid.train.data import prepare, read_documents

    root = tmp_path_factory.mktemp("tiny-data")
    (root / "emma.txt").write_text((AUSTEN / "emma.txt").read_text(encoding="utf-8")[20000:50000], encoding="utf-8")
    train_tokenizer([root / "emma.txt"], 400, root / "tok", show_progress=False)
    prepare(read_documents([root / "emma.txt"], val_fraction=0.1), root / "tok", root / "data", workers=1,
            progress=False)
    return root / "data"
