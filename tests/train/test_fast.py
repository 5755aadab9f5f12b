"""TrainLlama (camelid/train/fast.py) computes the reference Llama's function: values and gradients agree to
float32 rounding, and a short training run follows the same loss curve."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from camelid.config import LlamaConfig
from camelid.model import Llama, RMSNorm, apply_rope
from camelid.train import fast

CFG = LlamaConfig(name="t", vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=96,
                  max_seq_len=32, tie_embeddings=True)


def pair(cfg: LlamaConfig = CFG) -> tuple[Llama, fast.TrainLlama]:
    torch.manual_seed(0)
    ref = Llama(cfg)
    torch.manual_seed(0)
    ours = fast.TrainLlama(cfg)
    return ref, ours


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return bool((a - b).abs().max() <= tol * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("cpp", [True, False], ids=["c++", "torch"])
@pytest.mark.parametrize("n,spread", [(1, 0.1), (31, 0.1), (64, 0.1), (200, 0.1), (64, 30.0)])
def test_linear_cross_entropy_equals_head_then_cross_entropy(n: int, spread: float, cpp: bool, monkeypatch) -> None:
    monkeypatch.setattr(fast, "_CE_CHUNK_ELEMENTS", 32 * 300)  # chunks of 32 rows: several, one partial
    if not cpp:
        monkeypatch.setattr(fast, "_cpp", lambda *t: None)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, 64, generator=g, requires_grad=True)
    w = (spread * torch.randn(300, 64, generator=g)).requires_grad_()  # 30: logits hundreds apart
    t = torch.randint(0, 300, (n,), generator=g)
    ref = F.cross_entropy((h @ w.t()).float(), t)
    ref.backward(torch.tensor(0.7))
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ours = fast.LinearCrossEntropy.apply(h, w, t)
    ours.backward(torch.tensor(0.7))
    assert close(ours, ref) and close(h.grad, gh) and close(w.grad, gw)
    with torch.no_grad():
        assert close(fast.LinearCrossEntropy.apply(h, w, t), ref)


def forward_backward(module, x: torch.Tensor, dy: torch.Tensor) -> list[torch.Tensor]:  # noqa: ANN001
    y = module(x)
    y.backward(dy)
    grads = [x.grad.clone()] + [p.grad.clone() for p in module.parameters()]
    x.grad = None
    module.zero_grad(set_to_none=True)
    return [y.detach(), *grads]


@pytest.mark.parametrize("cpp", [True, False], ids=["c++", "torch"])
def test_rmsnorm_swiglu_and_rope_functions_equal_the_reference(cpp: bool, monkeypatch) -> None:
    from camelid import kernels
    from camelid.model import FeedForward

    if cpp and kernels.load() is None:
        pytest.skip("no C++ compiler here (tests/test_kernels.py fails if one is installed and the build broke)")
    if not cpp:
        monkeypatch.setattr(fast, "_cpp", lambda *t: None)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 64, generator=g, requires_grad=True)
    dy = torch.randn(3, 5, 64, generator=g)
    norm = RMSNorm(64)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(64, generator=g))
    fast_norm = fast.TrainRMSNorm(64)
    fast_norm.load_state_dict(norm.state_dict())
    for a, b in zip(forward_backward(norm, x, dy), forward_backward(fast_norm, x, dy), strict=True):
        assert close(a, b)

    ffn = FeedForward(CFG)
    fast_ffn = fast.TrainFeedForward(CFG)
    fast_ffn.load_state_dict(ffn.state_dict())
    x = (3 * torch.randn(3, 5, 64, generator=g)).requires_grad_()  # gates far into both tails of the sigmoid
    for a, b in zip(forward_backward(ffn, x, dy), forward_backward(fast_ffn, x, dy), strict=True):
        assert close(a, b)

    q = torch.randn(2, 7, 4, 16, generator=g, requires_grad=True)  # [B, T, heads, d]
    ang = torch.randn(7, 8, generator=g)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    dy = torch.randn(2, 7, 4, 16, generator=g)
    ref = apply_rope(q.transpose(1, 2), cos, sin).transpose(1, 2)  # the reference's [B, heads, T, d] layout
    ref.backward(dy)
    gq, q.grad = q.grad.clone(), None
    ours = fast._RopeFn.apply(q, cos[:, :8].contiguous(), sin[:, :8].contiguous())
    ours.backward(dy)
    assert close(ours, ref) and close(q.grad, gq)


@pytest.mark.parametrize("kernels_on", [True, False], ids=["c++", "no-kernels"])
@pytest.mark.parametrize("tied", [True, False])
def test_train_llama_is_the_reference_model(tied: bool, kernels_on: bool, monkeypatch) -> None:
    from camelid import kernels

    if not kernels_on:  # no C++ compiler: every fast path falls back to PyTorch (SDPA for attention)
        monkeypatch.setattr(kernels, "load", lambda: None)
        monkeypatch.setattr(kernels, "_attention_ok", False)
    cfg = CFG.replace(tie_embeddings=tied)
    ref, ours = pair(cfg)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), ours.state_dict().values(), strict=True))
    g = torch.Generator().manual_seed(2)
    x, y = torch.randint(0, 300, (3, 32), generator=g), torch.randint(0, 300, (3, 32), generator=g)
    with torch.no_grad():
        assert close(ours(x), ref(x))  # logits (evaluation) through the fast blocks
    ref_loss = F.cross_entropy(ref(x).flatten(0, 1), y.flatten())
    ref_loss.backward()
    loss = ours(x, targets=y)
    loss.backward()
    assert abs(loss.item() - ref_loss.item()) < 1e-5
    for (name, a), b in zip(ref.named_parameters(), ours.parameters(), strict=True):
        assert close(b.grad, a.grad), name


def test_train_llama_generates_like_the_reference() -> None:
    from camelid.generate import SamplingParams, generate

    ref, ours = pair()
    params = SamplingParams(temperature=0.0)
    assert generate(ours, [1, 2, 3], 8, params) == generate(ref, [1, 2, 3], 8, params)


def test_short_training_run_follows_the_reference_loss_curve() -> None:
    ref, ours = pair()
    g = torch.Generator().manual_seed(3)
    data = torch.randint(0, 50, (4, 33), generator=g)  # a small alphabet: the loss falls quickly
    x, y = data[:, :-1], data[:, 1:]
    curves = []
    for model, loss_fn in ((ref, lambda: F.cross_entropy(ref(x).flatten(0, 1), y.flatten())),
                           (ours, lambda: ours(x, targets=y))):
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        curve = []
        for _ in range(20):
            loss = loss_fn()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            curve.append(loss.item())
        curves.append(curve)
    assert curves[0][-1] < curves[0][0] - 1.0
    assert max(abs(a - b) for a, b in zip(*curves, strict=True)) < 1e-4


def test_swiglu_backward_reuses_its_inputs_and_a_second_backward_fails_loudly() -> None:
    from camelid import kernels

    if kernels.load() is None:
        pytest.skip("no C++ compiler here (tests/test_kernels.py fails if one is installed and the build broke)")
    ffn = fast.TrainFeedForward(CFG)
    x = torch.randn(2, 3, 64, requires_grad=True)
    y = ffn(x).sum()
    y.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
    with pytest.raises(RuntimeError, match="once_differentiable"):  # double backward: an error, not zeros
        torch.autograd.grad(ffn(x).sum(), x, create_graph=True)[0].sum().backward()
