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
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define CAMELID_AVX2 1
#if (defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__)
#define CAMELID_VNNI 1
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__) && \
    defined(__AVX512VNNI__)
#define CAMELID_AVX512_Q8 1  // int8/int4 x int8 kernels over two groups per 512-bit vector
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
// AVX2: while a block of 4 rows is summed, the next block (the 4 rows that follow in memory) is prefetched, one
// cache line per row per 16 floats: the hardware prefetchers alone leave the loop waiting on memory (measured
// ~10% faster steps at 1 thread). A prefetch never faults, so running past n1 or the matrix is harmless.
// AVX-512 on AMD CPUs: one 64-byte load is one whole cache line, 8 rows at a time (then 4), a masked tail for
// any K, and no software prefetch: on a 2-core AMD EPYC (Zen 5) the whole fp32 decode step ran 3-11% faster at 1
// thread (two runs) than with the AVX2 loop and its prefetches, the weight streaming alone 12%
// (benchmarks/fp32_stream.cpp), and prefetches (T0 or NTA, next block) in this loop made it slower. On an Intel Xeon the same loop was ~7% slower than the AVX2 one (benchmarks/README.md), so Intel CPUs
// keep that.
#if defined(CAMELID_AVX2) && defined(__AVX512F__)
static inline bool f32_avx512_loop() {
  static const bool amd = __builtin_cpu_is("amd");
  return amd;
}

template <int R>
static inline void dot_f32_avx512(const float* x, const float* w, int64_t K, int64_t n, float* y) {
  const float* r0 = w + n * K;
  __m512 a[R];
  for (int r = 0; r < R; ++r) a[r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m512 xv = _mm512_loadu_ps(x + k);
    for (int r = 0; r < R; ++r) a[r] = _mm512_fmadd_ps(_mm512_loadu_ps(r0 + r * K + k), xv, a[r]);
  }
  if (k < K) {
    const __mmask16 m = (__mmask16)((1u << (K - k)) - 1);
    const __m512 xv = _mm512_maskz_loadu_ps(m, x + k);
    for (int r = 0; r < R; ++r) a[r] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, r0 + r * K + k), xv, a[r]);
  }
  for (int r = 0; r < R; ++r) y[n + r] = _mm512_reduce_add_ps(a[r]);
}
#endif

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
#if defined(CAMELID_AVX2) && defined(__AVX512F__)
  if (f32_avx512_loop()) {
    for (; n + 8 <= n1; n += 8) dot_f32_avx512<8>(x, w, K, n, y);
    for (; n + 4 <= n1; n += 4) dot_f32_avx512<4>(x, w, K, n, y);
  }
#endif
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

// Row n of dot_f32 alone, with the arithmetic dot_f32 gives a row inside a block of 4 or 8 (every row of a
// thread's share but its last 1-3): the greedy head recomputes a few candidate rows this way, and gets the
// logits the whole-matrix pass gives them.
static inline float dot_f32_row(const float* x, const float* w, int64_t K, int64_t n) {
  const float* row = w + n * K;
  float y = 0.f;
#if defined(CAMELID_AVX2) && defined(__AVX512F__)
  if (f32_avx512_loop()) {
    dot_f32_avx512<1>(x, row, K, 0, &y);
    return y;
  }
#endif
#ifdef CAMELID_AVX2
  if (K % 8 == 0) {
    __m256 a0 = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(row + k), _mm256_loadu_ps(x + k), a0);
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(row + k + 8), _mm256_loadu_ps(x + k + 8), a0);
    }
    if (k < K) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(row + k), _mm256_loadu_ps(x + k), a0);
    return hsum(a0);
  }
#endif
  for (int64_t k = 0; k < K; ++k) y += x[k] * row[k];
  return y;
}

// ---- fp16 weights (stored 16-bit, converted and accumulated in fp32): half the bytes of fp32 to stream ----
// AVX-512: one row at a time, two whole 64-byte lines per iteration into four accumulators, and a prefetch of
// each line 8 KiB ahead. Rows are contiguous, so each thread reads its share of the matrix as one sequential
// stream; interleaved reads of several short rows (SmolLM2's are 1152 bytes) left the hardware prefetchers
// behind. On a 2-core AMD EPYC (Zen 5), over SmolLM2's 269 MB of fp16 matrices (benchmarks/f16_stream.cpp,
// 2 threads, per-round medians of 40): 41.9 GB/s, as fast as the fp32 loop over its 538 MB (41.3), where
// 8 rows of half lines with a prefetch 8 KiB ahead streamed 31.9 (1.30x); 4 rows of whole lines with a
// prefetch one block ahead ~1.2x slower than this loop, and no prefetch ~1.1x slower. 1 thread: 34.1 GB/s.
#if defined(CAMELID_AVX2) && defined(__AVX512F__)
static inline void dot_f16_row_avx512(const float* x, const uint16_t* r, int64_t K, float* y) {
  auto f16x16 = [](__m256i h) { return _mm512_cvtph_ps(h); };
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    const char* p = reinterpret_cast<const char*>(r + k);
    _mm_prefetch(p + 8192, _MM_HINT_T0);
    _mm_prefetch(p + 8192 + 64, _MM_HINT_T0);
    const __m512i v = _mm512_loadu_si512(p), u = _mm512_loadu_si512(p + 64);
    a0 = _mm512_fmadd_ps(f16x16(_mm512_castsi512_si256(v)), _mm512_loadu_ps(x + k), a0);
    a1 = _mm512_fmadd_ps(f16x16(_mm512_extracti64x4_epi64(v, 1)), _mm512_loadu_ps(x + k + 16), a1);
    a2 = _mm512_fmadd_ps(f16x16(_mm512_castsi512_si256(u)), _mm512_loadu_ps(x + k + 32), a2);
    a3 = _mm512_fmadd_ps(f16x16(_mm512_extracti64x4_epi64(u, 1)), _mm512_loadu_ps(x + k + 48), a3);
  }
  for (; k < K; k += 16) {  // the last < 64 weights: up to four (masked) half lines
    const __mmask16 m = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
    a0 = _mm512_fmadd_ps(f16x16(_mm256_maskz_loadu_epi16(m, r + k)), _mm512_maskz_loadu_ps(m, x + k), a0);
  }
  *y = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}
#endif

static inline void dot_f16(const float* x, const at::Half* w, int64_t K, int64_t n0, int64_t n1, float* y) {
  int64_t n = n0;
#if defined(CAMELID_AVX2) && defined(__AVX512F__)
  const uint16_t* w16 = reinterpret_cast<const uint16_t*>(w);
  for (; n < n1; ++n) dot_f16_row_avx512(x, w16 + n * K, K, y + n);
#elif defined(CAMELID_AVX2)
  if (K % 8 == 0) {
    for (; n < n1; ++n) {
      const __m128i* row = reinterpret_cast<const __m128i*>(w + n * K);
      __m256 a0 = _mm256_setzero_ps(), a1 = a0;
      int64_t k = 0;
      for (; k + 16 <= K; k += 16) {
        a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(row + k / 8)), _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(row + k / 8 + 1)), _mm256_loadu_ps(x + k + 8), a1);
      }
      if (k < K) a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(row + k / 8)), _mm256_loadu_ps(x + k), a0);
      y[n] = hsum(_mm256_add_ps(a0, a1));
    }
  }
#endif
  for (; n < n1; ++n) {
    const at::Half* row = w + n * K;
    float acc = 0.f;
    for (int64_t k = 0; k < K; ++k) acc += x[k] * h2f(row[k]);
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

#if defined(CAMELID_AVX2) && defined(__AVX512F__)
// dot_int8 with 512-bit vectors (K % 16 == 0), for the greedy head's int8 logits of fp32 activations: 256 bits at
// a time the loop is bound by its int8 -> fp32 conversions, not by memory.
static inline void dot_int8_avx512(const float* x, const int8_t* w, const float* s, int64_t K, int64_t n0,
                                   int64_t n1, float* y) {
  auto codes = [](const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  };
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    const int8_t* r = w + n * K;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < K; k += 16) {
      const __m512 xv = _mm512_loadu_ps(x + k);
      a0 = _mm512_fmadd_ps(codes(r + k), xv, a0);
      a1 = _mm512_fmadd_ps(codes(r + K + k), xv, a1);
      a2 = _mm512_fmadd_ps(codes(r + 2 * K + k), xv, a2);
      a3 = _mm512_fmadd_ps(codes(r + 3 * K + k), xv, a3);
    }
    y[n] = _mm512_reduce_add_ps(a0) * s[n]; y[n + 1] = _mm512_reduce_add_ps(a1) * s[n + 1];
    y[n + 2] = _mm512_reduce_add_ps(a2) * s[n + 2]; y[n + 3] = _mm512_reduce_add_ps(a3) * s[n + 3];
  }
  if (n < n1) dot_int8(x, w, s, K, n, n1, y);
}
#endif

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

// ---- AVX-512 VNNI: two groups of 32 per 512-bit vector, and every weight vector loaded (int4: unpacked) once
// for up to kMaxActs activations. The one-activation kernels are the M = 1 case of the same templates, so a
// row's result is bit for bit the same whatever the batch it is computed in: per row and activation, the
// operations and their order do not depend on M. ----
constexpr int kMaxActs = 8;
#ifdef CAMELID_AVX512_Q8
constexpr int64_t kMaxPairs = 512;  // int8 rows up to K = 32768 (others take the 256-bit kernels)
static inline bool q8_pairs(int64_t G) { return G % 2 == 0 && G / 2 <= kMaxPairs; }
// [a x8, b x8]
static inline __m512 pair_ps(float a, float b) {
  return _mm512_insertf32x8(_mm512_set1_ps(a), _mm256_set1_ps(b), 1);
}

// The weights kPrefetchBytes ahead are prefetched while a row is multiplied, one 64-byte line per line read (int4's
// scales and minimums, separate streams, kPrefetchRows rows ahead): the hardware prefetchers alone leave the loops
// waiting on memory, and a burst of prefetches for a whole row at its start did little better (8B-shaped rows at 1
// thread: int8 12 GB/s with bursts, 30 GB/s spread; 4 KB ahead and 2 KB ahead were slower than 8 KB). A prefetch
// never faults, so reading past the matrix is harmless.
constexpr int64_t kPrefetchRows = 4;
constexpr int64_t kPrefetchBytes = 8192;
static inline void prefetch_row(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(c + b, _MM_HINT_T0);
  _mm_prefetch(c + bytes - 1, _MM_HINT_T0);  // the last line, where the row does not start on a line
}

// int8 weights: vpdpbusd wants one unsigned operand, so the weights are read as w + 128 (w ^ 0x80) and each
// lane's accumulator starts at -128 * (the sum of its 4 activation codes): the integer lane sums are exactly
// those of w * q. Lanes 0-7 hold group 2p, lanes 8-15 group 2p + 1.
template <int M>
static inline void int8_q8_pairs(const int8_t* const* q, const float* const* dq, const int8_t* w, const float* s,
                                 int64_t K, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  const int64_t P = K / 64;
  static thread_local std::vector<__m512i> corr_tls;  // [p][m]
  static thread_local std::vector<__m512> dq2_tls;    // [p][m]
  corr_tls.resize(P * M);
  dq2_tls.resize(P * M);
  // thread_local lookups kept out of the loops: in a shared library each can be a call (int4 rows ran ~3x slower)
  __m512i* const corr = corr_tls.data();
  __m512* const dq2 = dq2_tls.data();
  const __m512i bias = _mm512_set1_epi8((char)0x80), zero = _mm512_setzero_si512();
  for (int m = 0; m < M; ++m)
    for (int64_t p = 0; p < P; ++p) {
      const __m512i qv = _mm512_loadu_si512(q[m] + p * 64);
      corr[p * M + m] = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, bias, qv));
      dq2[p * M + m] = pair_ps(dq[m][2 * p], dq[m][2 * p + 1]);
    }
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* row = w + n * K;
    const char* ahead = reinterpret_cast<const char*>(row) + kPrefetchBytes;
    __m512 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t p = 0; p < P; ++p) {
      _mm_prefetch(ahead + 64 * p, _MM_HINT_T0);  // one line per line read, not a burst per row
      const __m512i wu = _mm512_xor_si512(_mm512_loadu_si512(row + p * 64), bias);
      for (int m = 0; m < M; ++m) {
        const __m512i d = _mm512_dpbusd_epi32(corr[p * M + m], wu, _mm512_loadu_si512(q[m] + p * 64));
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), dq2[p * M + m], acc[m]);
      }
    }
    for (int m = 0; m < M; ++m) y[m * ldy + n] = _mm512_reduce_add_ps(acc[m]) * s[n];
  }
}

// int4 weights (dot_int4's layout): 64 bytes of a row are four groups, their low nibbles inputs 0-15 of each
// group and their high nibbles inputs 16-31. The activations are copied once per call into that order (per chunk
// of four groups: 64 bytes that meet the low nibbles, 64 that meet the high ones; zeros past the row), so int32
// lane l of a chunk's sums belongs to group 4c + l / 4. A chunk then costs two vpdpbusd, one conversion and one
// multiply-add whose factors (group scale times activation scale) are spread to their lanes by one permute from a
// vector of 16 groups; the minimum term takes one multiply-add per 16 groups. That is about a third of the
// instructions per weight of two groups per vector (the kernel before, compute-bound on 8B-shaped rows).
// Any K that is a multiple of 32 (a masked load reads a last chunk of fewer than four groups).
static inline __m512i quad_index(int c) {  // lanes [4c x4, 4c+1 x4, 4c+2 x4, 4c+3 x4]
  return _mm512_set_epi32(4 * c + 3, 4 * c + 3, 4 * c + 3, 4 * c + 3, 4 * c + 2, 4 * c + 2, 4 * c + 2, 4 * c + 2,
                          4 * c + 1, 4 * c + 1, 4 * c + 1, 4 * c + 1, 4 * c, 4 * c, 4 * c, 4 * c);
}
template <int M>
static inline void int4_q8_quads(const int8_t* const* q, const float* const* dq, const float* const* xs,
                                 const uint8_t* w, const at::Half* sc, const at::Half* mn, int64_t K, int64_t n0,
                                 int64_t n1, float* y, int64_t ldy) {
  const int64_t G = K / 32, C = (G + 3) / 4, B = (G + 15) / 16;
  static thread_local std::vector<int8_t> qbuf;  // [c][m][128]: the low-nibble then the high-nibble order
  static thread_local std::vector<float> fbuf;   // [b][m][32]: 16 activation scales, then 16 group sums
  qbuf.assign(C * M * 128, 0);
  fbuf.assign(B * M * 32, 0.f);
  int8_t* const qb = qbuf.data();  // (thread_local lookups kept out of the loops, as above)
  float* const fb = fbuf.data();
  for (int m = 0; m < M; ++m) {
    for (int64_t g = 0; g < G; ++g) {
      int8_t* o = qb + ((g / 4) * M + m) * 128 + (g % 4) * 16;
      std::memcpy(o, q[m] + g * 32, 16);
      std::memcpy(o + 64, q[m] + g * 32 + 16, 16);
      float* f = fb + ((g / 16) * M + m) * 32 + g % 16;
      f[0] = dq[m][g];
      f[16] = xs[m][g];
    }
  }
  __m512i idx[4];
  for (int c = 0; c < 4; ++c) idx[c] = quad_index(c);
  const __m512i low = _mm512_set1_epi8(15);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * (K / 2);
    const at::Half* srow = sc + n * G;
    const at::Half* mrow = mn + n * G;
    const char* ahead = reinterpret_cast<const char*>(row) + kPrefetchBytes;
    __m512 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < B; ++b) {
      // the scales and minimums of the row kPrefetchRows ahead, one line per 16 groups (the codes: per chunk below)
      _mm_prefetch(reinterpret_cast<const char*>(srow + kPrefetchRows * G + 16 * b), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(mrow + kPrefetchRows * G + 16 * b), _MM_HINT_T0);
      const int64_t ng = std::min<int64_t>(16, G - 16 * b);
      const __mmask16 gmask = (__mmask16)((1u << ng) - 1);
      const __m512 s16 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(gmask, srow + 16 * b));
      const __m512 m16 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(gmask, mrow + 16 * b));
      __m512 sd[M];
      for (int m = 0; m < M; ++m) {
        const float* f = fb + (b * M + m) * 32;
        sd[m] = _mm512_mul_ps(s16, _mm512_loadu_ps(f));
        acc[m] = _mm512_fmadd_ps(m16, _mm512_loadu_ps(f + 16), acc[m]);
      }
      const int64_t nc = (ng + 3) / 4;
      for (int64_t j = 0; j < nc; ++j) {
        const int64_t c = 4 * b + j, left = G - 4 * c;
        _mm_prefetch(ahead + 64 * c, _MM_HINT_T0);
        const __m512i v = left >= 4 ? _mm512_loadu_si512(row + 64 * c)
                                    : _mm512_maskz_loadu_epi8((__mmask64)((1ull << (16 * left)) - 1), row + 64 * c);
        const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        for (int m = 0; m < M; ++m) {
          const int8_t* qc = qb + (c * M + m) * 128;
          __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(qc));
          d = _mm512_dpbusd_epi32(d, hi, _mm512_loadu_si512(qc + 64));
          acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_permutexvar_ps(idx[j], sd[m]), acc[m]);
        }
      }
    }
    for (int m = 0; m < M; ++m) y[m * ldy + n] = _mm512_reduce_add_ps(acc[m]);
  }
}

// int4 weights interleaved 16 rows at a time (`interleave_int4`): int32 lane i of every vector belongs to row i of
// a block of 16, so a group's integer dot products are summed inside the lanes (8 vpdpbusd per group and
// activation, each with 4 activation bytes broadcast) and each (group, activation) costs one conversion and two
// multiply-adds for all 16 rows. Per weight that is about a third of the instructions of two groups per vector,
// which matters once several activations make the product compute-bound (continuous batching). Per row and activation the
// operations and their order do not depend on M. Block layout, per group of 32 inputs (kInterleavedGroupBytes):
// four 64-byte vectors, vector c holding inputs 8c..8c+3 (low nibbles) and 8c+4..8c+7 (high) of row i at bytes
// 4i..4i+3; then the 16 rows' fp16 scales, then their fp16 minimums.
constexpr int64_t kInterleavedRows = 16, kInterleavedGroupBytes = 4 * 64 + 2 * 32;
template <int M>
static inline void int4x16_q8(const int8_t* const* q, const float* const* dq, const float* const* xs,
                              const uint8_t* w, int64_t K, int64_t N, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  const int64_t G = K / 32;
  const __m512i low = _mm512_set1_epi8(15);
  for (int64_t n = n0; n < n1; n += kInterleavedRows) {
    const uint8_t* blk = w + (n / kInterleavedRows) * G * kInterleavedGroupBytes;
    __m512 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      const uint8_t* p = blk + g * kInterleavedGroupBytes;
      prefetch_row(p + 4 * kInterleavedGroupBytes, kInterleavedGroupBytes);
      __m512i isum[M];
      for (int m = 0; m < M; ++m) isum[m] = _mm512_setzero_si512();
      for (int c = 0; c < 4; ++c) {
        const __m512i v = _mm512_loadu_si512(p + 64 * c);
        const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        for (int m = 0; m < M; ++m) {
          const int8_t* qg = q[m] + g * 32 + 8 * c;
          int32_t q0, q1;
          std::memcpy(&q0, qg, 4);
          std::memcpy(&q1, qg + 4, 4);
          isum[m] = _mm512_dpbusd_epi32(isum[m], lo, _mm512_set1_epi32(q0));
          isum[m] = _mm512_dpbusd_epi32(isum[m], hi, _mm512_set1_epi32(q1));
        }
      }
      const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 256)));
      const __m512 mn = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 288)));
      for (int m = 0; m < M; ++m) {
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[m]), _mm512_mul_ps(s, _mm512_set1_ps(dq[m][g])), acc[m]);
        acc[m] = _mm512_fmadd_ps(mn, _mm512_set1_ps(xs[m][g]), acc[m]);
      }
    }
    const __mmask16 rows = (__mmask16)((1u << std::min<int64_t>(kInterleavedRows, std::min(n1, N) - n)) - 1);
    for (int m = 0; m < M; ++m) _mm512_mask_storeu_ps(y + m * ldy + n, rows, acc[m]);
  }
}

// int8 weights (one scale per row) interleaved the same way (`interleave_int8`): per group of 32 inputs, eight
// 64-byte vectors, vector c holding inputs 4c..4c+3 of row i at bytes 4i..4i+3, stored as w + 128 (vpdpbusd's
// unsigned operand; each sum starts at -128 * the group's activation codes, so the integer sums are exactly those of
// w * q); after the block's G groups, its 16 fp32 row scales.
constexpr int64_t kInterleavedInt8GroupBytes = 8 * 64;
template <int M>
static inline void int8x16_q8(const int8_t* const* q, const float* const* dq, const int8_t* w, int64_t K, int64_t N,
                              int64_t n0, int64_t n1, float* y, int64_t ldy) {
  const int64_t G = K / 32, block_bytes = G * kInterleavedInt8GroupBytes + 64;
  static thread_local int32_t corr_tls[2 * kMaxPairs][kMaxActs];  // [g][m]: -128 * sum of activation m's group g
  int32_t(*const corr)[kMaxActs] = corr_tls;
  for (int m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      int32_t sum = 0;
      for (int j = 0; j < 32; ++j) sum += q[m][g * 32 + j];
      corr[g][m] = -128 * sum;
    }
  for (int64_t n = n0; n < n1; n += kInterleavedRows) {
    const uint8_t* blk = reinterpret_cast<const uint8_t*>(w) + (n / kInterleavedRows) * block_bytes;
    __m512 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      const uint8_t* p = blk + g * kInterleavedInt8GroupBytes;
      prefetch_row(p + 2 * kInterleavedInt8GroupBytes, kInterleavedInt8GroupBytes);
      __m512i isum[M];
      for (int m = 0; m < M; ++m) isum[m] = _mm512_set1_epi32(corr[g][m]);
      for (int c = 0; c < 8; ++c) {
        const __m512i v = _mm512_loadu_si512(p + 64 * c);
        for (int m = 0; m < M; ++m) {
          int32_t q4;
          std::memcpy(&q4, q[m] + g * 32 + 4 * c, 4);
          isum[m] = _mm512_dpbusd_epi32(isum[m], v, _mm512_set1_epi32(q4));
        }
      }
      for (int m = 0; m < M; ++m)
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[m]), _mm512_set1_ps(dq[m][g]), acc[m]);
    }
    const __m512 s = _mm512_loadu_ps(reinterpret_cast<const float*>(blk + G * kInterleavedInt8GroupBytes));
    const __mmask16 rows = (__mmask16)((1u << std::min<int64_t>(kInterleavedRows, std::min(n1, N) - n)) - 1);
    for (int m = 0; m < M; ++m) _mm512_mask_storeu_ps(y + m * ldy + n, rows, _mm512_mul_ps(acc[m], s));
  }
}

// M (1..kMaxActs) as a template argument, so the accumulators live in registers
template <typename F>
static inline void with_acts(int M, F&& f) {
  switch (M) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}
#endif

#ifdef CAMELID_AVX512_Q8
static inline void dot_int8x16_q8_multi(int M, const int8_t* const* q, const float* const* dq, const int8_t* w,
                                        int64_t K, int64_t N, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  with_acts(M, [&](auto m) { int8x16_q8<decltype(m)::value>(q, dq, w, K, N, n0, n1, y, ldy); });
}
static inline void dot_int4x16_q8_multi(int M, const int8_t* const* q, const float* const* dq, const float* const* xs,
                                        const uint8_t* w, int64_t K, int64_t N, int64_t n0, int64_t n1, float* y,
                                        int64_t ldy) {
  with_acts(M, [&](auto m) { int4x16_q8<decltype(m)::value>(q, dq, xs, w, K, N, n0, n1, y, ldy); });
}
#endif

static inline void dot_int8_q8(const int8_t* q, const float* dq, const int8_t* w, const float* s, int64_t K,
                               int64_t n0, int64_t n1, float* y) {
  const int64_t G = K / 32;
  int64_t n = n0;
#ifdef CAMELID_AVX512_Q8
  if (q8_pairs(G)) return int8_q8_pairs<1>(&q, &dq, w, s, K, n0, n1, y, 0);
#endif
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

static inline void dot_int4_q8(const int8_t* q, const float* dq, const float* xs, const uint8_t* w,
                               const at::Half* sc, const at::Half* mn, int64_t K, int64_t n0, int64_t n1, float* y) {
  const int64_t G = K / 32;
  int64_t n = n0;
#ifdef CAMELID_AVX512_Q8
  return int4_q8_quads<1>(&q, &dq, &xs, w, sc, mn, K, n0, n1, y, 0);
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

static inline void dot_int8_q8_multi(int M, const int8_t* const* q, const float* const* dq, const int8_t* w,
                                     const float* s, int64_t K, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  int64_t n = n0;
#ifdef CAMELID_AVX512_Q8
  if (q8_pairs(K / 32))
    return with_acts(M, [&](auto m) { int8_q8_pairs<decltype(m)::value>(q, dq, w, s, K, n0, n1, y, ldy); });
#endif
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
#ifdef CAMELID_AVX512_Q8
  return with_acts(M, [&](auto m) { int4_q8_quads<decltype(m)::value>(q, dq, xs, w, sc, mn, K, n0, n1, y, ldy); });
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
