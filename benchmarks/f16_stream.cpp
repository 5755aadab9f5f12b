// The fp16 decode step's weight streaming alone: y = W x over SmolLM2-135M's matrices in fp16 (30 layers of qkv,
// o, gate+up and down products, then the 49152-row head: 269 MB) in 2 MiB transparent huge pages, with several
// inner loops, rounds interleaved; "f32" is dot.h's AMD fp32 loop over the same matrices in fp32 (538 MB), for
// the GB/s memory gives a loop that needs no help:
//   cur8, cur4       half a line (16 weights) per row per iteration, 8 or 4 rows, a prefetch 8 KiB ahead
//                    every other iteration (cur8np: none)
//   line8, line4     a whole line per row per iteration, 8 or 4 rows, a prefetch 8 KiB ahead ("np": none;
//                    "nb", "nb2": the same line one or two blocks of rows ahead; "p4k" ...: 4 KiB ... ahead)
//   panel0/2k/4k/8k  4 rows' lines stored side by side (a repacked layout), prefetch none / 2, 4, 8 KiB ahead
//   seq0/2k/4k/6k/8k one row at a time, two lines per iteration: each thread reads one sequential stream
//                    (dot.h's dot_f16 is seq8k)
//   Fseq0/4k/8k      the same for fp32 rows (against "f32")
// Prints each loop's median ms per pass, GB/s, and its median per-round speed against the second loop listed.
//
//   g++ -O3 -march=native -fopenmp benchmarks/f16_stream.cpp -o /tmp/f16_stream   (an AVX-512 CPU)
//   /tmp/f16_stream 2 40 [names, e.g. cur8,seq8k]                                  (threads, rounds)
#include <immintrin.h>
#include <omp.h>
#include <sys/mman.h>
#include <ctime>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cstdint>
#include <vector>
#include <algorithm>
typedef uint16_t h16;
// half lines: R rows, 16 weights per iteration, one prefetch PF bytes ahead every other iteration
template <int R, int PF>
void cur(const float* x, const h16* w, int64_t K, int64_t n0, int64_t n1, float* y) {
  for (int64_t n = n0; n + R <= n1; n += R) {
    const h16* r0 = w + n * K;
    __m512 a[R];
    for (int r = 0; r < R; ++r) a[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k + 16 <= K; k += 16) {
      const __m512 xv = _mm512_loadu_ps(x + k);
      if (PF && k % 32 == 0)
        for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(r0 + r * K + k) + PF, _MM_HINT_T0);
      for (int r = 0; r < R; ++r)
        a[r] = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(r0 + r * K + k))), xv, a[r]);
    }
    for (int r = 0; r < R; ++r) y[n + r] = _mm512_reduce_add_ps(a[r]);
  }
}
// one whole line (32 halves) per row per iteration, two accumulators per row; PF<0: next block
template <int R, int PF>
void line(const float* x, const h16* w, int64_t K, int64_t n0, int64_t n1, float* y) {
  for (int64_t n = n0; n + R <= n1; n += R) {
    const h16* r0 = w + n * K;
    __m512 a[R], b[R];
    for (int r = 0; r < R; ++r) a[r] = b[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k + 32 <= K; k += 32) {
      const __m512 x0 = _mm512_loadu_ps(x + k), x1 = _mm512_loadu_ps(x + k + 16);
      for (int r = 0; r < R; ++r) {
        const char* p = reinterpret_cast<const char*>(r0 + r * K + k);
        if (PF > 0) _mm_prefetch(p + PF, _MM_HINT_T0);
        if (PF < 0) _mm_prefetch(p + (-PF) * R * K * 2, _MM_HINT_T0);
        const __m512i v = _mm512_loadu_si512(p);
        a[r] = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(v)), x0, a[r]);
        b[r] = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(v, 1)), x1, b[r]);
      }
    }
    for (int r = 0; r < R; ++r) y[n + r] = _mm512_reduce_add_ps(_mm512_add_ps(a[r], b[r]));
  }
}
// panels: 4 rows' lines for the same k stored together ([N/4][K/32][4][32]): one sequential stream per thread
template <int PF>
void panel(const float* x, const h16* w, int64_t K, int64_t n0, int64_t n1, float* y) {
  constexpr int R = 4;
  for (int64_t n = n0; n + R <= n1; n += R) {
    const h16* blk = w + n * K;
    __m512 a[R], b[R];
    for (int r = 0; r < R; ++r) a[r] = b[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k + 32 <= K; k += 32) {
      const __m512 x0 = _mm512_loadu_ps(x + k), x1 = _mm512_loadu_ps(x + k + 16);
      const h16* p = blk + k * R;
      if (PF) for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(p + r * 32) + PF, _MM_HINT_T0);
      for (int r = 0; r < R; ++r) {
        const __m512i v = _mm512_loadu_si512(p + r * 32);
        a[r] = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(v)), x0, a[r]);
        b[r] = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(v, 1)), x1, b[r]);
      }
    }
    for (int r = 0; r < R; ++r) y[n + r] = _mm512_reduce_add_ps(_mm512_add_ps(a[r], b[r]));
  }
}
// one row at a time (rows are contiguous: one sequential stream per thread), two lines per iteration, four
// accumulators; a prefetch PF bytes ahead per line
template <int PF>
void seq(const float* x, const h16* w, int64_t K, int64_t n0, int64_t n1, float* y) {
  for (int64_t n = n0; n < n1; ++n) {
    const h16* r = w + n * K;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
      if (PF) { _mm_prefetch(reinterpret_cast<const char*>(r + k) + PF, _MM_HINT_T0); _mm_prefetch(reinterpret_cast<const char*>(r + k) + PF + 64, _MM_HINT_T0); }
      const __m512i v = _mm512_loadu_si512(r + k), u = _mm512_loadu_si512(r + k + 32);
      a0 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(v)), _mm512_loadu_ps(x + k), a0);
      a1 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(v, 1)), _mm512_loadu_ps(x + k + 16), a1);
      a2 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(u)), _mm512_loadu_ps(x + k + 32), a2);
      a3 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(u, 1)), _mm512_loadu_ps(x + k + 48), a3);
    }
    for (; k + 32 <= K; k += 32) {
      if (PF) _mm_prefetch(reinterpret_cast<const char*>(r + k) + PF, _MM_HINT_T0);
      const __m512i v = _mm512_loadu_si512(r + k);
      a0 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(v)), _mm512_loadu_ps(x + k), a0);
      a1 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(v, 1)), _mm512_loadu_ps(x + k + 16), a1);
    }
    y[n] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  }
}
// fp32, one row at a time, two lines per iteration, a prefetch PF bytes ahead per line
template <int PF>
void f32seq(const float* x, const h16* w_, int64_t K, int64_t n0, int64_t n1, float* y) {
  const float* w = reinterpret_cast<const float*>(w_);
  for (int64_t n = n0; n < n1; ++n) {
    const float* r = w + n * K;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
      if (PF) for (int i = 0; i < 4; ++i) _mm_prefetch(reinterpret_cast<const char*>(r + k) + PF + 64 * i, _MM_HINT_T0);
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(r + k), _mm512_loadu_ps(x + k), a0);
      a1 = _mm512_fmadd_ps(_mm512_loadu_ps(r + k + 16), _mm512_loadu_ps(x + k + 16), a1);
      a2 = _mm512_fmadd_ps(_mm512_loadu_ps(r + k + 32), _mm512_loadu_ps(x + k + 32), a2);
      a3 = _mm512_fmadd_ps(_mm512_loadu_ps(r + k + 48), _mm512_loadu_ps(x + k + 48), a3);
    }
    for (; k + 16 <= K; k += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(r + k), _mm512_loadu_ps(x + k), a0);
    y[n] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  }
}
// fp32 reference: 8 rows, one line per row per iteration, no prefetch (dot.h's AMD loop)
void f32(const float* x, const float* w, int64_t K, int64_t n0, int64_t n1, float* y) {
  for (int64_t n = n0; n + 8 <= n1; n += 8) {
    const float* r0 = w + n * K;
    __m512 a[8];
    for (int r = 0; r < 8; ++r) a[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k + 16 <= K; k += 16) {
      const __m512 xv = _mm512_loadu_ps(x + k);
      for (int r = 0; r < 8; ++r) a[r] = _mm512_fmadd_ps(_mm512_loadu_ps(r0 + r * K + k), xv, a[r]);
    }
    for (int r = 0; r < 8; ++r) y[n + r] = _mm512_reduce_add_ps(a[r]);
  }
}
using Fn = void (*)(const float*, const h16*, int64_t, int64_t, int64_t, float*);
struct Mat { void* w; int64_t N, K; };
static void* alloc(size_t bytes) {
  const size_t HP = 2 << 20;
  size_t sz = (bytes + HP - 1) / HP * HP + HP;
  char* p = (char*)mmap(nullptr, sz, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  char* a = (char*)(((uintptr_t)p + HP - 1) / HP * HP);
  madvise(p, sz, MADV_HUGEPAGE);
  return a;
}
int main(int argc, char** argv) {
  const int T = argc > 1 ? atoi(argv[1]) : 2, rounds = argc > 2 ? atoi(argv[2]) : 20;
  const int64_t D = 576, F = 1536, W = 960, V = 49152, L = 30;
  std::vector<Mat> m16, m32;
  for (int es : {2, 4}) {
    size_t tot = (size_t)(L * (W * D + D * D + 2 * F * D + D * F) + V * D) * es;
    char* p = (char*)alloc(tot);
    auto& ms = es == 2 ? m16 : m32;
    auto add = [&](int64_t N, int64_t K) {
      ms.push_back({p, N, K});
      for (int64_t i = 0; i < N * K; ++i) {
        if (es == 2) ((h16*)p)[i] = 0x3c00 + (i * 7) % 13; else ((float*)p)[i] = (float)((i * 7) % 13) * 0.01f;
      }
      p += N * K * es;
    };
    for (int l = 0; l < L; ++l) { add(W, D); add(D, D); add(2 * F, D); add(D, F); }
    add(V, D);
  }
  std::vector<float> x(F * 2, 0.5f), y(V);
  struct Var { const char* name; Fn f; };
  std::vector<Var> vars = {{"f32", nullptr}, {"cur8", cur<8, 8192>}, {"cur8np", cur<8, 0>}, {"cur4", cur<4, 8192>},
                           {"line8", line<8, 8192>}, {"line8np", line<8, 0>}, {"line8nb", line<8, -1>}, {"line8nb2", line<8, -2>}, {"line4nb", line<4, -1>}, {"line4nb2", line<4, -2>}, {"line8p32k", line<8, 32768>}, {"line4p16k", line<4, 16384>},
                           {"line4", line<4, 8192>}, {"line4np", line<4, 0>}, {"line8p4k", line<8, 4096>},
                           {"line8p16k", line<8, 16384>}, {"Fseq0", f32seq<0>}, {"Fseq4k", f32seq<4096>}, {"Fseq8k", f32seq<8192>}, {"seq8k", seq<8192>}, {"seq6k", seq<6144>}, {"seq0", seq<0>}, {"seq2k", seq<2048>}, {"seq4k", seq<4096>}, {"panel0", panel<0>}, {"panel2k", panel<2048>}, {"panel4k", panel<4096>}, {"panel8k", panel<8192>}};
  if (argc > 3) { std::vector<Var> s; for (auto& v : vars) if (!strcmp(v.name, "f32") || strstr(argv[3], v.name)) s.push_back(v); vars = s; }
  const int nv = vars.size();
  std::vector<double> t[16];
  for (int r = 0; r < rounds; ++r)
    for (int vi = 0; vi < nv; ++vi) {
      Fn f = vars[vi].f;
      timespec c0, c1; clock_gettime(CLOCK_MONOTONIC, &c0);
      for (int rep = 0; rep < 2; ++rep) {
#pragma omp parallel num_threads(T)
        {
          int th = omp_get_thread_num(), nt = omp_get_num_threads();
          auto& ms = (f && vars[vi].name[0] != 'F') ? m16 : m32;
          for (auto& m : ms) {
            int64_t per = ((m.N + nt - 1) / nt + 7) / 8 * 8, n0 = std::min(m.N, th * per), n1 = std::min(m.N, n0 + per);
            if (f) f(x.data(), (const h16*)m.w, m.K, n0, n1, y.data()); else f32(x.data(), (const float*)m.w, m.K, n0, n1, y.data());
#pragma omp barrier
          }
        }
      }
      clock_gettime(CLOCK_MONOTONIC, &c1); t[vi].push_back(((c1.tv_sec - c0.tv_sec) * 1e3 + (c1.tv_nsec - c0.tv_nsec) / 1e6) / 2);
    }
  double bytes = 0; for (auto& m : m16) bytes += m.N * m.K * 2.0;
  for (int vi = 0; vi < nv; ++vi) {
    auto v = t[vi]; std::sort(v.begin(), v.end());
    std::vector<double> rr; for (int r = 0; r < rounds; ++r) rr.push_back(t[1][r] / t[vi][r]);
    std::sort(rr.begin(), rr.end());
    double b = (vars[vi].f && vars[vi].name[0] != 'F') ? bytes : 2 * bytes;
    printf("%-10s median %6.2f ms (%5.1f GB/s)  speed vs 2nd: median %.3f IQR %.3f-%.3f\n", vars[vi].name,
           v[v.size() / 2], b / v[v.size() / 2] / 1e6, rr[rr.size() / 2], rr[rr.size() / 4], rr[3 * rr.size() / 4]);
  }
}
