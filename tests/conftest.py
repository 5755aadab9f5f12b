from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# quieter, deterministic test runs; transformers must never try the network
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The default model's GGUF file (SmolLM2-135M-Instruct Q4_1), fetched once into the camelid cache."""
    from camelid import hub

    return hub.pull("smollm2-135m-instruct", quiet=True)


@pytest.fixture(scope="session")
def minilm_dir():
    """all-MiniLM-L6-v2 as a Hugging Face folder (config.json, model.safetensors, vocab.txt, tokenizer.json)."""
    from camelid import hub

    return hub.pull("all-minilm-l6-v2", quiet=True)


AUSTEN = Path(__file__).resolve().parents[1] / "data" / "austen"


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
    """A 512-token BPE tokenizer.json trained on two of the small corpus's files."""
    from camelid.tokenizer.train import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    train_tokenizer([small_corpus / "emma.txt", small_corpus / "pride_and_prejudice.txt"], 512, out,
                    show_progress=False)
    return out / "tokenizer.json"
