// Matrix-vector products for batch-1 decode on CPU. Decode is memory bound: each kernel streams every
// weight row once, rows split across threads with at::parallel_for. Activations stay fp32; weights may be
// fp32, int8 with one scale per row, or int4 in groups of 32 (Q4_1's layout: fp16 scale and min per group).
// The inner loops live in dot.h (shared with decode_step.cpp). camelid/ops/linear.py holds the references.
#include "dot.h"
#include "kernels.h"

static constexpr int64_t GRAIN = 32;  // rows per task: enough work to amortise scheduling

#ifdef CAMELID_AVX2
// A few activation rows at once (speculative verification, small batches): each weight vector is loaded
// once and multiplied into M accumulators, so the weights are streamed once, not M times.
template <int M>
static void dot_f32_rows(const float* x, const float* w, int64_t K, int64_t N, int64_t n0, int64_t n1, float* y) {
  for (int64_t n = n0; n < n1; ++n) {
    const float* row = w + n * K;
    __m256 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) {
      const __m256 wv = _mm256_loadu_ps(row + k);
      for (int m = 0; m < M; ++m) acc[m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k), acc[m]);
    }
    for (int m = 0; m < M; ++m) y[m * N + n] = hsum(acc[m]);
  }
}

static bool dot_f32_multi(int64_t M, const float* x, const float* w, int64_t K, int64_t N, int64_t n0, int64_t n1,
                          float* y) {
  if (K % 8) return false;
  switch (M) {
    case 2: dot_f32_rows<2>(x, w, K, N, n0, n1, y); return true;
    case 3: dot_f32_rows<3>(x, w, K, N, n0, n1, y); return true;
    case 4: dot_f32_rows<4>(x, w, K, N, n0, n1, y); return true;
    case 5: dot_f32_rows<5>(x, w, K, N, n0, n1, y); return true;
    case 6: dot_f32_rows<6>(x, w, K, N, n0, n1, y); return true;
    case 7: dot_f32_rows<7>(x, w, K, N, n0, n1, y); return true;
    case 8: dot_f32_rows<8>(x, w, K, N, n0, n1, y); return true;
    default: return false;
  }
}
#endif

at::Tensor gemv_f32(at::Tensor x, at::Tensor w) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "fp32 expected");
  x = x.contiguous(); w = w.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>(); const float* wp = w.data_ptr<float>(); float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, GRAIN, [&](int64_t n0, int64_t n1) {
#ifdef CAMELID_AVX2
    if (M > 1 && dot_f32_multi(M, xp, wp, K, N, n0, n1, yp)) return;
#endif
    for (int64_t m = 0; m < M; ++m) dot_f32(xp + m * K, wp, K, n0, n1, yp + m * N);
  });
  return y;
}

at::Tensor gemv_f16(at::Tensor x, at::Tensor w) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kHalf, "fp32 x and fp16 w expected");
  x = x.contiguous(); w = w.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>(); const at::Half* wp = w.data_ptr<at::Half>(); float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, GRAIN, [&](int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < M; ++m) dot_f16(xp + m * K, wp, K, n0, n1, yp + m * N);
  });
  return y;
}

at::Tensor gemv_int8(at::Tensor x, at::Tensor w, at::Tensor scale) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kChar, "fp32 x and int8 w expected");
  x = x.contiguous(); w = w.contiguous(); scale = scale.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>(); const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>(); float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, GRAIN, [&](int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < M; ++m) dot_int8(xp + m * K, wp, sp, K, n0, n1, yp + m * N);
  });
  return y;
}

at::Tensor gemv_int4(at::Tensor x, at::Tensor w, at::Tensor scale, at::Tensor minimum) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kByte, "fp32 x and uint8 w expected");
  TORCH_CHECK(scale.scalar_type() == at::kHalf && minimum.scalar_type() == at::kHalf, "fp16 scale and minimum expected");
  x = x.contiguous(); w = w.contiguous(); scale = scale.contiguous(); minimum = minimum.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), G = K / 32;
  TORCH_CHECK(K % 32 == 0, "K must be a multiple of 32");
  auto y = at::empty({M, N}, x.options());
  auto xsum = x.view({M, G, 32}).sum(-1).contiguous();
  const float* xp = x.data_ptr<float>(); const float* xs = xsum.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>(); const at::Half* sp = scale.data_ptr<at::Half>();
  const at::Half* mp = minimum.data_ptr<at::Half>(); float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, GRAIN, [&](int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < M; ++m) dot_int4(xp + m * K, xs + m * G, wp, sp, mp, K, n0, n1, yp + m * N);
  });
  return y;
}

// Whole-matrix dequantisation for prompt passes (then torch's GEMM): one parallel pass instead of ~8 tensor ops.
// `out` (fp32, contiguous, [N, K]) is written in place when given, so that a caller can reuse one buffer for every
// block of every product instead of faulting in fresh pages each time.
static at::Tensor dequant_output(const std::optional<at::Tensor>& out, int64_t N, int64_t K, const at::Tensor& like) {
  if (!out.has_value()) return at::empty({N, K}, like.options().dtype(at::kFloat));
  TORCH_CHECK(out->scalar_type() == at::kFloat && out->is_contiguous() && out->dim() == 2 && out->size(0) == N &&
              out->size(1) == K, "dequant: out must be a contiguous fp32 tensor of shape [", N, ", ", K, "]");
  return *out;
}

at::Tensor dequant_f16(at::Tensor w, std::optional<at::Tensor> out_) {
  TORCH_CHECK(w.scalar_type() == at::kHalf, "fp16 w expected");
  w = w.contiguous();
  const int64_t N = w.size(0), K = w.size(1);
  auto out = dequant_output(out_, N, K, w);
  const at::Half* wp = w.data_ptr<at::Half>(); float* op = out.data_ptr<float>();
  at::parallel_for(0, N, GRAIN, [&](int64_t n0, int64_t n1) {
    int64_t i = n0 * K;
    // exact: every fp16 value is an fp32 value. 8 at a time (F16C): one at a time, this pass took as long as the
    // GEMM after it for a 64-token prompt
#ifdef CAMELID_AVX2
    for (; i + 8 <= n1 * K; i += 8)
      _mm256_storeu_ps(op + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wp + i))));
#endif
    for (; i < n1 * K; ++i) op[i] = h2f(wp[i]);
  });
  return out;
}

at::Tensor dequant_int8(at::Tensor w, at::Tensor scale, std::optional<at::Tensor> out_) {
  w = w.contiguous(); scale = scale.contiguous();
  const int64_t N = w.size(0), K = w.size(1);
  auto out = dequant_output(out_, N, K, scale);
  const int8_t* wp = w.data_ptr<int8_t>(); const float* sp = scale.data_ptr<float>(); float* op = out.data_ptr<float>();
  at::parallel_for(0, N, GRAIN, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      // vectorised by the compiler (AVX-512 with -march=native); the local scale and restrict pointers spare it
      // the run-time check that the stores do not overwrite sp[n]
      const float s = sp[n];
      const int8_t* __restrict__ row = wp + n * K;
      float* __restrict__ o = op + n * K;
      for (int64_t k = 0; k < K; ++k) o[k] = (float)row[k] * s;
    }
  });
  return out;
}

at::Tensor dequant_int4(at::Tensor w, at::Tensor scale, at::Tensor minimum, std::optional<at::Tensor> out_) {
  TORCH_CHECK(scale.scalar_type() == at::kHalf && minimum.scalar_type() == at::kHalf, "fp16 scale and minimum expected");
  w = w.contiguous(); scale = scale.contiguous(); minimum = minimum.contiguous();
  const int64_t N = w.size(0), K = w.size(1) * 2, G = K / 32;
  auto out = dequant_output(out_, N, K, scale);
  const uint8_t* wp = w.data_ptr<uint8_t>(); const at::Half* sp = scale.data_ptr<at::Half>();
  const at::Half* mp = minimum.data_ptr<at::Half>(); float* op = out.data_ptr<float>();
  at::parallel_for(0, N, GRAIN, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t g = 0; g < G; ++g) {
        const uint8_t* b = wp + n * (K / 2) + g * 16;
        float* o = op + n * K + g * 32;
        const float s = h2f(sp[n * G + g]), m = h2f(mp[n * G + g]);
#ifdef CAMELID_AVX2
        // the scalar loop below, 8 values at a time (it is compute-bound, not memory-bound, when left scalar)
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b)), low = _mm_set1_epi8(15);
        const __m128i lo = _mm_and_si128(v, low), hi = _mm_and_si128(_mm_srli_epi16(v, 4), low);
        const __m256 sv = _mm256_set1_ps(s), mv = _mm256_set1_ps(m);
        _mm256_storeu_ps(o, _mm256_add_ps(_mm256_mul_ps(u8x8(lo), sv), mv));
        _mm256_storeu_ps(o + 8, _mm256_add_ps(_mm256_mul_ps(u8x8(_mm_srli_si128(lo, 8)), sv), mv));
        _mm256_storeu_ps(o + 16, _mm256_add_ps(_mm256_mul_ps(u8x8(hi), sv), mv));
        _mm256_storeu_ps(o + 24, _mm256_add_ps(_mm256_mul_ps(u8x8(_mm_srli_si128(hi, 8)), sv), mv));
#else
        for (int j = 0; j < 16; ++j) { o[j] = (float)(b[j] & 15) * s + m; o[j + 16] = (float)(b[j] >> 4) * s + m; }
#endif
      }
  });
  return out;
}

// GGUF Q8_0 rows (blocks of 34 bytes: fp16 scale d, then 32 int8 codes q; weight = q * d), uint8 [N, K / 32 * 34]
// -> fp32 [N, K]: the one fp32 product per weight that the gguf library's numpy code computes, in one parallel
// pass instead of a dozen array operations (loading a Llama-3-8B-shaped Q8_0 file as int8 spent most of its time
// there).
at::Tensor dequant_q8_0(at::Tensor blocks, int64_t K, std::optional<at::Tensor> out_) {
  TORCH_CHECK(blocks.scalar_type() == at::kByte && blocks.dim() == 2 && K % 32 == 0 && blocks.size(1) == K / 32 * 34,
              "Q8_0 blocks: uint8 [N, K / 32 * 34] expected");
  blocks = blocks.contiguous();
  const int64_t N = blocks.size(0), G = K / 32;
  auto out = dequant_output(out_, N, K, blocks);
  const uint8_t* bp = blocks.data_ptr<uint8_t>(); float* op = out.data_ptr<float>();
  at::parallel_for(0, N, GRAIN, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t g = 0; g < G; ++g) {
        const uint8_t* b = bp + (n * G + g) * 34;
        at::Half h;
        std::memcpy(&h, b, 2);
        const float d = h2f(h);
        const int8_t* q = reinterpret_cast<const int8_t*>(b + 2);
        float* o = op + n * K + g * 32;
        for (int j = 0; j < 32; ++j) o[j] = (float)q[j] * d;
      }
  });
  return out;
}
