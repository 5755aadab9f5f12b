"""The fused output head + cross-entropy, in C++ and in torch, against the head followed by F.cross_entropy."""

from __future__ import annotations

import pytest
import torch
from helpers import needs_kernels

from camelid.ops import head_loss


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return bool((a - b).abs().max() <= tol * max(1.0, b.abs().max().item()))


def _small_chunks(cpp: bool, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 32 rows at a vocabulary of 300 (several, one partial), through C++ or torch."""
    monkeypatch.setattr(head_loss, "CE_CHUNK_ELEMENTS", 32 * 300)
    if not cpp:
        request.getfixturevalue("no_kernels")


@pytest.mark.parametrize("cpp", [pytest.param(True, marks=needs_kernels), False], ids=["c++", "torch"])
@pytest.mark.parametrize("n,spread", [(1, 0.1), (31, 0.1), (64, 0.1), (200, 0.1), (64, 30.0)])
def test_linear_cross_entropy_equals_head_then_cross_entropy(n: int, spread: float, cpp: bool,
                                                             request: pytest.FixtureRequest,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    _small_chunks(cpp, request, monkeypatch)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, 64, generator=g, requires_grad=True)
    w = (spread * torch.randn(300, 64, generator=g)).requires_grad_()  # 30: logits hundreds apart
    t = torch.randint(0, 300, (n,), generator=g)
    ref = head_loss.reference(h, w, t)  # fp32, as ours: logits hundreds apart amplify their rounding
    ref.backward(torch.tensor(0.7))
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ours = head_loss.head_loss(h, w, t)
    ours.backward(torch.tensor(0.7))
    assert close(ours, ref) and close(h.grad, gh) and close(w.grad, gw)
    with torch.no_grad():
        assert close(head_loss.head_loss(h, w, t), ref)
    assert head_loss.choose(h).impl.startswith("C++" if cpp else "PyTorch")


def test_autocast_uses_the_plain_head_and_loss() -> None:
    h, w, t = torch.randn(8, 64), torch.randn(300, 64), torch.randint(0, 300, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(head_loss.head_loss(h, w, t), head_loss.reference(h, w, t))
        assert "autocast" in head_loss.choose(h).reason


@pytest.mark.parametrize("cpp", [pytest.param(True, marks=needs_kernels), False], ids=["c++", "torch"])
@pytest.mark.parametrize("n,spread", [(1, 0.1), (70, 0.1), (64, 30.0)])
def test_token_logprobs_equal_log_softmax_of_the_head(n: int, spread: float, cpp: bool,
                                                     request: pytest.FixtureRequest,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    _small_chunks(cpp, request, monkeypatch)
    g = torch.Generator().manual_seed(1)
    h = torch.randn(n, 64, generator=g, requires_grad=True)
    w = spread * torch.randn(300, 64, generator=g)  # frozen (LoRA's head): the chunked path
    t = torch.randint(0, 300, (n,), generator=g)
    upstream = torch.randn(n, generator=g)  # each row's weight differs (DPO sums rows per sequence, then mixes)
    ref = torch.log_softmax(h @ w.t(), -1).gather(1, t[:, None]).squeeze(1)
    (ref * upstream).sum().backward()
    gh = h.grad.clone()
    h.grad = None
    ours = head_loss.token_logprobs(h, w, t)
    (ours * upstream).sum().backward()
    assert close(ours, ref) and close(h.grad, gh)
    w.requires_grad_(True)  # a head that trains takes the plain path, with its own gradient
    head_loss.token_logprobs(h, w, t).sum().backward()
    assert w.grad is not None
