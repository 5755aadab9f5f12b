"""Small model builders and markers shared by the fast-path tests (imported as `from helpers import ...`)."""

from __future__ import annotations

import pytest
import torch

from camelid import Llama, LlamaConfig
from camelid.ops import native

# the C++ kernels' tests skip where they cannot be built; tests/ops/test_native.py fails if a compiler is installed
needs_kernels = pytest.mark.skipif(native.module() is None, reason="C++ kernels could not be built here")


def peaked_model(name: str = "tiny-gqa", **overrides: object) -> Llama:
    """A random model whose logits are far from uniform, so greedy choices are not near-ties."""
    model = Llama(LlamaConfig.from_name(name, **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    return model
