"""Causal attention: the training kernel (values and gradients) and the fused decode kernel against the reference."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from helpers import needs_kernels

from camelid.config import LlamaConfig
from camelid.model import KVCache, RotaryEmbedding
from camelid.ops import attention, linear, native
from camelid.ops.rope import reference as rope_reference


def sdpa_bthd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The reference on [B, T, heads, D] tensors."""
    return attention.reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


@needs_kernels
# T around the 64-query blocks (1, 63, 64, 65, 130), MHA / GQA / MQA, head sizes 16-64
@pytest.mark.parametrize("B,T,H,KV,D", [(2, 1, 4, 2, 16), (1, 63, 4, 4, 32), (2, 64, 8, 2, 32), (1, 65, 6, 1, 64),
                                        (3, 130, 4, 2, 32)])
def test_causal_attention_matches_sdpa_values_and_gradients(B: int, T: int, H: int, KV: int, D: int,
                                                            threads: int) -> None:
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(B, T, n, D, generator=g, dtype=torch.float64) for n in (H, KV, KV))
    dy = torch.randn(B, T, H, D, generator=g, dtype=torch.float64)
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    sdpa_bthd(*ref).backward(dy)  # float64: the exact answer, to compare float32 against
    ours = [t.float().requires_grad_() for t in (q, k, v)]
    assert attention.choose(ours[0]).impl.startswith("C++")
    y = attention.causal_attention(*ours)
    y.backward(dy.float())
    torch.testing.assert_close(y.double(), sdpa_bthd(*ref).detach(), rtol=0, atol=2e-6)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=0, atol=1e-5)


@needs_kernels
def test_causal_attention_under_compile_and_on_strided_inputs() -> None:
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 70, 8, 32, generator=g, requires_grad=True)  # q, k, v: strided slices of one tensor
    dy = torch.randn(2, 70, 4, 32, generator=g)

    def f(t: torch.Tensor) -> torch.Tensor:
        return attention.causal_attention(t[:, :, :4], t[:, :, 4:6], t[:, :, 6:])

    outs = []
    for fn in (f, torch.compile(f, fullgraph=True), lambda t: sdpa_bthd(t[:, :, :4], t[:, :, 4:6], t[:, :, 6:])):
        y = fn(qkv)
        y.backward(dy)
        outs.append((y.detach(), qkv.grad))
        qkv.grad = None
    for y, grad in outs[:2]:
        torch.testing.assert_close(y, outs[2][0], rtol=0, atol=1e-5)
        torch.testing.assert_close(grad, outs[2][1], rtol=0, atol=1e-5)


@needs_kernels
def test_the_training_kernel_is_available_where_torch_has_blas() -> None:
    # x86 wheels link MKL (sgemm_); were it missing, training would silently fall back to SDPA
    assert native.module().causal_attention_available()
    assert attention.choose().impl.startswith("C++")


def test_what_the_training_kernel_does_not_do_goes_to_sdpa() -> None:
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 2, 16, generator=g, dtype=torch.bfloat16)
    assert torch.equal(attention.causal_attention(q, q, q), sdpa_bthd(q, q, q))  # not fp32
    assert "fp32" in attention.choose(q).reason
    q = torch.randn(1, attention.MAX_ATTENTION_T + 1, 1, 16, generator=g)
    assert "longer than" in attention.choose(q).reason  # SDPA skips the masked blocks itself
    q = torch.randn(2, 6, 2, 16, generator=g)
    mask = torch.rand(2, 1, 6, 6, generator=g) > 0.3
    mask |= torch.eye(6, dtype=torch.bool)  # every query sees something
    want = attention.reference(q.transpose(1, 2), q.transpose(1, 2), q.transpose(1, 2), mask).transpose(1, 2)
    assert torch.equal(attention.causal_attention(q, q, q, mask), want)


def test_without_kernels_causal_attention_is_sdpa(no_kernels: None) -> None:
    q = torch.randn(2, 9, 4, 16)
    assert torch.equal(attention.causal_attention(q, q[:, :, :2], q[:, :, 2:]), sdpa_bthd(q, q[:, :, :2], q[:, :, 2:]))
    assert attention.choose(q) == native.Choice("PyTorch", f"SDPA: {native.reason()}")


def _cached_reference(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                      cache: KVCache, mask: torch.Tensor, H: int, KV: int) -> torch.Tensor:
    """camelid.model.Attention's steps after its projections, spelled out."""
    B, T, W = qkv.shape
    d = W // (H + 2 * KV)
    q, k, v = qkv.split([H * d, KV * d, KV * d], -1)
    q, k, v = (t.view(B, T, -1, d).transpose(1, 2) for t in (q, k, v))
    q, k = rope_reference(q, cos, sin), rope_reference(k, cos, sin)
    k, v = cache.update(positions, k, v)
    return attention.reference(q, k, v, mask).transpose(1, 2).reshape(B, T, H * d)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("kernels", [pytest.param(True, marks=needs_kernels), False], ids=["c++", "torch"])
def test_cached_attention_matches_the_models_steps(padded: bool, kernels: bool,
                                                   request: pytest.FixtureRequest) -> None:
    """A prompt (SDPA), single tokens and a 3-token chunk (one C++ call each) against the reference's steps,
    both writing their own KV cache; with a left-padded row hidden by its mask."""
    if not kernels:
        request.getfixturevalue("no_kernels")
    cfg = LlamaConfig.from_name("tiny-gqa")
    H, KV, d, S, B = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, 24, 2
    rot = RotaryEmbedding(cfg)
    g = torch.Generator().manual_seed(3)
    qkv_all = torch.randn(B, 20, (H + 2 * KV) * d, generator=g)
    caches = [KVCache(B, KV, S, d, torch.float32) for _ in range(2)]
    key_mask = torch.ones(B, S, dtype=torch.bool)
    if padded:
        key_mask[0, :4] = False
    for a, b in [(0, 10)] + [(t, t + 1) for t in range(10, 17)] + [(17, 20)]:
        positions = torch.arange(a, b)
        slots = torch.arange(S)
        mask = (positions[:, None] >= slots) & (key_mask[:, None, None, :] | (positions[:, None] == slots))
        cos, sin = rot(positions, torch.float32)
        qkv = qkv_all[:, a:b]
        got = attention.cached_attention(qkv, cos, sin, positions, caches[0], mask, H, KV)
        want = _cached_reference(qkv, cos, sin, positions, caches[1], mask, H, KV)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(caches[0].k, caches[1].k, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(caches[0].v, caches[1].v, rtol=0, atol=0)
    expected = "C++" if kernels else "PyTorch"
    assert attention.choose_cached(qkv_all[:, :1]).impl.startswith(expected)
    assert "new tokens" in attention.choose_cached(qkv_all[:, :10]).reason  # a prompt: SDPA


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("kernels", [pytest.param(True, marks=needs_kernels), False], ids=["c++", "torch"])
def test_cached_attention_with_rows_at_different_positions(T: int, kernels: bool,
                                                            request: pytest.FixtureRequest) -> None:
    """Continuous batching: positions [B, T], each row of the cache at its own place, against the reference."""
    if not kernels:
        request.getfixturevalue("no_kernels")
    cfg = LlamaConfig.from_name("tiny-gqa")
    H, KV, d, S, B = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, 24, 3
    rot = RotaryEmbedding(cfg)
    g = torch.Generator().manual_seed(4)
    caches = [KVCache(B, KV, S, d, torch.float32) for _ in range(2)]
    for c in caches:  # what earlier steps left: each row filled up to its own position
        c.k.copy_(torch.randn(c.k.shape, generator=torch.Generator().manual_seed(5)))
        c.v.copy_(torch.randn(c.v.shape, generator=torch.Generator().manual_seed(6)))
    starts = torch.tensor([2, 9, 15])
    positions = starts[:, None] + torch.arange(T)  # [B, T]
    mask = (positions[..., None] >= torch.arange(S))[:, None]  # [B, 1, T, S]
    cos, sin = rot(positions, torch.float32)  # [B, 1, T, d]
    qkv = torch.randn(B, T, (H + 2 * KV) * d, generator=g)
    got = attention.cached_attention(qkv, cos, sin, positions, caches[0], mask, H, KV)
    want = _cached_reference(qkv, cos, sin, positions, caches[1], mask, H, KV)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(caches[0].k, caches[1].k, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(caches[0].v, caches[1].v, rtol=0, atol=0)


def test_a_prompt_reads_only_the_written_part_of_a_long_cache() -> None:
    """A prompt chunk attends over slots 0..its last position only: a server's slot of thousands of positions
    costs a prompt nothing past what it wrote, and whatever lies beyond (here NaN) never reaches the output."""
    cfg = LlamaConfig.from_name("tiny-gqa")
    H, KV, d, B = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, 1
    rot = RotaryEmbedding(cfg)
    g = torch.Generator().manual_seed(7)
    qkv_all = torch.randn(B, 12, (H + 2 * KV) * d, generator=g)
    long, short = KVCache(B, KV, 256, d, torch.float32), KVCache(B, KV, 12, d, torch.float32)
    long.k.fill_(float("nan")), long.v.fill_(float("nan"))
    for a, b in [(0, 9), (9, 12)]:  # a prompt in two chunks: the second reads what the first wrote
        positions = torch.arange(a, b)
        cos, sin = rot(positions, torch.float32)
        outs = [attention.cached_attention(qkv_all[:, a:b], cos, sin, positions, c,
                                           positions[:, None] >= torch.arange(c.k.shape[2]), H, KV)
                for c in (long, short)]
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)


@pytest.fixture
def onednn(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """oneDNN as the GEMM library (where prompts take the chunked attention), whatever this CPU is."""
    monkeypatch.setenv("CAMELID_GEMM", "onednn")
    linear.gemm_library.cache_clear()
    if linear.gemm_library()[0] != "onednn":
        pytest.skip("this PyTorch has no oneDNN linear")
    yield
    linear.gemm_library.cache_clear()


def _sdpa64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The reference in float64 (the exact answer to compare float32 against), as [B, T, H, d]."""
    return attention.reference(q.double(), k.double(), v.double(), mask).transpose(1, 2)


# MHA / GQA / MQA; T a multiple of the 16-query blocks and not; S > T: a prompt after earlier tokens in the cache;
# 1 and 3 threads (tasks taken from a shared counter)
@needs_kernels
@pytest.mark.parametrize("B,H,KV,T,S,d", [(1, 4, 4, 32, 32, 16), (2, 6, 2, 37, 37, 32), (1, 9, 3, 50, 70, 64),
                                          (2, 4, 1, 17, 40, 8)])
def test_chunked_prompt_attention_matches_sdpa(B: int, H: int, KV: int, T: int, S: int, d: int, threads: int,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention, "PROMPT_QUERY_CHUNK", 16)
    g = torch.Generator().manual_seed(T + S)
    q, k, v = torch.randn(B, H, T, d, generator=g), torch.randn(B, KV, S, d, generator=g), torch.randn(B, KV, S, d,
                                                                                                    generator=g)
    positions = torch.arange(S - T, S)
    masks = [positions[:, None] >= torch.arange(S)]  # [T, S]: causal after S - T earlier tokens
    key_mask = torch.ones(B, S, dtype=torch.bool)
    key_mask[-1, :3] = False  # the last row left-padded by 3 slots (a padding slot sees itself, as in the model)
    masks.append((masks[0] & (key_mask[:, None, :] | (positions[:, None] == torch.arange(S))))[:, None])
    if S == T:
        masks.append(None)
    for mask in masks:
        got = attention._chunked_prompt_attention(q, k, v, mask)
        # (1e-5: oneDNN's summation order and the kernel's polynomial exp; a wrong mask or block is off by ~0.1)
        torch.testing.assert_close(got.double(), _sdpa64(q, k, v, mask), rtol=0, atol=1e-5)


@needs_kernels
def test_chunked_prompt_attention_leaves_a_query_that_sees_nothing_to_sdpa() -> None:
    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    mask = torch.ones(4, 4, dtype=torch.bool).tril()
    mask[2] = False
    assert attention._chunked_prompt_attention(q, k, k, mask) is None


@needs_kernels
def test_which_prompts_take_the_chunked_attention(onednn: None, monkeypatch: pytest.MonkeyPatch) -> None:
    q, k = torch.randn(1, 4, 80, 8), torch.randn(1, 2, 80, 8)
    assert attention._why_not_chunked(q, k, None) is None
    assert "fewer than" in attention._why_not_chunked(q[:, :, :10], k, None)
    assert "autograd" in attention._why_not_chunked(q.requires_grad_(), k, None)
    assert "fp32" in attention._why_not_chunked(q.detach().double(), k, None)
    assert "a mask other than" in attention._why_not_chunked(q.detach(), k, torch.ones(1, 4, 80, 80, dtype=torch.bool))
    assert "a mask other than" in attention._why_not_chunked(q.detach(), k, torch.zeros(80, 80))
    with monkeypatch.context() as m:
        m.setattr(native, "module", lambda: None)
        assert attention._why_not_chunked(q.detach(), k, None) == native.reason()
    monkeypatch.setenv("CAMELID_GEMM", "torch")
    linear.gemm_library.cache_clear()
    assert "torch's GEMM" in attention._why_not_chunked(q.detach(), k, None)


@needs_kernels
@pytest.mark.parametrize("padded", [False, True])
def test_a_long_prompt_through_cached_attention_takes_the_chunked_path(padded: bool, onednn: None, threads: int,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A prompt in two pieces (the second after the first's keys in the cache), GQA, 16-query blocks, against the
    model's steps with SDPA: the same outputs and caches, and the chunked path ran for both pieces."""
    monkeypatch.setattr(attention, "MIN_PROMPT_CHUNKED_T", 8)
    monkeypatch.setattr(attention, "PROMPT_QUERY_CHUNK", 16)
    ran = []
    chunked = attention._chunked_prompt_attention
    monkeypatch.setattr(attention, "_chunked_prompt_attention", lambda *a: ran.append(a[0].shape[2]) or chunked(*a))
    cfg = LlamaConfig.from_name("tiny-gqa")
    H, KV, d, S, B = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, 64, 2
    rot = RotaryEmbedding(cfg)
    g = torch.Generator().manual_seed(8)
    qkv_all = torch.randn(B, 50, (H + 2 * KV) * d, generator=g)
    caches = [KVCache(B, KV, S, d, torch.float32) for _ in range(2)]
    key_mask = torch.ones(B, S, dtype=torch.bool)
    if padded:
        key_mask[1, :5] = False
    for a, b in [(0, 21), (21, 50)]:
        positions = torch.arange(a, b)
        slots = torch.arange(S)
        mask = (positions[:, None] >= slots) & (key_mask[:, None, None, :] | (positions[:, None] == slots))
        cos, sin = rot(positions, torch.float32)
        got = attention.cached_attention(qkv_all[:, a:b], cos, sin, positions, caches[0], mask, H, KV)
        want = _cached_reference(qkv_all[:, a:b], cos, sin, positions, caches[1], mask, H, KV)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(caches[0].v, caches[1].v, rtol=0, atol=0)
    assert ran == [21, 29]
