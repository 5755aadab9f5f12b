from __future__ import annotations

import os

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
