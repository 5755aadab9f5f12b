"""Every SwiGLU implementation against the reference, values and gradients."""

from __future__ import annotations

import pytest
import torch
from helpers import needs_kernels

from camelid.ops import native, swiglu


def _inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # gates far into both tails of the sigmoid
    return 4 * torch.randn(37, 72, generator=g), torch.randn(37, 72, generator=g), torch.randn(37, 72, generator=g)


def _reference64(a: torch.Tensor, b: torch.Tensor, dy: torch.Tensor) -> list[torch.Tensor]:
    ar, br = a.double().requires_grad_(), b.double().requires_grad_()
    y = swiglu.reference(ar, br)
    y.backward(dy.double())
    return [y.detach(), ar.grad, br.grad]


@needs_kernels
def test_cpp_forward_and_in_place_backward_match_the_reference(threads: int) -> None:
    a, b, dy = _inputs(threads)
    want = _reference64(a, b, dy)
    mod = native.module()
    torch.testing.assert_close(mod.swiglu_forward(a, b).double(), want[0], rtol=1e-5, atol=1e-6)
    da, db = a.clone(), b.clone()
    mod.swiglu_backward_(dy, da, db)  # in place: the inputs become their gradients
    torch.testing.assert_close(da.double(), want[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(db.double(), want[2], rtol=1e-5, atol=1e-6)
    af, bf = a.clone().requires_grad_(), b.clone().requires_grad_()
    y = swiglu.SwiGLUFunction.apply(af * 1, bf * 1)  # fresh tensors, as the contract asks
    y.backward(dy)
    for got, ref in zip([y.detach(), af.grad, bf.grad], want, strict=True):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    assert swiglu.choose(a).impl.startswith("C++")


@needs_kernels
def test_the_function_reuses_its_inputs_and_a_second_backward_fails_loudly() -> None:
    a, b, _ = _inputs(0)
    a.requires_grad_()
    y = swiglu.swiglu(a * 1, b * 1).sum()
    y.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
    scale = torch.ones(72, requires_grad=True)  # a layer after it: its backward's input needs a graph too
    with pytest.raises(RuntimeError, match="once_differentiable"):  # double backward: an error, not zeros
        torch.autograd.grad((swiglu.swiglu(a * 1, b * 1) * scale).sum(), a, create_graph=True)[0].sum().backward()


def test_dispatch_falls_back_to_the_reference(no_kernels: None) -> None:
    a, b, _ = _inputs(1)
    assert torch.equal(swiglu.swiglu(a, b), swiglu.reference(a, b))
    assert swiglu.choose(a).impl == "PyTorch"


def test_views_that_are_not_contiguous_use_the_reference() -> None:
    gate_up = torch.randn(5, 144)
    gate, up = gate_up.chunk(2, dim=-1)  # the fused gate/up product's halves
    assert torch.equal(swiglu.swiglu(gate, up), swiglu.reference(gate, up))
    assert "contiguous" in swiglu.choose(gate).reason
