"""Linear layers over fp32 / int8 / int4 weights: the C++ GEMV and dequantisation against the references, and the
formats themselves (quantisation, int4 packing)."""

from __future__ import annotations

import threading

import pytest
import torch
from helpers import needs_kernels

from camelid.errors import CamelidError
from camelid.ops import linear, native


def _weights(kind: str, N: int, K: int, g: torch.Generator) -> list[torch.Tensor]:
    if kind == "f32":
        return [torch.randn(N, K, generator=g)]
    if kind == "f16":
        return [torch.randn(N, K, generator=g).half()]
    if kind == "int8":
        return [torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g), torch.rand(N, generator=g) / 100]
    return [torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=g),
            (torch.rand(N, K // 32, generator=g) / 10).half(), (torch.randn(N, K // 32, generator=g) / 10).half()]


def _reference64(x: torch.Tensor, kind: str, w: list[torch.Tensor]) -> torch.Tensor:
    return x.double() @ linear.dequantize_reference(kind, *w).double().T


@needs_kernels
# N not a multiple of 4 and K not a multiple of 8 exercise the plain-loop tails beside the AVX2 blocks; K = 72
# (a multiple of 8, not of 16) the 8-float tail after dot_f32's 16-float, prefetching steps; with AVX-512, N = 37
# and 42 the 8-row, 4-row and single-row blocks, K = 100 and 72 the masked tail; fp16 rows go two lines (64
# weights) at a time, then half lines (K = 48, 100, 120), the last one masked (72, 100, 120)
@pytest.mark.parametrize("kind,M,N,K", [("f32", 1, 96, 64), ("f32", 1, 1536, 576), ("f32", 3, 40, 96),
                                        ("f32", 2, 37, 100), ("f32", 8, 64, 64), ("f32", 1, 42, 72),
                                        ("int8", 1, 96, 64), ("int8", 2, 1536, 576), ("int8", 1, 39, 72),
                                        ("int4", 1, 96, 64), ("int4", 2, 576, 1536), ("int4", 3, 43, 96),
                                        ("int4", 7, 40, 64), ("f16", 1, 96, 64), ("f16", 1, 1536, 576),
                                        ("f16", 3, 37, 100), ("f16", 8, 42, 72), ("f16", 1, 5, 8),
                                        ("f16", 1, 6, 48), ("f16", 2, 41, 120)])
def test_gemv_matches_the_reference(kind: str, M: int, N: int, K: int, threads: int) -> None:
    g = torch.Generator().manual_seed(N)
    x, w = torch.randn(M, K, generator=g), _weights(kind, N, K, g)
    assert linear.choose(kind, x).impl.startswith("C++")
    got = linear.linear(x, kind, *w)
    torch.testing.assert_close(got.double(), _reference64(x, kind, w), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(getattr(native.module(), f"gemv_{kind}")(x, *w), got, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["f32", "f16", "int8", "int4"])
def test_prompts_and_no_kernels_use_dequantisation_and_torch(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(1)
    w = _weights(kind, 40, 64, g)
    x = torch.randn(2, 9, 64, generator=g)  # 18 rows: more than a GEMV's
    want = _reference64(x.reshape(-1, 64), kind, w).view(2, 9, 40)
    assert "rows" in linear.choose(kind, x).reason and linear.choose(kind, x).impl == "PyTorch"
    torch.testing.assert_close(linear.linear(x, kind, *w).double(), want, rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(native, "module", lambda: None)
    x1 = x[:, :1]
    torch.testing.assert_close(linear.linear(x1, kind, *w), linear.reference(x1, kind, *w), rtol=1e-5, atol=1e-5)
    assert linear.choose(kind, x1).impl == "PyTorch"


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("at_once", [64 * 7, 64 * 40, 64 * 1000])  # blocks of 7 rows (and 5 left), one, one
def test_a_prompt_dequantises_the_weight_a_block_of_rows_at_a_time(kind: str, at_once: int,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(2)
    w = _weights(kind, 40, 64, g)
    x = torch.randn(2, 9, 64, generator=g)
    blocks = []
    matmul_t = linear.matmul_t
    monkeypatch.setattr(linear, "matmul_t", lambda x, w: blocks.append(w.shape[0]) or matmul_t(x, w))
    monkeypatch.setattr(linear, "DEQUANTIZE_AT_ONCE", at_once)
    got = linear.linear(x, kind, *w)
    assert blocks == ([7] * 5 + [5] if at_once == 64 * 7 else [40])
    want = _reference64(x.reshape(-1, 64), kind, w).view(2, 9, 40)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def _fresh_blocks(x: torch.Tensor, kind: str, w: list[torch.Tensor]) -> torch.Tensor:
    """The prompt product with a freshly allocated fp32 block per step (what the scratch buffer replaces)."""
    n, step = w[0].shape[0], max(1, linear.DEQUANTIZE_AT_ONCE // x.shape[-1])
    return torch.cat([linear.matmul_t(x, linear.dequantize(kind, *(t[a:a + step] for t in w)))
                      for a in range(0, n, step)], dim=1)


@needs_kernels
@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("at_once", [64 * 7, 64 * 40, 64 * 1000, 1])  # 1: one row a block, more than the buffer
def test_dequantising_into_the_scratch_buffer_gives_the_same_bits(kind: str, at_once: int,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(3)
    w = _weights(kind, 40, 64, g)
    x = torch.randn(17, 64, generator=g)
    monkeypatch.setattr(linear, "DEQUANTIZE_AT_ONCE", at_once)
    first = linear.linear(x, kind, *w)
    assert torch.equal(first, _fresh_blocks(x, kind, w))
    buf = linear._scratch_block(1)
    assert torch.equal(linear.linear(x, kind, *w), first)  # again, through the reused buffer
    assert linear._scratch_block(1) is buf
    x_other, w_other = torch.randn(17, 64, generator=g), _weights(kind, 40, 64, g)
    assert torch.equal(linear.linear(x_other, kind, *w_other), _fresh_blocks(x_other, kind, w_other))


@needs_kernels
def test_prompt_products_on_two_threads_at_once_keep_their_own_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two threads running prompt products at the same time each dequantise into their own buffer: every result
    equals the one computed alone."""
    monkeypatch.setattr(linear, "DEQUANTIZE_AT_ONCE", 64 * 8)  # 5 blocks per product: many chances to interleave
    g = torch.Generator().manual_seed(4)
    jobs = [(kind, torch.randn(12, 64, generator=g), _weights(kind, 40, 64, g)) for kind in ("int8", "int4") * 2]
    alone = [_fresh_blocks(x, kind, w) for kind, x, w in jobs]
    start, end, results, buffers = threading.Barrier(len(jobs)), threading.Barrier(len(jobs)), {}, {}

    def work(i: int) -> None:
        kind, x, w = jobs[i]
        start.wait()
        results[i] = [linear.linear(x, kind, *w) for _ in range(50)]
        buffers[i] = linear._scratch_block(1).data_ptr()
        end.wait()  # every thread alive, with its buffer, when the addresses are compared

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, want in enumerate(alone):
        assert all(torch.equal(got, want) for got in results[i])
    assert len(set(buffers.values())) == len(jobs)


@needs_kernels
def test_dequantising_into_a_wrong_buffer_is_refused() -> None:
    w = _weights("int8", 4, 64, torch.Generator().manual_seed(5))
    with pytest.raises(RuntimeError, match="out must be a contiguous fp32 tensor of shape"):
        native.module().dequant_int8(*w, out=torch.empty(4, 32))
    out = torch.empty(4, 64)
    assert native.module().dequant_int8(*w, out=out).data_ptr() == out.data_ptr()
    assert torch.equal(out, linear.dequantize_reference("int8", *w))


@needs_kernels
# 64: two groups (one 512-bit int8 pair), 96: an odd group count (int8: the 256-bit kernels), 160: four int4 groups
# and a chunk of one, 576: SmolLM2's width, 8256: 258 groups (more than 16 KiB of int4 row); N not a multiple of 4:
# the kernels' tails; 8 / 11 / 20 rows: one full group of 8 activations and the rest
@pytest.mark.parametrize("kind,N,K", [("int8", 37, 64), ("int8", 40, 96), ("int8", 130, 576), ("int8", 21, 8256),
                                      ("int4", 37, 64), ("int4", 40, 96), ("int4", 21, 160), ("int4", 130, 576),
                                      ("int4", 21, 8256)])
def test_prompt_rows_take_int8_activations_and_each_row_is_its_own_product(
        kind: str, N: int, K: int, threads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """More than MAX_GEMV_ROWS rows of int8/int4 weights with CAMELID_INT8_PROMPTS=1: int8 activations
    (`gemm_q8`), equal to the products of the rounded activations, and each row bit for bit what the one-row
    kernel gives it alone (so a row's result does not depend on the rows beside it: the serving step relies on
    the same kernels)."""
    monkeypatch.setenv("CAMELID_INT8_PROMPTS", "1")
    g = torch.Generator().manual_seed(N + K)
    w = _weights(kind, N, K, g)
    code = 1 if kind == "int8" else 2
    for M in (9, 11, 20):
        x = torch.randn(M, K, generator=g) * torch.rand(M, 1, generator=g) * 4
        assert linear.choose(kind, x).impl.startswith("C++") and "int8 activations" in linear.choose(kind, x).reason
        got = linear.linear(x, kind, *w)
        torch.testing.assert_close(got.double(), _reference64(_q8(x), kind, w), rtol=1e-4, atol=1e-3)
        for m in range(M):
            assert torch.equal(got[m], native.module().gemv_q8(x[m], code, w))
        assert torch.equal(native.module().gemm_q8(x[:8], code, w), got[:8])
        assert torch.equal(native.module().gemm_q8(x[3:4], code, w)[0], got[3])


@needs_kernels
def test_cpp_dequantisation_matches_the_reference() -> None:
    g = torch.Generator().manual_seed(2)
    w8 = _weights("int8", 37, 96, g)
    assert torch.equal(linear.dequantize("int8", *w8), linear.dequantize_reference("int8", *w8))
    w4 = _weights("int4", 37, 96, g)
    torch.testing.assert_close(linear.dequantize("int4", *w4), linear.dequantize_reference("int4", *w4),
                               rtol=1e-6, atol=1e-6)
    w16 = _weights("f16", 37, 96, g)
    assert torch.equal(linear.dequantize("f16", *w16), w16[0].float())  # every fp16 value is an fp32 value


def test_int4_packing_layout_and_round_trip() -> None:
    # byte j of a group holds weight j in the low nibble and weight j + 16 in the high nibble
    q = torch.arange(32, dtype=torch.uint8).remainder(16)[None]
    packed = linear.pack_int4(q)
    assert packed[0, 0] == 0 | (0 << 4) and packed[0, 1] == 1 | (1 << 4) and packed.shape == (1, 16)
    assert torch.equal(linear.unpack_int4(packed), q)
    codes = torch.randint(0, 16, (5, 96), dtype=torch.uint8)
    assert torch.equal(linear.unpack_int4(linear.pack_int4(codes)), codes)


def test_quantisation_formats_reproduce_their_weights() -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(48, 96, generator=g)
    q8, s8 = linear.quantize_int8(w)
    assert q8.dtype == torch.int8 and s8.shape == (48,)
    assert (linear.dequantize_reference("int8", q8, s8) - w).abs().max() <= s8.max() / 2 + 1e-6  # half a step
    q4, s4, m4 = linear.quantize_int4(w)
    assert q4.shape == (48, 48) and s4.dtype == m4.dtype == torch.float16
    err = (linear.dequantize_reference("int4", q4, s4, m4) - w).abs().view(48, 3, 32).amax(-1)
    assert (err <= s4.float() / 2 + 1e-3).all()  # half a step per group (fp16 scale and minimum)
    with pytest.raises(CamelidError, match="divisible by 32"):
        linear.quantize_int4(torch.randn(4, 40))


def test_int8_quantisation_in_place_gives_the_same_codes() -> None:
    # the loader's form: the fp32 rows overwritten, codes and scales written into slices of the model's tensors
    g = torch.Generator().manual_seed(4)
    w = torch.randn(40, 64, generator=g) * torch.logspace(-8, 4, 40)[:, None]
    w[3] = 0  # a zero row: the smallest scale
    w[5, 7] = -1e5  # a row whose largest magnitude is negative
    # symmetric per row: the scale max |w| / 127 (at least 1e-12), codes w / scale rounded to nearest even
    s8 = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q8 = torch.round(w / s8[:, None]).clamp(-127, 127).to(torch.int8)
    assert all(torch.equal(a, b) for a, b in zip(linear.quantize_int8(w), (q8, s8), strict=True))
    qweight, scale = torch.zeros(50, 64, dtype=torch.int8), torch.zeros(50)
    linear.quantize_int8_(w.clone(), qweight[5:45], scale[5:45])
    assert torch.equal(qweight[5:45], q8) and torch.equal(scale[5:45], s8)
    assert not qweight[:5].any() and not scale[45:].any()


def _q8(x: torch.Tensor) -> torch.Tensor:
    """x rounded to int8 in blocks of 32 with one scale each (the decode step's int8 activations)."""
    g = x.reshape(-1, 32)
    amax = g.abs().amax(-1, keepdim=True)
    # x * (127 / amax), as the kernel computes it: a differently rounded x / (amax / 127) can land on the other
    # side of a .5 and flip a code, which these peaked tiny models amplify to percents of a logit
    return (torch.round(g * (127 / amax)) * (amax / 127)).reshape(x.shape)


@needs_kernels
# 7: the plain-loop tail after the AVX2 rows; 160 and 14336 (Llama-3-8B's down projection): int4 rows of 4 groups
# and a masked last chunk
@pytest.mark.parametrize("N,K", [(8, 64), (7, 96), (8, 160), (1536, 576), (9, 14336)])
def test_int8_activation_products_match_their_definition(N: int, K: int) -> None:
    g = torch.Generator().manual_seed(K)
    x = torch.randn(K, generator=g)
    for kind, code in (("int8", 1), ("int4", 2)):
        w = _weights(kind, N, K, g)
        want = _reference64(_q8(x)[None], kind, w)[0]
        torch.testing.assert_close(native.module().gemv_q8(x, code, w).double(), want, rtol=1e-4, atol=1e-3)


@needs_kernels
def test_gemv_under_compile_is_a_custom_op() -> None:
    g = torch.Generator().manual_seed(4)
    w = _weights("int4", 64, 96, g)
    x = torch.randn(1, 96, generator=g)
    compiled = torch.compile(lambda t: linear.linear(t, "int4", *w), fullgraph=True)
    torch.testing.assert_close(compiled(x), linear.linear(x, "int4", *w), rtol=1e-5, atol=1e-5)


@pytest.fixture
def gemm(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201 - yields a setter
    """Set CAMELID_GEMM for one test (gemm_library is cached per process)."""

    def use(value: str) -> tuple[str, str]:
        monkeypatch.setenv("CAMELID_GEMM", value)
        linear.gemm_library.cache_clear()
        return linear.gemm_library()

    yield use
    linear.gemm_library.cache_clear()


@pytest.mark.parametrize("library", ["onednn", "torch"])
def test_matmul_t_is_x_times_w_transposed_with_either_library(library: str, gemm) -> None:  # noqa: ANN001
    if gemm(library)[0] != library:
        pytest.skip("this PyTorch has no oneDNN linear")
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=g) for s in [(37, 48), (20, 48), (20,)])
    want = x.double() @ w.double().T
    torch.testing.assert_close(linear.matmul_t(x, w).double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(linear.matmul_t(x, w, b).double(), want + b.double(), rtol=1e-5, atol=1e-5)
    # transposed operands are strided views (a backward pass's products)
    gy = torch.randn(37, 20, generator=g)
    torch.testing.assert_close(linear.matmul_t(gy, w.t()).double(), gy.double() @ w.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(linear.matmul_t(gy.t(), x.t()).double(), gy.double().T @ x.double(),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("library", ["onednn", "torch"])
def test_trainable_linear_gives_autograds_values_and_gradients(library: str, gemm) -> None:  # noqa: ANN001
    if gemm(library)[0] != library:
        pytest.skip("this PyTorch has no oneDNN linear")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, 48, generator=g, dtype=torch.float64)
    w, b = torch.randn(20, 48, generator=g, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
    want_leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    want = torch.nn.functional.linear(*want_leaves)
    up = torch.randn(want.shape, generator=g, dtype=torch.float64)
    want.backward(up)
    leaves = [t.float().requires_grad_() for t in (x, w, b)]
    got = linear.trainable(*leaves)
    got.backward(up.float())
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-5)
    for ours, ref in zip(leaves, want_leaves, strict=True):
        torch.testing.assert_close(ours.grad.double(), ref.grad, rtol=1e-5, atol=1e-5)


def test_gemm_choice_follows_camelid_gemm(gemm) -> None:  # noqa: ANN001
    assert gemm("torch") == ("torch", "CAMELID_GEMM=torch")
    with pytest.raises(CamelidError, match="CAMELID_GEMM='mkl': use onednn, torch or auto"):
        gemm("mkl")
