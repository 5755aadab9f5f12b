from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
CHAT = ROOT / "data" / "chat" / "chatterbot_en.jsonl"


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(base model folder, chat data): a random 2-layer LLaMA with a 600-token BPE vocabulary (ChatML specials,
    camelid's built-in ChatML template) trained on the chatterbot dialogues, and 240 of those dialogues as chat
    records, every tenth in the dev split."""
    from camelid import Llama, LlamaConfig
    from camelid.interop.hf import save_hf_dir
    from camelid.tokenizer import Tokenizer
    from camelid.tokenizer.train import train_tokenizer

    d = tmp_path_factory.mktemp("finetune")
    rows = [json.loads(line) for line in CHAT.read_text(encoding="utf-8").splitlines() if line.strip()]
    (d / "texts.txt").write_text("\n".join(m["content"] for r in rows for m in r["messages"]), encoding="utf-8")
    train_tokenizer([d / "texts.txt"], 600, d / "base", min_frequency=1, show_progress=False)
    tok = Tokenizer.from_dir(d / "base")
    torch.manual_seed(0)
    config = LlamaConfig.from_name("tiny-gqa", vocab_size=tok.vocab_size, intermediate_size=192, max_seq_len=256,
                                   bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    save_hf_dir(Llama(config), d / "base")
    data = d / "chat.jsonl"
    data.write_text("".join(json.dumps({**r, "split": "dev" if i % 10 == 0 else "train"}) + "\n"
                            for i, r in enumerate(rows[:240])), encoding="utf-8")
    return d / "base", data
