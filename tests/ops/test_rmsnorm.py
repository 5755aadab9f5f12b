"""Every RMSNorm implementation against the reference (float64 where it helps), values and gradients."""

from __future__ import annotations

import pytest
import torch
from helpers import needs_kernels

from camelid.model import RMSNorm
from camelid.ops import native, rmsnorm


def _inputs(n: int = 37, d: int = 72, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(n, d, generator=g), 1 + 0.3 * torch.randn(d, generator=g), torch.randn(n, d, generator=g)


def test_the_reference_is_the_models_rmsnorm() -> None:
    norm = RMSNorm(72, eps=1e-6)
    x, w, _ = _inputs()
    with torch.no_grad():
        norm.weight.copy_(w)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(rmsnorm.reference(x.to(dtype), norm.weight.to(dtype), 1e-6), norm.to(dtype)(x.to(dtype)))


def _reference64(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor) -> list[torch.Tensor]:
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    y = rmsnorm.reference(xr, wr, 1e-5)
    y.backward(dy.double())
    return [y.detach(), xr.grad, wr.grad]


def _function(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor) -> list[torch.Tensor]:
    xf, wf = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = rmsnorm.RMSNormFunction.apply(xf, wf, 1e-5)
    y.backward(dy)
    return [y.detach(), xf.grad, wf.grad]


@needs_kernels
def test_cpp_forward_backward_and_decode_kernel_match_the_reference(threads: int) -> None:
    x, w, dy = _inputs(seed=threads)
    want = _reference64(x, w, dy)
    for got, ref in zip(_function(x, w, dy), want, strict=True):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(native.module().rms_norm(x, w, 1e-5).double(), want[0], rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the dispatch without autograd: the sequential decode kernel
        torch.testing.assert_close(rmsnorm.rms_norm(x, w, 1e-5).double(), want[0], rtol=1e-5, atol=1e-5)
    assert rmsnorm.choose(x).impl.startswith("C++")


def test_the_pytorch_twin_of_the_function_matches_the_reference(no_kernels: None) -> None:
    x, w, dy = _inputs(seed=7)
    for got, ref in zip(_function(x, w, dy), _reference64(x, w, dy), strict=True):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    assert rmsnorm.choose(x) == native.Choice("PyTorch", native.reason())


def test_dispatch_falls_back_by_itself(no_kernels: None) -> None:
    x, w, _ = _inputs()
    with torch.no_grad():
        assert torch.equal(rmsnorm.rms_norm(x, w, 1e-5), rmsnorm.reference(x, w, 1e-5))
    xb, wb = x.bfloat16(), w.bfloat16()
    assert torch.equal(rmsnorm.rms_norm(xb, wb, 1e-5), rmsnorm.reference(xb, wb, 1e-5))  # autocast / bf16


@needs_kernels
def test_reduced_precision_and_compile_use_the_reference() -> None:
    x, w, _ = _inputs()
    assert torch.equal(rmsnorm.rms_norm(x.bfloat16(), w.bfloat16(), 1e-5),
                       rmsnorm.reference(x.bfloat16(), w.bfloat16(), 1e-5))
    assert "fp32" in rmsnorm.choose(x.bfloat16()).reason
    compiled = torch.compile(lambda a, b: rmsnorm.rms_norm(a, b, 1e-5), fullgraph=True)
    torch.testing.assert_close(compiled(x, w), rmsnorm.reference(x, w, 1e-5), rtol=1e-5, atol=1e-5)


@needs_kernels
def test_a_double_backward_fails_loudly() -> None:
    x, w, _ = _inputs()
    x.requires_grad_()
    scale = torch.ones(72, requires_grad=True)  # a layer after it: its backward's input needs a graph too
    with pytest.raises(RuntimeError, match="once_differentiable"):
        torch.autograd.grad((rmsnorm.rms_norm(x, w, 1e-5) * scale).sum(), x, create_graph=True)[0].sum().backward()
