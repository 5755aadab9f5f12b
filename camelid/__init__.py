"""camelid: the LLaMA family, whole, in one readable PyTorch codebase."""

from camelid.bert.model import Bert, BertConfig
from camelid.config import LlamaConfig, RopeScaling
from camelid.errors import CamelidError
from camelid.generate import SamplingParams, generate, generate_tokens
from camelid.llm import LLM, load
from camelid.model import Llama

__version__ = "0.1.0"

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
