from __future__ import annotations

import pytest
import torch

from camelid import kernels

k = kernels.load()
needs_kernels = pytest.mark.skipif(k is None, reason="C++ kernels could not be built here")


@needs_kernels
# N not a multiple of 4 and K not a multiple of 8 exercise the plain-loop tails beside the AVX2 blocks
@pytest.mark.parametrize("M,N,K", [(1, 96, 64), (1, 1536, 576), (3, 40, 96), (2, 37, 100)])
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
@pytest.mark.parametrize("M,N,K", [(1, 96, 64), (2, 576, 1536), (3, 43, 96)])
def test_gemv_int4_matches_dequantised(M: int, N: int, K: int) -> None:
    x = torch.randn(M, K)
    w = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8)
    s, mn = torch.rand(N, K // 32) / 10, torch.randn(N, K // 32) / 10
    torch.testing.assert_close(k.gemv_int4(x, w, s, mn), kernels.gemv_int4_ref(x, w, s, mn), rtol=1e-4, atol=1e-3)


def test_int4_unpack_layout() -> None:
    # byte j of a group holds weight j in the low nibble and weight j + 16 in the high nibble
    q = torch.arange(32, dtype=torch.uint8).remainder(16)[None]
    packed = q[:, :16] | (q[:, 16:] << 4)
    assert torch.equal(kernels.unpack_int4(packed), q)
