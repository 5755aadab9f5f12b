from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from camelid import Llama, LlamaConfig
from camelid.variants.fused import fuse
from camelid.vision import VisionConfig, VisionLlama, ViTConfig

TINY_VIT = ViTConfig(image_size=16, patch_size=4, dim=32, n_layers=1, n_heads=2)


def tiny_text(n_layers: int = 4, name: str = "tiny-gqa") -> Llama:
    torch.manual_seed(0)
    return Llama(LlamaConfig.from_name(name, n_layers=n_layers)).eval()


def tiny_vision(fusion: str = "cross-attention", open_gates: bool = False, fused: bool = False,
                **kwargs) -> VisionLlama:
    """A random tiny VisionLlama on a random tiny text model (fused first: camelid.variants.fused, as
    camelid.load(quantize="fp32") does); open_gates: gates and weights away from their zero-change start, so the
    image does change the logits."""
    config = VisionConfig(base="unused", fusion=fusion, vit=TINY_VIT, every=2, cross_hidden=48, projector_hidden=48,
                          **kwargs)
    torch.manual_seed(1)
    text = tiny_text()
    model = VisionLlama(fuse(text) if fused else text, config).eval()
    if open_gates:
        with torch.no_grad():
            for p in [*model.cross.parameters(), *model.vision.parameters()]:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def pixels(n: int = 1, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


@pytest.fixture(scope="session")
def tiny_base(small_tokenizer, tmp_path_factory) -> Path:
    """A random 4-block LLaMA (vocab 512) as a Hugging Face folder, with a BPE tokenizer trained on Austen."""
    from camelid.interop.hf import save_hf_dir

    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_name("tiny-gqa", vocab_size=512, n_layers=4, max_seq_len=256))
    out = tmp_path_factory.mktemp("tiny-base")
    save_hf_dir(model, out)
    shutil.copyfile(small_tokenizer, out / "tokenizer.json")
    return out
