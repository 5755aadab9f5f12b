"""Live `camelid serve` processes for the API tests: a tiny random LLaMA with a BPE vocabulary (fast) and the
default SmolLM2 model (real text), each started once per session on a free loopback port and stopped after."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from serve_helpers import Server, tiny_bpe_llama


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random LLaMA (peaked logits, 512 positions) with a 400-token BPE vocabulary and ChatML specials, as a
    Hugging Face folder."""
    return tiny_bpe_llama(tmp_path_factory.mktemp("tiny-serve"))


@pytest.fixture(scope="session")
def tiny_server(tiny_model: Path, minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The tiny model, and all-MiniLM-L6-v2 (BERT) for /v1/embeddings beside its own mean-pooled states."""
    server = Server(tiny_model, "--slots", "4", "--ctx", "256", "--max-queue", "32", "--max-tokens", "200",
                    "--max-body-kb", "64", "--served-model-name", "tiny", "--embedding-model", "all-minilm-l6-v2",
                    log=tmp_path_factory.mktemp("logs") / "tiny.log")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def smollm2_server(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server("smollm2-135m-instruct", "--slots", "4", "--ctx", "1024",
                    log=tmp_path_factory.mktemp("logs") / "smollm2.log")
    yield server
    server.stop()
