// Dot-product inner loops shared by the GEMV kernels (linear.cpp) and the whole-model decode step (decode_step.cpp):
// rows [n0, n1) of y = W x for fp32, int8 (one scale per row) and int4 (groups of 32, fp16 scale + min) weights.
//
// With AVX2 + FMA (x86-64-v3 and later) the inner loops are written with intrinsics: FOUR rows at a time, so
// each activation vector loaded from cache feeds four independent FMA chains (one chain per row would wait on
// FMA latency and could not keep up with memory). Elsewhere a plain loop is compiled; both give the same
// result up to float summation order, which tests/ops/test_linear.py checks against the PyTorch references.
#pragma once
#include "common.h"
#include <algorithm>
#include <cmath>
#include <cstdint>
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define CAMELID_AVX2 1
#if (defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__)
#define CAMELID_VNNI 1
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VNNI__)
#define CAMELID_AVX512_INT4 1  // int4 x int8 kernels over two groups per 512-bit vector
#endif
#endif


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

// int4 rows: each group's minimum times the sum of the activations of that group (xs), summed over the row
static inline float min_term(const at::Half* row_min, const float* xs, int64_t G) {
  float acc = 0.f;
  for (int64_t g = 0; g < G; ++g) acc += h2f(row_min[g]) * xs[g];
  return acc;
}

// ---- fp32: y[m, n] = sum_k x[m, k] * w[n, k] ----
// While a block of 4 rows is summed, the next block (the 4 rows that follow in memory) is prefetched, one
// cache line per row per 16 floats: the hardware prefetchers alone leave the loop waiting on memory (measured
// ~10% faster steps at 1 thread). A prefetch never faults, so running past n1 or the matrix is harmless.
#ifdef CAMELID_AVX2
static inline void fma4(const float* r0, const float* r1, const float* r2, const float* r3, __m256 xv, __m256& a0,
                        __m256& a1, __m256& a2, __m256& a3) {
  a0 = _mm256_fmadd_ps(_mm256_loadu_ps(r0), xv, a0);
  a1 = _mm256_fmadd_ps(_mm256_loadu_ps(r1), xv, a1);
  a2 = _mm256_fmadd_ps(_mm256_loadu_ps(r2), xv, a2);
  a3 = _mm256_fmadd_ps(_mm256_loadu_ps(r3), xv, a3);
}
#endif

static inline void dot_f32(const float* x, const float* w, int64_t K, int64_t n0, int64_t n1, float* y) {
  int64_t n = n0;
#ifdef CAMELID_AVX2
  if (K % 8 == 0) {
    for (; n + 4 <= n1; n += 4) {
      const float *r0 = w + n * K, *r1 = r0 + K, *r2 = r1 + K, *r3 = r2 + K;
      const char* next = reinterpret_cast<const char*>(r3 + K);
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      int64_t k = 0;
      for (; k + 16 <= K; k += 16) {  // 16 floats = one 64-byte line per row
        for (int r = 0; r < 4; ++r) _mm_prefetch(next + (r * K + k) * 4, _MM_HINT_T0);
        fma4(r0 + k, r1 + k, r2 + k, r3 + k, _mm256_loadu_ps(x + k), a0, a1, a2, a3);
        fma4(r0 + k + 8, r1 + k + 8, r2 + k + 8, r3 + k + 8, _mm256_loadu_ps(x + k + 8), a0, a1, a2, a3);
      }
      if (k < K) fma4(r0 + k, r1 + k, r2 + k, r3 + k, _mm256_loadu_ps(x + k), a0, a1, a2, a3);  // K % 16 == 8
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

// ---- int8, one scale per row ----
static inline void dot_int8(const float* x, const int8_t* w, const float* s, int64_t K, int64_t n0, int64_t n1,
                            float* y) {
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
static inline void dot_int4(const float* x, const float* xs, const uint8_t* w, const at::Half* sc, const at::Half* mn,
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
    for (int r = 0; r < 4; ++r) y[n + r] = hsum(acc[r]) + min_term(mn + (n + r) * G, xs, G);
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

// ---- int8 activations (llama.cpp's Q8_0 activations): x[k] ~= q[k] * d[k / 32]. The products of int8/int4
// weights with them are integer dot products per group of 32 (AVX2: vpmaddubsw + vpmaddwd), one float
// multiply-add per group instead of per weight. K must be a multiple of 32. ----
static inline void quantize_q8(const float* x, int64_t K, int8_t* q, float* d) {
  for (int64_t g = 0; g < K / 32; ++g) {
    const float* xg = x + g * 32;
    float amax = 0.f;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(xg[j]));
    const float s = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
    d[g] = s;
    for (int j = 0; j < 32; ++j) q[g * 32 + j] = static_cast<int8_t>(std::nearbyint(xg[j] * inv));
  }
}

#ifdef CAMELID_AVX2
// 32 signed int8 x 32 signed int8 -> 8 int32 partial sums -> float. vpmaddubsw wants one unsigned operand:
// |w| times q with w's sign moved onto q (|w|, |q| <= 127, so the pairwise int16 sums cannot overflow).
// With VNNI (AVX512-VNNI + VL, or AVX-VNNI) one vpdpbusd replaces vpmaddubsw + vpmaddwd; the sums are the same
// integers (the int16 pairs above cannot saturate), so both paths give identical results.
static inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(CAMELID_VNNI) && defined(__AVX512VNNI__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(CAMELID_VNNI)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}
static inline __m256 dot_i8x32(__m256i w, __m256i q) {
  return _mm256_cvtepi32_ps(dot_u8s8(_mm256_sign_epi8(w, w), _mm256_sign_epi8(q, w)));
}
// 32 unsigned codes 0..15 x 32 signed int8 -> 8 floats
static inline __m256 dot_u4x32(__m256i w, __m256i q) { return _mm256_cvtepi32_ps(dot_u8s8(w, q)); }
#endif

static inline void dot_int8_q8(const int8_t* q, const float* dq, const int8_t* w, const float* s, int64_t K,
                               int64_t n0, int64_t n1, float* y) {
  const int64_t G = K / 32;
  int64_t n = n0;
#ifdef CAMELID_AVX2
  for (; n + 4 <= n1; n += 4) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t g = 0; g < G; ++g) {
      const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + g * 32));
      const __m256 dv = _mm256_set1_ps(dq[g]);
      for (int r = 0; r < 4; ++r) {
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (n + r) * K + g * 32));
        acc[r] = _mm256_fmadd_ps(dot_i8x32(wv, qv), dv, acc[r]);
      }
    }
    for (int r = 0; r < 4; ++r) y[n + r] = hsum(acc[r]) * s[n + r];
  }
#endif
  for (; n < n1; ++n) {
    const int8_t* row = w + n * K;
    float acc = 0.f;
    for (int64_t g = 0; g < G; ++g) {
      int32_t dot = 0;
      for (int j = 0; j < 32; ++j) dot += (int32_t)row[g * 32 + j] * (int32_t)q[g * 32 + j];
      acc += (float)dot * dq[g];
    }
    y[n] = acc * s[n];
  }
}

// int4 codes (dot_int4's layout) x int8 activations; the minimum multiplies xs, the group sums of the
// dequantised activations (decode_step.cpp's Act::set)
#ifdef CAMELID_AVX512_INT4
// Two groups per 512-bit vector: int32 lanes 0-7 hold group 2p's partial sums, lanes 8-15 group 2p+1's, each
// multiplied by its own scale * dq, so a row's sum takes half the instructions of the 256-bit loop. The
// one-activation and the several-activation kernels below both use these helpers, in the same order, so their
// results stay bit for bit equal.
// 32 packed bytes (groups 2p and 2p+1, dot_int4's layout) -> 64 codes in q's order
static inline __m512i unpack_int4_pair(const uint8_t* p) {
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i low = _mm256_set1_epi8(15);
  const __m256i lo = _mm256_and_si256(b, low), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low);
  // [lo: g0 codes 0-15 | g1 codes 0-15], [hi: g0 codes 16-31 | g1 codes 16-31] -> g0 0-31, g1 0-31
  const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
  return _mm512_shuffle_i64x2(v, v, _MM_SHUFFLE(3, 1, 2, 0));
}
// [a x8, b x8]
static inline __m512 pair_ps(float a, float b) {
  return _mm512_insertf32x8(_mm512_set1_ps(a), _mm256_set1_ps(b), 1);
}
static inline __m512 dot_u4x64(__m512i w, __m512i q) {
  return _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w, q));
}
// one row's sum over G (even) groups; dq2: dq_pairs of the activation
static inline float int4_q8_row(const int8_t* q, const uint8_t* wrow, const at::Half* sc, const __m512* dq2,
                                int64_t G) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t p = 0; p < G / 2; ++p) {
    const __m512i qv = _mm512_loadu_si512(reinterpret_cast<const void*>(q + p * 64));
    const __m512 s = pair_ps(h2f(sc[2 * p]), h2f(sc[2 * p + 1]));
    acc = _mm512_fmadd_ps(dot_u4x64(unpack_int4_pair(wrow + p * 32), qv), _mm512_mul_ps(s, dq2[p]), acc);
  }
  return _mm512_reduce_add_ps(acc);
}
// dq of group pairs as [dq[2p] x8, dq[2p+1] x8]
static inline void dq_pairs(const float* dq, int64_t G, __m512* out) {
  for (int64_t g = 0; g + 2 <= G; g += 2) out[g / 2] = pair_ps(dq[g], dq[g + 1]);
}
// rows with an even number of groups, up to K = 8192, take the 512-bit kernels (others the 256-bit ones)
constexpr int64_t kMaxPairs = 128;
static inline bool int4_pairs(int64_t G) { return G % 2 == 0 && G / 2 <= kMaxPairs; }
#endif

static inline void dot_int4_q8(const int8_t* q, const float* dq, const float* xs, const uint8_t* w,
                               const at::Half* sc, const at::Half* mn, int64_t K, int64_t n0, int64_t n1, float* y) {
  const int64_t G = K / 32;
  int64_t n = n0;
#ifdef CAMELID_AVX512_INT4
  if (int4_pairs(G)) {
    __m512 dq2[kMaxPairs];
    dq_pairs(dq, G, dq2);
    for (; n + 4 <= n1; n += 4)
      for (int r = 0; r < 4; ++r)
        y[n + r] = int4_q8_row(q, w + (n + r) * (K / 2), sc + (n + r) * G, dq2, G) + min_term(mn + (n + r) * G, xs, G);
  }
#endif
#ifdef CAMELID_AVX2
  const __m128i low = _mm_set1_epi8(15);
  for (; n + 4 <= n1; n += 4) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t g = 0; g < G; ++g) {
      const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + g * 32));
      for (int r = 0; r < 4; ++r) {
        const int64_t row = n + r;
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + row * (K / 2) + g * 16));
        // low nibbles are weights 0..15 of the group, high nibbles 16..31: the same order as q
        const __m256i wv = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), low), _mm_and_si128(b, low));
        acc[r] = _mm256_fmadd_ps(dot_u4x32(wv, qv), _mm256_set1_ps(h2f(sc[row * G + g]) * dq[g]), acc[r]);
      }
    }
    for (int r = 0; r < 4; ++r) y[n + r] = hsum(acc[r]) + min_term(mn + (n + r) * G, xs, G);
  }
#endif
  for (; n < n1; ++n) {
    const uint8_t* row = w + n * (K / 2);
    float acc = 0.f;
    for (int64_t g = 0; g < G; ++g) {
      const uint8_t* b = row + g * 16;
      const int8_t* qg = q + g * 32;
      int32_t dot = 0;
      for (int j = 0; j < 16; ++j) dot += (int32_t)(b[j] & 15) * qg[j] + (int32_t)(b[j] >> 4) * qg[j + 16];
      acc += (float)dot * h2f(sc[n * G + g]) * dq[g] + h2f(mn[n * G + g]) * xs[g];
    }
    y[n] = acc;
  }
}

// ---- several int8 activations at once (continuous batching): rows [n0, n1) of y_m = W x_m for M <= 8
// activations (y_m = y + m * ldy). Each weight group is loaded (int4: unpacked) once and multiplied into M
// accumulators. Per row and activation the operations and their order are those of the one-activation kernels
// above (four-row blocks from n0, the scalar loop for the rest), so every result is bit for bit the same. ----
constexpr int kMaxActs = 8;

static inline void dot_int8_q8_multi(int M, const int8_t* const* q, const float* const* dq, const int8_t* w,
                                     const float* s, int64_t K, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  int64_t n = n0;
#ifdef CAMELID_AVX2
  const int64_t G = K / 32, n_vec = n0 + (n1 - n0) / 4 * 4;
  for (; n < n_vec; ++n) {
    __m256 acc[kMaxActs];
    for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + n * K + g * 32));
      for (int m = 0; m < M; ++m) {
        const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[m] + g * 32));
        acc[m] = _mm256_fmadd_ps(dot_i8x32(wv, qv), _mm256_set1_ps(dq[m][g]), acc[m]);
      }
    }
    for (int m = 0; m < M; ++m) y[m * ldy + n] = hsum(acc[m]) * s[n];
  }
#endif
  for (int m = 0; m < M; ++m) dot_int8_q8(q[m], dq[m], w, s, K, n, n1, y + m * ldy);
}

static inline void dot_int4_q8_multi(int M, const int8_t* const* q, const float* const* dq, const float* const* xs,
                                     const uint8_t* w, const at::Half* sc, const at::Half* mn, int64_t K, int64_t n0,
                                     int64_t n1, float* y, int64_t ldy) {
  int64_t n = n0;
#ifdef CAMELID_AVX512_INT4
  if (const int64_t G = K / 32, P = G / 2; int4_pairs(G)) {
    // each weight pair is unpacked once and multiplies all M activations; per activation the operations are
    // int4_q8_row's, in its order
    static thread_local __m512 dq2[kMaxActs][kMaxPairs];
    for (int m = 0; m < M; ++m) dq_pairs(dq[m], G, dq2[m]);
    const int64_t n_vec = n0 + (n1 - n0) / 4 * 4;
    for (; n < n_vec; ++n) {
      __m512 acc[kMaxActs];
      for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
      const uint8_t* wrow = w + n * (K / 2);
      const at::Half* srow = sc + n * G;
      for (int64_t p = 0; p < P; ++p) {
        const __m512i wv = unpack_int4_pair(wrow + p * 32);
        const __m512 s = pair_ps(h2f(srow[2 * p]), h2f(srow[2 * p + 1]));
        for (int m = 0; m < M; ++m) {
          const __m512i qv = _mm512_loadu_si512(reinterpret_cast<const void*>(q[m] + p * 64));
          acc[m] = _mm512_fmadd_ps(dot_u4x64(wv, qv), _mm512_mul_ps(s, dq2[m][p]), acc[m]);
        }
      }
      for (int m = 0; m < M; ++m) y[m * ldy + n] = _mm512_reduce_add_ps(acc[m]) + min_term(mn + n * G, xs[m], G);
    }
    for (int m = 0; m < M; ++m) dot_int4_q8(q[m], dq[m], xs[m], w, sc, mn, K, n, n1, y + m * ldy);
    return;
  }
#endif
#ifdef CAMELID_AVX2
  const int64_t G = K / 32, n_vec = n0 + (n1 - n0) / 4 * 4;
  const __m128i low = _mm_set1_epi8(15);
  for (; n < n_vec; ++n) {
    __m256 acc[kMaxActs];
    for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + n * (K / 2) + g * 16));
      const __m256i wv = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), low), _mm_and_si128(b, low));
      const float scale = h2f(sc[n * G + g]);
      for (int m = 0; m < M; ++m) {
        const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[m] + g * 32));
        acc[m] = _mm256_fmadd_ps(dot_u4x32(wv, qv), _mm256_set1_ps(scale * dq[m][g]), acc[m]);
      }
    }
    for (int m = 0; m < M; ++m) y[m * ldy + n] = hsum(acc[m]) + min_term(mn + n * G, xs[m], G);
  }
#endif
  for (int m = 0; m < M; ++m) dot_int4_q8(q[m], dq[m], xs[m], w, sc, mn, K, n, n1, y + m * ldy);
}
