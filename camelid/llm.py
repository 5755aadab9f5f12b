"""`camelid.load`: one entry point for every checkpoint format, returning an `LLM` (model + config + tokenizer)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from camelid.config import LlamaConfig
from camelid.errors import CamelidError
from camelid.model import Llama


@dataclass
class LLM:
    model: Llama
    config: LlamaConfig
    tokenizer: Any = None  # camelid.tokenizer.Tokenizer once loaded
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def save_pretrained(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        """Write a Hugging Face directory that `transformers.AutoModelForCausalLM.from_pretrained` loads."""
        from camelid.interop.hf import save_hf_dir

        out = save_hf_dir(self.model, path, dtype=dtype)
        if self.tokenizer is not None and hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(out)
        return out


def load(source: str | os.PathLike, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> LLM:
    """Load a model from a Hugging Face directory (config.json + safetensors)."""
    path = Path(source)
    if path.is_dir() and (path / "config.json").is_file():
        from camelid.interop.hf import load_hf_dir

        config, model = load_hf_dir(path, dtype=dtype, device=device)
        tokenizer = None
        if (path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file():
            try:
                from camelid.tokenizer import Tokenizer
            except ImportError:
                Tokenizer = None  # noqa: N806
            if Tokenizer is not None:
                tokenizer = Tokenizer.from_dir(path)
        return LLM(model=model.eval(), config=config, tokenizer=tokenizer, source=str(path))
    if not path.exists():
        raise CamelidError(f"{source}: no such file or directory, and not a known model name")
    raise CamelidError(f"{source}: not a model camelid can load (expected a Hugging Face directory with config.json)")
