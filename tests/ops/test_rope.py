"""Every RoPE implementation against the reference, values and gradients."""

from __future__ import annotations

import torch
from helpers import needs_kernels

from camelid.config import LlamaConfig
from camelid.model import RotaryEmbedding, apply_rope
from camelid.ops import native, rope


def _tables(T: int, d: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ang = 3 * torch.randn(T, d // 2, generator=g)
    return torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()


def test_the_reference_is_the_models_apply_rope() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 9, 16, generator=g)
    cos, sin = _tables(9, 16, g)
    assert torch.equal(rope.reference(x, cos, sin), apply_rope(x, cos, sin))


def _bthd_reference64(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dy: torch.Tensor) -> list[torch.Tensor]:
    qr = q.double().requires_grad_()
    y = rope.reference(qr.transpose(1, 2), cos.double(), sin.double()).transpose(1, 2)  # the model's layout
    y.backward(dy.double())
    return [y.detach(), qr.grad]


def _function(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dy: torch.Tensor) -> list[torch.Tensor]:
    qf = q.clone().requires_grad_()
    y = rope.rope_bthd(qf, cos, sin)
    y.backward(dy)
    return [y.detach(), qf.grad]


@needs_kernels
def test_cpp_rotation_and_its_inverse_match_the_reference(threads: int) -> None:
    g = torch.Generator().manual_seed(threads)
    q, dy = torch.randn(2, 9, 3, 16, generator=g), torch.randn(2, 9, 3, 16, generator=g)  # [B, T, heads, d]
    cos, sin = _tables(9, 16, g)
    for got, ref in zip(_function(q, cos, sin, dy), _bthd_reference64(q, cos, sin, dy), strict=True):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    half = (cos[:, :8].contiguous(), sin[:, :8].contiguous())
    turned = native.module().rope(q, *half, 1.0)
    torch.testing.assert_close(native.module().rope(turned, *half, -1.0), q, rtol=1e-5, atol=1e-5)  # inverse
    assert rope.choose(q).impl.startswith("C++")


def test_the_pytorch_twin_matches_the_reference(no_kernels: None) -> None:
    g = torch.Generator().manual_seed(5)
    q, dy = torch.randn(2, 7, 4, 16, generator=g), torch.randn(2, 7, 4, 16, generator=g)
    cos, sin = _tables(7, 16, g)
    for got, ref in zip(_function(q, cos, sin, dy), _bthd_reference64(q, cos, sin, dy), strict=True):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    assert rope.choose(q).impl == "PyTorch"


def test_per_row_tables_and_compile_use_the_reference() -> None:
    """Positions [B, T] (packed sequences) give tables [B, 1, T, d]: each row turned by its own angles."""
    rot = RotaryEmbedding(LlamaConfig.from_name("tiny-gqa"))
    positions = torch.tensor([[0, 1, 2, 0, 1], [3, 4, 5, 6, 7]])
    cos, sin = rot(positions, torch.float32)
    assert cos.shape == (2, 1, 5, 16)
    q = torch.randn(2, 5, 4, 16)
    got = rope.rope_bthd(q, cos, sin)
    for b in range(2):
        c, s = rot(positions[b], torch.float32)
        torch.testing.assert_close(got[b], rope.reference(q[b].transpose(0, 1), c, s).transpose(0, 1))
    compiled = torch.compile(rope.rope_bthd, fullgraph=True)
    c, s = rot(positions[1], torch.float32)
    torch.testing.assert_close(compiled(q, c, s), _bthd_reference64(q, c, s, q)[0].float(), rtol=1e-5, atol=1e-5)
