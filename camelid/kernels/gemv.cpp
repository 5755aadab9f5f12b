// Matrix-vector products for batch-1 decode on CPU. Decode is memory bound: each kernel streams every
// weight row once, rows split across threads with at::parallel_for. Activations stay fp32; weights may be
// fp32, int8 with one scale per row, or int4 in groups of 32 (Q4_1's layout: fp16 scale and min per group).
//
// With AVX2 + FMA (x86-64-v3 and later) the inner loops are written with intrinsics: FOUR rows at a time, so
// each activation vector loaded from cache feeds four independent FMA chains (one chain per row would wait on
// FMA latency and could not keep up with memory). Elsewhere a plain loop is compiled; both give the same
// result up to float summation order, which tests/test_kernels.py checks against the PyTorch twins.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define CAMELID_AVX2 1
#endif

static constexpr int64_t GRAIN = 32;  // rows per task: enough work to amortise scheduling

#ifdef CAMELID_AVX2
static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
// 8 int8 / uint8 codes -> 8 floats
static inline __m256 i8x8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
static inline __m256 u8x8(__m128i b) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)); }
#endif

static inline float h2f(const at::Half& h) {
#ifdef CAMELID_AVX2
  return _cvtsh_ss(h.x);  // one F16C instruction
#else
  return static_cast<float>(h);
#endif
}

// ---- fp32: y[m, n] = sum_k x[m, k] * w[n, k] ----
static void dot_f32(const float* x, const float* w, int64_t K, int64_t n0, int64_t n1, float* y) {
  int64_t n = n0;
#ifdef CAMELID_AVX2
  if (K % 8 == 0) {
    for (; n + 4 <= n1; n += 4) {
      const float *r0 = w + n * K, *r1 = r0 + K, *r2 = r1 + K, *r3 = r2 + K;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t k = 0; k < K; k += 8) {
        __m256 xv = _mm256_loadu_ps(x + k);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(r0 + k), xv, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(r1 + k), xv, a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(r2 + k), xv, a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(r3 + k), xv, a3);
      }
      y[n] = hsum(a0); y[n + 1] = hsum(a1); y[n + 2] = hsum(a2); y[n + 3] = hsum(a3);
    }
  }
#endif
  for (; n < n1; ++n) {
    const float* row = w + n * K;
    float acc = 0.f;
    for (int64_t k = 0; k < K; ++k) acc += x[k] * row[k];
    y[n] = acc;
  }
}

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

// ---- int8, one scale per row ----
static void dot_int8(const float* x, const int8_t* w, const float* s, int64_t K, int64_t n0, int64_t n1, float* y) {
  int64_t n = n0;
#ifdef CAMELID_AVX2
  if (K % 8 == 0) {
    for (; n + 4 <= n1; n += 4) {
      const int8_t *r0 = w + n * K, *r1 = r0 + K, *r2 = r1 + K, *r3 = r2 + K;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t k = 0; k < K; k += 8) {
        __m256 xv = _mm256_loadu_ps(x + k);
        a0 = _mm256_fmadd_ps(i8x8(r0 + k), xv, a0);
        a1 = _mm256_fmadd_ps(i8x8(r1 + k), xv, a1);
        a2 = _mm256_fmadd_ps(i8x8(r2 + k), xv, a2);
        a3 = _mm256_fmadd_ps(i8x8(r3 + k), xv, a3);
      }
      y[n] = hsum(a0) * s[n]; y[n + 1] = hsum(a1) * s[n + 1];
      y[n + 2] = hsum(a2) * s[n + 2]; y[n + 3] = hsum(a3) * s[n + 3];
    }
  }
#endif
  for (; n < n1; ++n) {
    const int8_t* row = w + n * K;
    float acc = 0.f;
    for (int64_t k = 0; k < K; ++k) acc += x[k] * (float)row[k];
    y[n] = acc * s[n];
  }
}

// ---- int4: w uint8 [N, K/2]; in each group of 32 weights byte j holds weight j (low nibble) and weight
// j + 16 (high nibble); weight = q * scale + minimum, scale/minimum fp16 [N, K/32]. xs[g] = sum of x over
// group g, so the minimum costs one multiply-add per group. ----
static void dot_int4(const float* x, const float* xs, const uint8_t* w, const at::Half* sc, const at::Half* mn,
                     int64_t K, int64_t n0, int64_t n1, float* y) {
  const int64_t G = K / 32;
  int64_t n = n0;
#ifdef CAMELID_AVX2
  const __m128i low = _mm_set1_epi8(15);
  for (; n + 4 <= n1; n += 4) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t g = 0; g < G; ++g) {
      const float* xg = x + g * 32;
      const __m256 x0 = _mm256_loadu_ps(xg), x1 = _mm256_loadu_ps(xg + 8);
      const __m256 x2 = _mm256_loadu_ps(xg + 16), x3 = _mm256_loadu_ps(xg + 24);
      for (int r = 0; r < 4; ++r) {
        const int64_t row = n + r;
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + row * (K / 2) + g * 16));
        const __m128i lo = _mm_and_si128(b, low), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low);
        __m256 d = _mm256_mul_ps(u8x8(lo), x0);
        d = _mm256_fmadd_ps(u8x8(_mm_srli_si128(lo, 8)), x1, d);
        d = _mm256_fmadd_ps(u8x8(hi), x2, d);
        d = _mm256_fmadd_ps(u8x8(_mm_srli_si128(hi, 8)), x3, d);
        // scale the group's partial sums and keep them in a vector: one horizontal sum per row, not per group
        acc[r] = _mm256_fmadd_ps(d, _mm256_set1_ps(h2f(sc[row * G + g])), acc[r]);
      }
    }
    for (int r = 0; r < 4; ++r) {
      const at::Half* m = mn + (n + r) * G;
      float bias = 0.f;
      for (int64_t g = 0; g < G; ++g) bias += h2f(m[g]) * xs[g];
      y[n + r] = hsum(acc[r]) + bias;
    }
  }
#endif
  for (; n < n1; ++n) {
    const uint8_t* row = w + n * (K / 2);
    float acc = 0.f;
    for (int64_t g = 0; g < G; ++g) {
      const uint8_t* b = row + g * 16;
      const float* xg = x + g * 32;
      float dot = 0.f;
      for (int j = 0; j < 16; ++j) dot += xg[j] * (float)(b[j] & 15) + xg[j + 16] * (float)(b[j] >> 4);
      acc += dot * h2f(sc[n * G + g]) + h2f(mn[n * G + g]) * xs[g];
    }
    y[n] = acc;
  }
}

torch::Tensor gemv_f32(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && w.dtype() == torch::kFloat32, "fp32 expected");
  x = x.contiguous(); w = w.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>(); const float* wp = w.data_ptr<float>(); float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, GRAIN, [&](int64_t n0, int64_t n1) {
#ifdef CAMELID_AVX2
    if (M > 1 && dot_f32_multi(M, xp, wp, K, N, n0, n1, yp)) return;
#endif
    for (int64_t m = 0; m < M; ++m) dot_f32(xp + m * K, wp, K, n0, n1, yp + m * N);
  });
  return y;
}

torch::Tensor gemv_int8(torch::Tensor x, torch::Tensor w, torch::Tensor scale) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && w.dtype() == torch::kInt8, "fp32 x and int8 w expected");
  x = x.contiguous(); w = w.contiguous(); scale = scale.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>(); const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>(); float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, GRAIN, [&](int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < M; ++m) dot_int8(xp + m * K, wp, sp, K, n0, n1, yp + m * N);
  });
  return y;
}

torch::Tensor gemv_int4(torch::Tensor x, torch::Tensor w, torch::Tensor scale, torch::Tensor minimum) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && w.dtype() == torch::kUInt8, "fp32 x and uint8 w expected");
  TORCH_CHECK(scale.dtype() == torch::kHalf && minimum.dtype() == torch::kHalf, "fp16 scale and minimum expected");
  x = x.contiguous(); w = w.contiguous(); scale = scale.contiguous(); minimum = minimum.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), G = K / 32;
  TORCH_CHECK(K % 32 == 0, "K must be a multiple of 32");
  auto y = torch::empty({M, N}, x.options());
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
torch::Tensor dequant_int8(torch::Tensor w, torch::Tensor scale) {
  w = w.contiguous(); scale = scale.contiguous();
  const int64_t N = w.size(0), K = w.size(1);
  auto out = torch::empty({N, K}, scale.options());
  const int8_t* wp = w.data_ptr<int8_t>(); const float* sp = scale.data_ptr<float>(); float* op = out.data_ptr<float>();
  at::parallel_for(0, N, GRAIN, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t k = 0; k < K; ++k) op[n * K + k] = (float)wp[n * K + k] * sp[n];
  });
  return out;
}

torch::Tensor dequant_int4(torch::Tensor w, torch::Tensor scale, torch::Tensor minimum) {
  TORCH_CHECK(scale.dtype() == torch::kHalf && minimum.dtype() == torch::kHalf, "fp16 scale and minimum expected");
  w = w.contiguous(); scale = scale.contiguous(); minimum = minimum.contiguous();
  const int64_t N = w.size(0), K = w.size(1) * 2, G = K / 32;
  auto out = torch::empty({N, K}, scale.options().dtype(torch::kFloat32));
  const uint8_t* wp = w.data_ptr<uint8_t>(); const at::Half* sp = scale.data_ptr<at::Half>();
  const at::Half* mp = minimum.data_ptr<at::Half>(); float* op = out.data_ptr<float>();
  at::parallel_for(0, N, GRAIN, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t g = 0; g < G; ++g) {
        const uint8_t* b = wp + n * (K / 2) + g * 16;
        float* o = op + n * K + g * 32;
        const float s = h2f(sp[n * G + g]), m = h2f(mp[n * G + g]);
        for (int j = 0; j < 16; ++j) { o[j] = (float)(b[j] & 15) * s + m; o[j + 16] = (float)(b[j] >> 4) * s + m; }
      }
  });
  return out;
}

// decode.cpp
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps);
torch::Tensor attend_cached(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor positions,
                            torch::Tensor cache_k, torch::Tensor cache_v, torch::Tensor mask, int64_t H,
                            int64_t KV);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dequant_int8", &dequant_int8);
  m.def("dequant_int4", &dequant_int4);
  m.def("rms_norm", &rms_norm);
  m.def("attend_cached", &attend_cached);
  m.def("gemv_f32", &gemv_f32);
  m.def("gemv_int8", &gemv_int8);
  m.def("gemv_int4", &gemv_int4);
}
