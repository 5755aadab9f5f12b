"""The training variant (camelid.variants.training) computes the reference Llama's function: values and gradients
agree to float32 rounding, with and without the C++ kernels, and a short training run follows the same loss curve."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import needs_kernels

from camelid.config import LlamaConfig
from camelid.generate import SamplingParams, generate
from camelid.model import FeedForward, Llama, RMSNorm
from camelid.ops import native, swiglu
from camelid.variants import training
from camelid.variants.fused import FastRMSNorm

CFG = LlamaConfig(name="t", vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=96,
                  max_seq_len=32, tie_embeddings=True)


def pair(cfg: LlamaConfig = CFG) -> tuple[Llama, training.TrainLlama]:
    torch.manual_seed(0)
    ref = Llama(cfg)
    torch.manual_seed(0)
    ours = training.TrainLlama(cfg)
    return ref, ours


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return bool((a - b).abs().max() <= tol * max(1.0, b.abs().max().item()))


def forward_backward(module, x: torch.Tensor, dy: torch.Tensor) -> list[torch.Tensor]:  # noqa: ANN001
    y = module(x)
    y.backward(dy)
    grads = [x.grad.clone()] + [p.grad.clone() for p in module.parameters()]
    x.grad = None
    module.zero_grad(set_to_none=True)
    return [y.detach(), *grads]


def test_for_training_replaces_modules_from_outside_and_keeps_every_parameter() -> None:
    model = Llama(CFG)
    params = dict(model.named_parameters())
    assert training.for_training(model) is model and type(model) is Llama
    assert dict(model.named_parameters()) == params  # the same Parameter objects under the same names
    assert list(model.state_dict()) == list(Llama(CFG).state_dict())
    block = model.layers[0]
    assert type(block.attention) is training.TrainAttention and type(block.feed_forward) is training.TrainFeedForward
    assert type(block.attention_norm) is FastRMSNorm and type(model.norm) is FastRMSNorm


@needs_kernels
def test_train_modules_with_kernels_match_the_reference_modules() -> None:
    """RMSNorm and the feed-forward, values and gradients: the C++ Functions against the reference modules."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 64, generator=g, requires_grad=True)
    dy = torch.randn(3, 5, 64, generator=g)
    norm = RMSNorm(64)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(64, generator=g))
    for a, b in zip(forward_backward(norm, x, dy), forward_backward(FastRMSNorm(norm), x, dy), strict=True):
        assert close(a, b)
    ffn = FeedForward(CFG)
    x = (3 * torch.randn(3, 5, 64, generator=g)).requires_grad_()  # gates far into both tails of the sigmoid
    fast_ffn = training.TrainFeedForward(ffn)
    seen = []
    fast_ffn.w2.register_forward_pre_hook(lambda _m, args: seen.append(type(args[0].grad_fn).__name__))
    fast = forward_backward(fast_ffn, x, dy)
    assert seen == ["SwiGLUFunctionBackward"], seen  # the C++ Function ran, not the reference ops
    for a, b in zip(forward_backward(ffn, x, dy), fast, strict=True):
        assert close(a, b)


def test_without_kernels_the_feed_forward_runs_the_reference_function(no_kernels: None) -> None:
    """No C++: TrainFeedForward's SwiGLU dispatch picks the reference ops themselves (nothing else to compare)."""
    assert swiglu.choose() == native.Choice("PyTorch", native.reason())
    ffn = FeedForward(CFG)
    x = torch.randn(2, 3, 64)
    assert torch.equal(training.TrainFeedForward(ffn)(x), ffn(x))


@pytest.mark.parametrize("kernels", [pytest.param(True, marks=needs_kernels), False], ids=["c++", "no-kernels"])
@pytest.mark.parametrize("tied", [True, False])
def test_train_llama_is_the_reference_model(tied: bool, kernels: bool, request: pytest.FixtureRequest) -> None:
    if not kernels:  # no C++ compiler: every fast path falls back to PyTorch (SDPA for attention)
        request.getfixturevalue("no_kernels")
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


def test_packed_sequences_train_as_separate_ones() -> None:
    """Two sequences packed in one row (positions restarting at 0, a block-diagonal causal mask) give the loss
    and gradients of the two trained as separate rows."""
    ref, ours = pair()
    g = torch.Generator().manual_seed(4)
    a, b = torch.randint(0, 300, (1, 12), generator=g), torch.randint(0, 300, (1, 20), generator=g)
    ta, tb = torch.randint(0, 300, (1, 12), generator=g), torch.randint(0, 300, (1, 20), generator=g)
    positions = torch.cat([torch.arange(12), torch.arange(20)])[None]
    doc = torch.cat([torch.zeros(12), torch.ones(20)]).long()
    mask = (doc[:, None] == doc[None, :]) & torch.ones(32, 32, dtype=torch.bool).tril()
    packed = ours(torch.cat([a, b], 1), positions, mask=mask[None, None], targets=torch.cat([ta, tb], 1))
    packed.backward()
    separate = (F.cross_entropy(ref(a)[0], ta[0], reduction="sum")
                + F.cross_entropy(ref(b)[0], tb[0], reduction="sum")) / 32
    separate.backward()
    assert abs(packed.item() - separate.item()) < 1e-5
    for (name, p), q in zip(ref.named_parameters(), ours.parameters(), strict=True):
        assert close(q.grad, p.grad), name


def test_train_llama_generates_like_the_reference() -> None:
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
                           (ours, lambda: training.next_token_loss(ours, x, y))):
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


def test_to_reference_gives_the_plain_llama_holding_the_training_tensors() -> None:
    """What the pretraining and full fine-tuning exports write: plain modules, the training model's own tensors (or
    those of a state dict), the tied head and the model's RoPE frequencies."""
    ref, ours = pair()
    ours.rope.inv_freq = ours.rope.inv_freq * 0.5  # e.g. a scaled RoPE: the model's own table is kept
    ref.rope.inv_freq = ours.rope.inv_freq.clone()
    plain = training.to_reference(ours)
    assert type(plain) is Llama and type(plain.layers[0].attention) is not training.TrainAttention
    assert type(plain.norm) is RMSNorm and type(plain.layers[0].feed_forward) is FeedForward
    # nothing copied: the same storage
    assert plain.layers[0].attention.wq.weight.data_ptr() == ours.layers[0].attention.wq.weight.data_ptr()
    assert plain.output.weight is plain.tok_embeddings.weight
    x = torch.randint(0, CFG.vocab_size, (2, 7))
    with torch.no_grad():
        assert torch.equal(plain(x), ref(x))
        state = {k: v.clone() + 1.0 for k, v in ours.state_dict().items()}
        from_state = training.to_reference(ours, state)
        assert torch.equal(from_state.layers[1].feed_forward.w2.weight, ours.layers[1].feed_forward.w2.weight + 1.0)
        assert torch.equal(from_state.rope.inv_freq, ours.rope.inv_freq)
