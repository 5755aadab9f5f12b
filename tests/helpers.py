"""Small model builders shared by the fast-path tests (imported as `from helpers import ...`)."""

from __future__ import annotations

import torch

from camelid import Llama, LlamaConfig


def peaked_model(name: str = "tiny-gqa") -> Llama:
    """A random model whose logits are far from uniform, so greedy choices are not near-ties."""
    model = Llama(LlamaConfig.from_name(name)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    return model
