"""camelid: the LLaMA family, whole, in one readable PyTorch codebase.

The names below are imported on first use (PEP 562), so `import camelid` and the commands that need no model
(`camelid --help`, `camelid models`, `camelid pull`) do not pay for importing PyTorch.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from camelid.errors import CamelidError

if TYPE_CHECKING:
    from camelid.bert.model import Bert, BertConfig
    from camelid.config import LlamaConfig, RopeScaling
    from camelid.generate import SamplingParams, generate, generate_tokens
    from camelid.llm import LLM, load
    from camelid.model import Llama

__version__ = "0.1.0"

_HOMES = {"Bert": "camelid.bert.model", "BertConfig": "camelid.bert.model", "LlamaConfig": "camelid.config",
          "RopeScaling": "camelid.config", "SamplingParams": "camelid.generate", "generate": "camelid.generate",
          "generate_tokens": "camelid.generate", "LLM": "camelid.llm", "load": "camelid.llm",
          "Llama": "camelid.model"}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:  # a submodule used as an attribute (camelid.llm.resolve after `import camelid`)
        if name.startswith("_") or importlib.util.find_spec(f"camelid.{name}") is None:
            raise AttributeError(f"module 'camelid' has no attribute {name!r}")
        return importlib.import_module(f"camelid.{name}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # once only
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])


__all__ = [
    "Bert",
    "BertConfig",
    "LLM",
    "CamelidError",
    "Llama",
    "LlamaConfig",
    "RopeScaling",
    "SamplingParams",
    "generate",
    "generate_tokens",
    "load",
]
