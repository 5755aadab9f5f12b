from __future__ import annotations

import pytest
import torch

from camelid import kernels

k = kernels.load()
needs_kernels = pytest.mark.skipif(k is None, reason="C++ kernels could not be built here")


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
