"""The gated cross-attention layer against a float64 implementation of softmax(Q_text K_image^T / sqrt(d)) V_image,
and its zero gates."""

from __future__ import annotations

import math

import pytest
import torch

from camelid import LlamaConfig
from camelid.vision.cross_attention import CrossAttention, GatedCrossAttention


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def reference(layer: CrossAttention, text: torch.Tensor, image: torch.Tensor, eps: float) -> torch.Tensor:
    """The seed's formula, one head at a time, in float64: softmax(Q K^T / sqrt(d)) V with Q from the text, K and
    V from the image (q and k RMS-normalised per head, key/value head h // group serving query head h)."""
    W = {n: p.detach().double() for n, p in layer.named_parameters()}
    x, c = text.double(), image.double()
    H, Hkv, d = layer.n_heads, layer.n_kv_heads, layer.head_dim
    out = []
    for h in range(H):
        g = h // (H // Hkv)
        Q = rms(x @ W["wq.weight"][h * d:(h + 1) * d].T, W["q_norm.weight"], eps)  # [B, T, d]
        K = rms(c @ W["wk.weight"][g * d:(g + 1) * d].T, W["k_norm.weight"], eps)  # [B, N, d]
        V = c @ W["wv.weight"][g * d:(g + 1) * d].T
        out.append(torch.softmax(Q @ K.transpose(1, 2) / math.sqrt(d), dim=-1) @ V)
    return torch.cat(out, dim=-1) @ W["wo.weight"].T


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])  # MHA, GQA, MQA
def test_cross_attention_matches_float64_formula(n_kv_heads: int) -> None:
    config = LlamaConfig.from_name("tiny-mha", n_kv_heads=n_kv_heads)
    torch.manual_seed(0)
    layer = CrossAttention(config, context_dim=24)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.2 if p.dim() == 2 else 1.0)
    text, image = torch.randn(2, 7, config.dim), torch.randn(2, 9, 24)
    expected = reference(layer, text, image, config.norm_eps)
    # the module in float64: the same formula to rounding; in float32 within float32's precision
    got64 = layer.double()(text.double(), *layer.image_kv(image.double()))
    assert (got64 - expected).abs().max().item() < 1e-6
    layer.float()
    got32 = layer(text, *layer.image_kv(image))
    assert (got32.double() - expected).abs().max().item() < 1e-4 * expected.abs().max().item()
    # one image for a batch of prompts broadcasts
    one = layer(text, *layer.image_kv(image[:1]))
    assert torch.allclose(one[1], layer(text[1:], *layer.image_kv(image[:1]))[0], atol=1e-6)


def test_zero_gates_return_the_input_bit_for_bit() -> None:
    config = LlamaConfig.from_name("tiny-gqa")
    layer = GatedCrossAttention(config, context_dim=24, hidden=48)
    assert layer.attention_gate.item() == 0 and layer.ffn_gate.item() == 0
    x = torch.randn(3, 5, config.dim) * 100
    layer.set_image(torch.randn(3, 9, 24))
    assert torch.equal(layer(x), x)
    for dtype in (torch.bfloat16, torch.float16):  # a low-precision text model's stream, fp32 layer
        assert layer(x.to(dtype)).dtype == dtype and torch.equal(layer(x.to(dtype)), x.to(dtype))
    with torch.no_grad():
        layer.attention_gate.fill_(0.5)
    assert not torch.equal(layer(x), x)


def test_gates_get_gradients_first() -> None:
    """At the start only the gates learn (tanh(0) = 0 blocks the rest): the reason the layer starts harmless."""
    config = LlamaConfig.from_name("tiny-gqa")
    layer = GatedCrossAttention(config, context_dim=24, hidden=48)
    layer.set_image(torch.randn(2, 9, 24))
    layer(torch.randn(2, 5, config.dim)).pow(2).sum().backward()
    assert layer.attention_gate.grad.abs().item() > 0 and layer.ffn_gate.grad.abs().item() > 0
    assert layer.attention.wq.weight.grad.abs().max().item() == 0
