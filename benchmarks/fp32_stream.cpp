// The fp32 decode step's weight streaming alone: y = W x over SmolLM2-135M's matrices (30 layers of qkv, o,
// gate+up and down products, then the 49152-row head: 538 MB), with several inner loops (AVX2 4 rows with or
// without software prefetch, T0/NTA/T1, one or two blocks ahead; AVX-512 4 or 8 rows with or without prefetch),
// each over the weights in 4 KiB pages and in 2 MiB transparent huge pages, rounds interleaved.
// Prints ms per pass (CPU time at 1 thread, wall time otherwise) and each loop's median per-round speed against
// the AVX2 prefetching loop in 4 KiB pages (dot.h's dot_f32 before its AVX-512 loop).
//
//   g++ -O3 -march=native -fopenmp benchmarks/fp32_stream.cpp -o /tmp/fp32_stream   (an AVX-512 CPU)
//   OMP_NUM_THREADS=1 /tmp/fp32_stream 1 40 [names, e.g. T0d1,z8none]                 (threads, rounds)
#include <immintrin.h>
#include <omp.h>
#include <sys/mman.h>
#include <chrono>
#include <ctime>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cstdint>
#include <vector>
#include <algorithm>
#include <functional>
static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s)); s = _mm_add_ss(s, _mm_movehdup_ps(s)); return _mm_cvtss_f32(s);
}
static inline void fma4(const float* r0, const float* r1, const float* r2, const float* r3, __m256 xv, __m256& a0,
                        __m256& a1, __m256& a2, __m256& a3) {
  a0 = _mm256_fmadd_ps(_mm256_loadu_ps(r0), xv, a0); a1 = _mm256_fmadd_ps(_mm256_loadu_ps(r1), xv, a1);
  a2 = _mm256_fmadd_ps(_mm256_loadu_ps(r2), xv, a2); a3 = _mm256_fmadd_ps(_mm256_loadu_ps(r3), xv, a3);
}
// HINT: 0 none, 1 T0, 2 NTA, 3 T1; DIST: blocks ahead
template <int HINT, int DIST>
void dot_v(const float* x, const float* w, int64_t K, int64_t n0, int64_t n1, float* y) {
  for (int64_t n = n0; n + 4 <= n1; n += 4) {
    const float *r0 = w + n * K, *r1 = r0 + K, *r2 = r1 + K, *r3 = r2 + K;
    const char* next = reinterpret_cast<const char*>(r0 + DIST * 4 * K);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      if (HINT == 1) for (int r = 0; r < 4; ++r) _mm_prefetch(next + (r * K + k) * 4, _MM_HINT_T0);
      if (HINT == 2) for (int r = 0; r < 4; ++r) _mm_prefetch(next + (r * K + k) * 4, _MM_HINT_NTA);
      if (HINT == 3) for (int r = 0; r < 4; ++r) _mm_prefetch(next + (r * K + k) * 4, _MM_HINT_T1);
      fma4(r0 + k, r1 + k, r2 + k, r3 + k, _mm256_loadu_ps(x + k), a0, a1, a2, a3);
      fma4(r0 + k + 8, r1 + k + 8, r2 + k + 8, r3 + k + 8, _mm256_loadu_ps(x + k + 8), a0, a1, a2, a3);
    }
    if (k < K) fma4(r0 + k, r1 + k, r2 + k, r3 + k, _mm256_loadu_ps(x + k), a0, a1, a2, a3);
    y[n] = hsum(a0); y[n + 1] = hsum(a1); y[n + 2] = hsum(a2); y[n + 3] = hsum(a3);
  }
}
// AVX-512, R rows at a time, prefetch next block T0
template <int R, int HINT>
void dot512(const float* x, const float* w, int64_t K, int64_t n0, int64_t n1, float* y) {
  for (int64_t n = n0; n + R <= n1; n += R) {
    const float* r0 = w + n * K;
    const char* next = reinterpret_cast<const char*>(r0 + R * K);
    __m512 a[R];
    for (int r = 0; r < R; ++r) a[r] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      const __m512 xv = _mm512_loadu_ps(x + k);
      for (int r = 0; r < R; ++r) {
        if (HINT == 1) _mm_prefetch(next + (r * K + k) * 4, _MM_HINT_T0);
        if (HINT == 2) _mm_prefetch(next + (r * K + k) * 4, _MM_HINT_NTA);
        a[r] = _mm512_fmadd_ps(_mm512_loadu_ps(r0 + r * K + k), xv, a[r]);
      }
    }
    for (int r = 0; r < R; ++r) y[n + r] = _mm512_reduce_add_ps(a[r]);
  }
}
using Fn = void (*)(const float*, const float*, int64_t, int64_t, int64_t, float*);
struct Mat { float* w; int64_t N, K; };
static float* alloc(size_t bytes, bool huge, std::vector<std::pair<void*, size_t>>& maps) {
  const size_t HP = 2 << 20;
  size_t sz = (bytes + HP - 1) / HP * HP + HP;
  char* p = (char*)mmap(nullptr, sz, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  maps.push_back({p, sz});
  char* a = (char*)(((uintptr_t)p + HP - 1) / HP * HP);
  madvise(p, sz, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
  return (float*)a;
}
int main(int argc, char** argv) {
  const int T = argc > 1 ? atoi(argv[1]) : 2, rounds = argc > 2 ? atoi(argv[2]) : 20;
  const int64_t D = 576, F = 1536, W = 960, V = 49152, L = 30;
  std::vector<std::pair<void*, size_t>> maps;
  std::vector<Mat> mats[2];
  for (int h = 0; h < 2; ++h) {
    // one arena per page kind, matrices packed
    size_t tot = (size_t)(L * (W * D + D * D + 2 * F * D + D * F) + V * D) * 4;
    float* base = alloc(tot, h == 1, maps);
    float* p = base;
    auto add = [&](int64_t N, int64_t K) { mats[h].push_back({p, N, K}); for (int64_t i = 0; i < N * K; ++i) p[i] = (float)((i * 7) % 13) * 0.01f; p += N * K; };
    for (int l = 0; l < L; ++l) { add(W, D); add(D, D); add(2 * F, D); add(D, F); }
    add(V, D);
  }
  std::vector<float> x(F * 2, 0.5f), y(V);
  struct Var { const char* name; Fn f; };
  std::vector<Var> vars = {{"T0d1", dot_v<1, 1>}, {"none", dot_v<0, 1>}, {"NTAd1", dot_v<2, 1>}, {"T0d2", dot_v<1, 2>},
                           {"T1d1", dot_v<3, 1>}, {"z4T0", dot512<4, 1>}, {"z8T0", dot512<8, 1>}, {"z4none", dot512<4, 0>},
                           {"z8NTA", dot512<8, 2>}, {"z8none", dot512<8, 0>}, {"z4NTA", dot512<4, 2>}};
  if (argc > 3) { std::vector<Var> s; for (auto& v : vars) if (strstr(argv[3], v.name)) s.push_back(v); vars = s; }
  const int nv = vars.size();
  std::vector<double> t[2][16];
  for (int r = 0; r < rounds; ++r)
    for (int h = 0; h < 2; ++h)
      for (int vi = 0; vi < nv; ++vi) {
        Fn f = vars[vi].f;
        timespec c0, c1; clock_gettime(T == 1 ? CLOCK_THREAD_CPUTIME_ID : CLOCK_MONOTONIC, &c0);
        for (int rep = 0; rep < 2; ++rep) {
#pragma omp parallel num_threads(T)
        {
          int th = omp_get_thread_num(), nt = omp_get_num_threads();
          for (auto& m : mats[h]) {
            int64_t per = ((m.N + nt - 1) / nt + 7) / 8 * 8, n0 = std::min(m.N, th * per), n1 = std::min(m.N, n0 + per);
            f(x.data(), m.w, m.K, n0, n1, y.data());
#pragma omp barrier
          }
        }
        }
        clock_gettime(T == 1 ? CLOCK_THREAD_CPUTIME_ID : CLOCK_MONOTONIC, &c1); t[h][vi].push_back(((c1.tv_sec - c0.tv_sec) * 1e3 + (c1.tv_nsec - c0.tv_nsec) / 1e6) / 2);
      }
  double bytes = 0; for (auto& m : mats[0]) bytes += m.N * m.K * 4.0;
  double ref;
  { auto v = t[0][0]; std::sort(v.begin(), v.end()); ref = v[v.size() / 2]; }
  for (int h = 0; h < 2; ++h)
    for (int vi = 0; vi < nv; ++vi) {
      auto v = t[h][vi]; std::sort(v.begin(), v.end());
      // per-round ratio vs 4k T0d1
      std::vector<double> rr; for (int r = 0; r < rounds; ++r) rr.push_back(t[0][0][r] / t[h][vi][r]);
      std::sort(rr.begin(), rr.end());
      printf("%-4s %-7s median %6.2f ms  min %6.2f  (%5.1f GB/s at median)  speed vs 4k/T0d1: median %.3f IQR %.3f-%.3f\n",
             h ? "thp" : "4k", vars[vi].name, v[v.size() / 2], v[0], bytes / v[v.size() / 2] / 1e6, rr[rr.size() / 2], rr[rr.size() / 4], rr[3 * rr.size() / 4]);
    }
}
