"""`camelid.load`: one entry point for every checkpoint format, returning an `LLM` (model + config + tokenizer).

Sources: a registered name (`camelid list`, default "smollm2-135m-instruct"), a Hugging Face Hub id
(org/name), a Hugging Face directory (config.json + safetensors), a .gguf file, or a Meta directory
(params.json + consolidated.*.pth).
"""

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


def resolve(source: str | os.PathLike) -> Path:
    """A name, Hub id or path -> a local path (fetching registered models into the cache)."""
    from camelid import hub

    text = str(source)
    if text in hub.MODELS:
        return hub.pull(text)
    path = Path(text).expanduser()
    if path.exists():
        return path
    if "/" in text and not text.startswith((".", "/", "~")) and text.count("/") == 1:
        return hub.pull_hf_hub(text)
    raise CamelidError(
        f"{source}: no such file or directory, and not a known model name (known: {', '.join(hub.MODELS)})"
    )


def _load_tokenizer(path: Path) -> Any:
    try:
        from camelid.tokenizer import Tokenizer
    except ImportError:
        return None
    if path.suffix == ".gguf":
        return Tokenizer.from_gguf(path)
    return Tokenizer.from_dir(path)


def load(source: str | os.PathLike = "smollm2-135m-instruct", *, dtype: torch.dtype | None = None,
         device: str | torch.device = "cpu", tokenizer: bool = True) -> LLM:
    """Load a model (see the module docstring for the accepted sources)."""
    path = resolve(source)
    if path.is_dir() and (path / "config.json").is_file():
        from camelid.interop.hf import load_hf_dir

        config, model = load_hf_dir(path, dtype=dtype, device=device)
        has_tok = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
    elif path.is_file() and path.suffix == ".gguf":
        from camelid.interop.gguf import load_gguf

        config, model = load_gguf(path, dtype=dtype, device=device)
        has_tok = True
    elif path.is_dir() and (path / "params.json").is_file():
        from camelid.interop.meta import load_meta_dir

        config, model = load_meta_dir(path, dtype=dtype, device=device)
        has_tok = (path / "tokenizer.model").is_file()
    else:
        raise CamelidError(
            f"{source}: not a model camelid can load; expected a Hugging Face directory (config.json), "
            "a .gguf file or a Meta directory (params.json + consolidated.*.pth)"
        )
    tok = _load_tokenizer(path) if tokenizer and has_tok else None
    return LLM(model=model.eval(), config=config, tokenizer=tok, source=str(path))
