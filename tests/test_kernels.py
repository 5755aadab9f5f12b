from __future__ import annotations

import os
import shutil

import pytest
import torch

from camelid import kernels

k = kernels.load()
needs_kernels = pytest.mark.skipif(k is None, reason="C++ kernels could not be built here")


def test_kernels_build_wherever_a_cpp_compiler_is_installed() -> None:
    # every kernel test in the suite skips when the kernels are missing; this one makes sure that only happens
    # where they cannot be built (no compiler) or were switched off, never because the build broke
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    switched_off = os.environ.get("CAMELID_NO_KERNELS") == "1"
    assert k is not None or compiler is None or switched_off, f"{compiler} is installed but the kernels did not build"


@needs_kernels
# N not a multiple of 4 and K not a multiple of 8 exercise the plain-loop tails beside the AVX2 blocks; K = 72
# (a multiple of 8, not of 16) the 8-float tail after dot_f32's 16-float, prefetching steps
@pytest.mark.parametrize("M,N,K", [(1, 96, 64), (1, 1536, 576), (3, 40, 96), (2, 37, 100), (8, 64, 64),
                                   (1, 42, 72)])
def test_gemv_f32_matches_torch(M: int, N: int, K: int) -> None:
    x, w = torch.randn(M, K), torch.randn(N, K)
    torch.testing.assert_close(k.gemv_f32(x, w), x @ w.T, rtol=1e-4, atol=1e-4)


@needs_kernels
@pytest.mark.parametrize("M,N,K", [(1, 96, 64), (2, 1536, 576), (1, 39, 72)])
def test_gemv_int8_matches_dequantised(M: int, N: int, K: int) -> None:
    x = torch.randn(M, K)
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    s = torch.rand(N) / 100
    torch.testing.assert_close(k.gemv_int8(x, w, s), kernels.gemv_int8_ref(x, w, s), rtol=1e-4, atol=1e-4)


@needs_kernels
@pytest.mark.parametrize("M,N,K", [(1, 96, 64), (2, 576, 1536), (3, 43, 96), (7, 40, 64)])
def test_gemv_int4_matches_dequantised(M: int, N: int, K: int) -> None:
    x = torch.randn(M, K)
    w = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8)
    s, mn = (torch.rand(N, K // 32) / 10).half(), (torch.randn(N, K // 32) / 10).half()
    torch.testing.assert_close(k.gemv_int4(x, w, s, mn), kernels.gemv_int4_ref(x, w, s, mn), rtol=1e-4, atol=1e-3)


def test_int4_unpack_layout() -> None:
    # byte j of a group holds weight j in the low nibble and weight j + 16 in the high nibble
    q = torch.arange(32, dtype=torch.uint8).remainder(16)[None]
    packed = q[:, :16] | (q[:, 16:] << 4)
    assert torch.equal(kernels.unpack_int4(packed), q)


@needs_kernels
def test_rms_norm_matches_the_module() -> None:
    from camelid.model import RMSNorm

    norm = RMSNorm(96, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 96) * 3
    torch.testing.assert_close(k.rms_norm(x, norm.weight, norm.eps), norm(x), rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("padded", [False, True])
def test_fused_attention_layers_match_the_plain_model(padded: bool) -> None:
    """Prompt (SDPA in both), then single tokens and a 3-token chunk (fused C++ attention in one model)."""
    import copy

    from camelid.config import LlamaConfig
    from camelid.kernels.layers import FastAttention, accelerate
    from camelid.model import Llama

    torch.manual_seed(0)
    plain = Llama(LlamaConfig.from_name("tiny-gqa")).eval()
    plain.fuse()
    fast = accelerate(copy.deepcopy(plain))
    assert isinstance(fast.layers[0].attention, FastAttention)
    ids = torch.randint(0, 320, (2, 20))
    key_mask = torch.ones(2, 24, dtype=torch.bool)
    if padded:
        key_mask[0, :4] = False  # sequence 0 is left-padded by 4
    chunks = [(0, 10)] + [(t, t + 1) for t in range(10, 17)] + [(17, 20)]
    with torch.no_grad():
        outs = []
        for m in (plain, fast):
            m.setup_cache(2, 24)
            kw = {"key_mask": key_mask} if padded else {}
            outs.append(torch.cat([m(ids[:, a:b], torch.arange(a, b), **kw) for a, b in chunks], dim=1))
            m.clear_cache()
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


@needs_kernels
def test_cpp_dequantisation_matches_pytorch() -> None:
    w8, s8 = torch.randint(-127, 128, (37, 96), dtype=torch.int8), torch.rand(37)
    assert torch.equal(k.dequant_int8(w8, s8), w8.float() * s8[:, None])
    w4 = torch.randint(0, 256, (37, 48), dtype=torch.uint8)
    s4, m4 = torch.rand(37, 3).half(), torch.randn(37, 3).half()
    torch.testing.assert_close(k.dequant_int4(w4, s4, m4), kernels.dequant_int4(w4, s4, m4), rtol=1e-6, atol=1e-6)


def _q8(x: torch.Tensor) -> torch.Tensor:
    """x rounded to int8 in blocks of 32 with one scale each (the decode step's int8 activations)."""
    g = x.reshape(-1, 32)
    amax = g.abs().amax(-1, keepdim=True)
    # x * (127 / amax), as the kernel computes it: a differently rounded x / (amax / 127) can land on the other
    # side of a .5 and flip a code, which these peaked tiny models amplify to percents of a logit
    return (torch.round(g * (127 / amax)) * (amax / 127)).reshape(x.shape)


@needs_kernels
@pytest.mark.parametrize("N,K", [(8, 64), (7, 96), (1536, 576)])  # 7: the plain-loop tail after the AVX2 rows
def test_int8_activation_products_match_their_definition(N: int, K: int) -> None:
    x = torch.randn(K)
    w8, s8 = torch.randint(-127, 128, (N, K), dtype=torch.int8), torch.rand(N) / 100
    torch.testing.assert_close(k.gemv_q8(x, 1, [w8, s8]), kernels.gemv_int8_ref(_q8(x)[None], w8, s8)[0],
                               rtol=1e-4, atol=1e-4)
    w4 = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8)
    s4, mn = (torch.rand(N, K // 32) / 10).half(), (torch.randn(N, K // 32) / 10).half()
    torch.testing.assert_close(k.gemv_q8(x, 2, [w4, s4, mn]), kernels.gemv_int4_ref(_q8(x)[None], w4, s4, mn)[0],
                               rtol=1e-4, atol=1e-3)


@needs_kernels
def test_attention_kernel_is_available_where_torch_has_blas() -> None:
    # x86 wheels link MKL (sgemm_); were it missing, training would silently fall back to SDPA
    assert kernels._attention_ok


def sdpa_bthd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The reference: PyTorch's attention on [B, T, heads, D] tensors."""
    y = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                         is_causal=True, enable_gqa=k.shape[2] != q.shape[2])
    return y.transpose(1, 2)


@needs_kernels
# T around the 64-query blocks (1, 63, 64, 65, 130), MHA / GQA / MQA, head sizes 16-64
@pytest.mark.parametrize("B,T,H,KV,D", [(2, 1, 4, 2, 16), (1, 63, 4, 4, 32), (2, 64, 8, 2, 32), (1, 65, 6, 1, 64),
                                        (3, 130, 4, 2, 32)])
@pytest.mark.parametrize("threads", [1, 3])
def test_causal_attention_matches_sdpa_values_and_gradients(B: int, T: int, H: int, KV: int, D: int,
                                                            threads: int) -> None:
    g = torch.Generator().manual_seed(T)
    q, k_, v = (torch.randn(B, T, n, D, generator=g, dtype=torch.float64) for n in (H, KV, KV))
    dy = torch.randn(B, T, H, D, generator=g, dtype=torch.float64)
    ref = [t.clone().requires_grad_() for t in (q, k_, v)]
    sdpa_bthd(*ref).backward(dy)  # float64: the exact answer, to compare float32 against
    ours = [t.float().requires_grad_() for t in (q, k_, v)]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = kernels.causal_attention(*ours)
        y.backward(dy.float())
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(y.double(), sdpa_bthd(*ref).detach(), rtol=0, atol=2e-6)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=0, atol=1e-5)


@needs_kernels
def test_causal_attention_under_compile_and_on_strided_inputs() -> None:
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 70, 8, 32, generator=g, requires_grad=True)  # q, k, v: strided slices of one tensor
    dy = torch.randn(2, 70, 4, 32, generator=g)

    def f(t: torch.Tensor) -> torch.Tensor:
        return kernels.causal_attention(t[:, :, :4], t[:, :, 4:6], t[:, :, 6:])

    outs = []
    for fn in (f, torch.compile(f, fullgraph=True), lambda t: sdpa_bthd(t[:, :, :4], t[:, :, 4:6], t[:, :, 6:])):
        y = fn(qkv)
        y.backward(dy)
        outs.append((y.detach(), qkv.grad))
        qkv.grad = None
    for y, grad in outs[:2]:
        torch.testing.assert_close(y, outs[2][0], rtol=0, atol=1e-5)
        torch.testing.assert_close(grad, outs[2][1], rtol=0, atol=1e-5)


def test_causal_attention_declines_what_it_does_not_do() -> None:
    q = torch.randn(1, 4, 2, 16, dtype=torch.bfloat16)
    assert kernels.causal_attention(q, q, q) is None  # not fp32: the caller uses SDPA
    q = torch.randn(1, kernels.MAX_ATTENTION_T + 1, 1, 16)
    assert kernels.causal_attention(q, q, q) is None  # long sequences: SDPA skips the masked blocks itself


@needs_kernels
@pytest.mark.parametrize("threads", [1, 3])
def test_training_elementwise_kernels_match_torch(threads: int) -> None:
    from camelid.model import apply_rope

    g = torch.Generator().manual_seed(threads)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, w, dy = torch.randn(37, 72, generator=g), torch.randn(72, generator=g), torch.randn(37, 72, generator=g)
        xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
        ref = xr * torch.rsqrt(xr.pow(2).mean(-1, keepdim=True) + 1e-5) * wr
        ref.backward(dy.double())
        y, rstd = k.rms_norm_forward(x, w, 1e-5)
        dx, dw = k.rms_norm_backward(dy, x, w, rstd)
        for ours, theirs in ((y, ref), (dx, xr.grad), (dw, wr.grad)):
            torch.testing.assert_close(ours.double(), theirs.detach(), rtol=1e-5, atol=1e-5)

        a, b = (4 * torch.randn(37, 72, generator=g)).requires_grad_(), torch.randn(37, 72, generator=g)
        b.requires_grad_()
        ref = torch.nn.functional.silu(a) * b
        ref.backward(dy)
        torch.testing.assert_close(k.swiglu_forward(a.detach(), b.detach()), ref.detach(), rtol=1e-5, atol=1e-6)
        da, db = a.detach().clone(), b.detach().clone()
        k.swiglu_backward_(dy, da, db)  # in place: the inputs become their gradients
        torch.testing.assert_close(da, a.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(db, b.grad, rtol=1e-5, atol=1e-6)

        q = torch.randn(2, 9, 3, 16, generator=g)  # [B, T, heads, d]
        ang = torch.randn(9, 8, generator=g)
        cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
        ref = apply_rope(q.transpose(1, 2), cos, sin).transpose(1, 2)
        half = (cos[:, :8].contiguous(), sin[:, :8].contiguous())
        torch.testing.assert_close(k.rope(q, *half, 1.0), ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(k.rope(ref.contiguous(), *half, -1.0), q, rtol=1e-5, atol=1e-5)  # inverse
    finally:
        torch.set_num_threads(before)
