from __future__ import annotations

import os
from collections.abc import Iterator
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


@pytest.fixture(scope="session")
def cue_examples():
    """(90 training, 30 test) texts whose label is one cue word among filler (tests/classify_helpers.py)."""
    from classify_helpers import synthetic_examples

    return synthetic_examples(90, 0), synthetic_examples(30, 1)


@pytest.fixture()
def tiny_llama_dir(tmp_path, cue_examples) -> Path:
    """A random tiny-mha LLaMA as a Hugging Face folder, with a BPE vocabulary trained on the cue examples."""
    from classify_helpers import bpe_tokenizer

    from camelid import Llama, LlamaConfig
    from camelid.interop.hf import save_hf_dir

    train, test = cue_examples
    (tmp_path / "llama").mkdir()
    tok = bpe_tokenizer([e.text for e in train + test], tmp_path / "llama")
    model = Llama(LlamaConfig.from_name("tiny-mha", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id))
    save_hf_dir(model, tmp_path / "llama")
    return tmp_path / "llama"


@pytest.fixture()
def tiny_bert_dir(tmp_path, cue_examples) -> Path:
    """A random 2-layer BERT encoder (no dropout) as a Hugging Face folder, with a WordPiece vocabulary of whole
    words trained on the cue examples."""
    from camelid import BertConfig
    from camelid.bert.model import BertForClassification
    from camelid.interop.bert_hf import save_bert_hf_dir
    from camelid.tokenizer.wordpiece import WordPiece

    wp = WordPiece.train([e.text for e in cue_examples[0]], vocab_size=200, min_frequency=1)
    config = BertConfig.from_name("bert-test", vocab_size=wp.vocab_size, dim=64, intermediate_size=128, dropout=0.0,
                                  attention_dropout=0.0)
    save_bert_hf_dir(BertForClassification(config, 2).bert, tmp_path / "bert")
    wp.save(tmp_path / "bert")
    return tmp_path / "bert"


@pytest.fixture
def no_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every op as on a machine without the C++ kernels (each must fall back by itself)."""
    from camelid.ops import native

    monkeypatch.setattr(native, "module", lambda: None)
    monkeypatch.setattr(native, "loaded", lambda: None)


@pytest.fixture(params=[1, 3], ids=["1-thread", "3-threads"])
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)
