// The whole decode step of a Llama model in one call, for one token of each of B sequences (B = 1: plain
// generation; B > 1: continuous batching, each sequence at its own position in its own row of the KV cache):
// embedding lookup, then per layer RMSNorm, fused
// QKV product, RoPE, KV-cache write, grouped-query attention over the cache, wo + residual, RMSNorm, fused
// gate+up product, SiLU(gate) * up, down product + residual; then the final norm and the output head.
//
// Why: in eager PyTorch a step is ~250 small ops and ~150 OpenMP parallel regions (microseconds of dispatch
// and thread wake-up each), which at 2 threads cost more than streaming the weights. Here the whole step is
// ONE `omp parallel` region: each phase splits its rows statically over the threads and a barrier separates
// phases that read what another thread wrote. The weights and the KV cache are the model's own tensors (no
// copies), so prompt passes through PyTorch and steps through this kernel interleave freely. With
// int8_activations, int8/int4 weights multiply an int8 copy of each activation vector (dot.h, *_q8).
// camelid/model.py is the reference; tests/variants/test_decode_step.py compares the two.
#include "decode_step.h"
#include "vecmath.h"
#include <omp.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

using namespace camelid;

namespace {

// Thread t's share [n0, n1) of N rows: contiguous, in multiples of 16 (the interleaved int4 kernel's row block;
// the other kernels work in blocks of 4).
inline void share(int64_t N, int t, int T, int64_t& n0, int64_t& n1) {
  const int64_t per = ((N + T - 1) / T + 15) / 16 * 16;
  n0 = std::min(N, t * per);
  n1 = std::min(N, n0 + per);
}

inline void rms_norm(const float* x, const float* w, int64_t D, float eps, float* y) {
  float ss = 0.f;
  for (int64_t i = 0; i < D; ++i) ss += x[i] * x[i];
  const float inv = 1.f / std::sqrt(ss / (float)D + eps);
  for (int64_t i = 0; i < D; ++i) y[i] = w[i] * (x[i] * inv);
}

// Hugging Face rotate-half RoPE of one head: pairs (i, i + d/2)
inline void rope(const float* x, const float* c, const float* s, int64_t d, float* out) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < half; ++i) {
    out[i] = x[i] * c[i] - x[i + half] * s[i];
    out[i + half] = x[i + half] * c[i + half] + x[i] * s[i + half];
  }
}

// The KV cache holds fp32 or fp16 (KvT = float or at::Half); attention always computes in fp32.
inline float to_f32(float x) { return x; }
inline float to_f32(at::Half x) { return h2f(x); }

// n values into the cache's element type (fp16: round to nearest even, as PyTorch's .to(torch.float16))
inline void store_kv(const float* x, int64_t n, float* out) { std::copy_n(x, n, out); }
inline void store_kv(const float* x, int64_t n, at::Half* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = at::Half(x[i]);
}

// One cache row's keys and values as attention reads them: positions < P from the row of another sequence whose
// cache holds the same prefix (so a prefix that several sequences share is read from memory once for all of
// them, not once per sequence), the others from this row. P = 0: this row only.
template <typename KvT>
struct KvRow {
  const KvT *k, *v, *shared_k, *shared_v;
  int64_t P, d;
  const KvT* key(int64_t j) const { return (j < P ? shared_k : k) + j * d; }
  const KvT* value(int64_t j) const { return (j < P ? shared_v : v) + j * d; }
};

#ifdef CAMELID_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// sum_j p[j - j0] * v_j over j in [j0, j1) (v_pos = vcur) for d = 8 * NV, the output vector kept in registers
template <int NV, typename KvT>
inline void weighted_sum(const float* p, float inv, const KvRow<KvT>& c, const KvT* vcur, int64_t pos, int64_t j0,
                         int64_t j1, float* o) {
  __m256 acc[NV];
  for (int e = 0; e < NV; ++e) acc[e] = _mm256_setzero_ps();
  for (int64_t j = j0; j < j1; ++j) {
    const KvT* vj = j == pos ? vcur : c.value(j);
    const __m256 pj = _mm256_set1_ps(p[j - j0] * inv);
    for (int e = 0; e < NV; ++e) acc[e] = _mm256_fmadd_ps(pj, load8(vj + 8 * e), acc[e]);
  }
  for (int e = 0; e < NV; ++e) _mm256_storeu_ps(o + 8 * e, acc[e]);
}
#endif

// One head's attention for one new token over the positions [j0, j1) of one chunk (j1 <= pos + 1): scores
// q . k_j * scale (k_pos = kcur: the cache row of pos may not be written yet), softmax within the chunk,
// o = sum_j p_j v_j; *m and *l get the chunk's largest score and its sum of exp(score - *m), which merge_chunks
// needs. The scores of eight cached positions are summed at once (one transposing reduction instead of eight
// horizontal sums).
template <typename KvT>
inline void attend(const float* q, const KvRow<KvT>& c, const KvT* kcur, const KvT* vcur, int64_t pos, int64_t j0,
                   int64_t j1, int64_t d, float scale, float* p, float* o, float* m, float* l) {
  int64_t j = j0;
#ifdef CAMELID_AVX2
  if (d % 8 == 0) {
    const __m256 sv = _mm256_set1_ps(scale);
    for (; j + 8 <= std::min(j1, pos); j += 8) {
      __m256 a[8];
      for (int i = 0; i < 8; ++i) {
        const KvT* k = c.key(j + i);
        __m256 acc = _mm256_mul_ps(load8(k), _mm256_loadu_ps(q));
        for (int64_t e = 8; e < d; e += 8) acc = _mm256_fmadd_ps(load8(k + e), _mm256_loadu_ps(q + e), acc);
        a[i] = acc;
      }
      const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
      const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
      const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
      const __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
      _mm256_storeu_ps(p + j - j0, _mm256_mul_ps(sums, sv));
    }
  }
#endif
  for (; j < j1; ++j) {
    const KvT* kj = j == pos ? kcur : c.key(j);
    float acc = 0.f;
    for (int64_t e = 0; e < d; ++e) acc += q[e] * to_f32(kj[e]);
    p[j - j0] = acc * scale;
  }
  const int64_t n = j1 - j0;
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) mx = std::max(mx, p[i]);
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    p[i] = camelid::exp_nonpositive(p[i] - mx);
    sum += p[i];
  }
  *m = mx; *l = sum;
  const float inv = 1.f / sum;
#ifdef CAMELID_AVX2
  if (d == 64) return weighted_sum<8>(p, inv, c, vcur, pos, j0, j1, o);
  if (d == 128) return weighted_sum<16>(p, inv, c, vcur, pos, j0, j1, o);
#endif
  std::fill(o, o + d, 0.f);
  for (int64_t i = j0; i < j1; ++i) {
    const KvT* vj = i == pos ? vcur : c.value(i);
    const float pj = p[i - j0] * inv;
    for (int64_t e = 0; e < d; ++e) o[e] += pj * to_f32(vj[e]);
  }
}

#ifdef CAMELID_AVX512_Q8
// prefetch [p, p + bytes) one 64-byte line at a time, into L1 (L1 = true) or L2
template <bool L1>
inline void prefetch_bytes(const void* p, int64_t bytes) {
  for (int64_t o = 0; o < bytes; o += 64) {
    if constexpr (L1) _mm_prefetch(static_cast<const char*>(p) + o, _MM_HINT_T0);
    else _mm_prefetch(static_cast<const char*>(p) + o, _MM_HINT_T1);
  }
}

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// exp_nonpositive (vecmath.h) of 16 lanes: the same polynomial
inline __m512 exp16_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f),
                                   _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x));
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  const __m512i e = _mm512_slli_epi32(_mm512_cvtps_epi32(n), 23);
  return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(p), e));
}

// softmax numerators of p[0, P) in place; *m: the largest p, *l: the numerators' sum; returns 1 / *l
inline float softmax16(float* p, int64_t P, float* m_out, float* l_out) {
  const __mmask16 tail = (__mmask16)((1u << (P % 16)) - 1);
  const int64_t P16 = P - P % 16;
  __m512 m = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < P16; i += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(p + i));
  m = _mm512_mask_max_ps(m, tail, m, _mm512_maskz_loadu_ps(tail, p + P16));
  *m_out = _mm512_reduce_max_ps(m);
  const __m512 mx = _mm512_set1_ps(*m_out);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < P16; i += 16) {
    const __m512 e = exp16_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(p + i), mx));
    _mm512_storeu_ps(p + i, e);
    sum = _mm512_add_ps(sum, e);
  }
  if (tail) {
    const __m512 e = exp16_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, p + P16), mx));
    _mm512_mask_storeu_ps(p + P16, tail, e);
    sum = _mm512_mask_add_ps(sum, tail, sum, e);
  }
  *l_out = _mm512_reduce_add_ps(sum);
  return 1.f / *l_out;
}

// o_k = sum_j p_k[j - j0] * inv_k * v_j over j in [j0, j1) (v_pos = vcur) for NH heads at once: each v_j is
// loaded once for all of them. A head's sums are the same whatever NH.
template <int NV, int NH, typename KvT>
inline void weighted_sums16(const float* p, int64_t ldp, const float* inv, const KvRow<KvT>& c, const KvT* vcur,
                            int64_t pos, int64_t j0, int64_t j1, float* o) {
  constexpr int64_t d = 16 * NV;
  __m512 acc[NH][NV];
  for (int h = 0; h < NH; ++h)
    for (int e = 0; e < NV; ++e) acc[h][e] = _mm512_setzero_ps();
  for (int64_t j = j0; j < j1; ++j) {
    const KvT* vj = j == pos ? vcur : c.value(j);
    prefetch_bytes<true>(c.value(j + 16), d * (int64_t)sizeof(KvT));
    __m512 v[NV];
    for (int e = 0; e < NV; ++e) v[e] = load16(vj + 16 * e);
    for (int h = 0; h < NH; ++h) {
      const __m512 pj = _mm512_set1_ps(p[h * ldp + j - j0] * inv[h]);
      for (int e = 0; e < NV; ++e) acc[h][e] = _mm512_fmadd_ps(pj, v[e], acc[h][e]);
    }
  }
  for (int h = 0; h < NH; ++h)
    for (int e = 0; e < NV; ++e) _mm512_storeu_ps(o + h * d + 16 * e, acc[h][e]);
}

// attend() for the n query heads q [n, d] of one KV head (grouped-query attention), d = 16 * NV, over one chunk
// [j0, j1) (j0 a multiple of 16): each cached key and value is read from memory once for the whole group, the
// keys 16 positions at a time (prefetching the keys 32 positions ahead and the values of the same 16). Each
// head's arithmetic does not depend on n, so a head gives the same result alone or in its group.
// p: n rows of scratch of ldp >= j1 - j0 floats; m, l: n each (see attend).
template <int NV, typename KvT>
inline void attend_group(const float* q, int64_t n, const KvRow<KvT>& c, const KvT* kcur, const KvT* vcur,
                         int64_t pos, int64_t j0, int64_t j1, float scale, float* p, int64_t ldp, float* o, float* m,
                         float* l) {
  constexpr int64_t d = 16 * NV;
  const __m256 sv = _mm256_set1_ps(scale);
  int64_t j = j0;
  for (; j + 16 <= std::min(j1, pos); j += 16) {
    const KvT* kb = c.key(j);  // P is a multiple of 16: a block lies in one row
    // keys 32 positions ahead into L1; this block's values into L2, for the pass over V below
    prefetch_bytes<true>(c.key(j + 32), 16 * d * (int64_t)sizeof(KvT));
    prefetch_bytes<false>(c.value(j), 16 * d * (int64_t)sizeof(KvT));
    for (int64_t k = 0; k < n; ++k) {
      __m512 qv[NV];
      for (int e = 0; e < NV; ++e) qv[e] = _mm512_loadu_ps(q + k * d + 16 * e);
      __m256 a[16];
      for (int i = 0; i < 16; ++i) {
        const KvT* kr = kb + i * d;
        __m512 acc = _mm512_mul_ps(load16(kr), qv[0]);
        for (int e = 1; e < NV; ++e) acc = _mm512_fmadd_ps(load16(kr + 16 * e), qv[e], acc);
        a[i] = _mm256_add_ps(_mm512_castps512_ps256(acc), _mm512_extractf32x8_ps(acc, 1));
      }
      for (int half = 0; half < 2; ++half) {  // eight 8-lane sums -> one vector of 8 scores
        const __m256* b = a + 8 * half;
        const __m256 t0 = _mm256_hadd_ps(b[0], b[1]), t1 = _mm256_hadd_ps(b[2], b[3]);
        const __m256 t2 = _mm256_hadd_ps(b[4], b[5]), t3 = _mm256_hadd_ps(b[6], b[7]);
        const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
        const __m256 s = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
        _mm256_storeu_ps(p + k * ldp + j - j0 + 8 * half, _mm256_mul_ps(s, sv));
      }
    }
  }
  for (; j < j1; ++j) {  // the last < 16 cached positions (and pos itself), one at a time
    const KvT* kr = j == pos ? kcur : c.key(j);
    for (int64_t k = 0; k < n; ++k) {
      __m512 acc = _mm512_mul_ps(load16(kr), _mm512_loadu_ps(q + k * d));
      for (int e = 1; e < NV; ++e) acc = _mm512_fmadd_ps(load16(kr + 16 * e), _mm512_loadu_ps(q + k * d + 16 * e), acc);
      p[k * ldp + j - j0] = _mm512_reduce_add_ps(acc) * scale;
    }
  }
  float inv[8];
  constexpr int HC = NV <= 4 ? 4 : 2;  // heads per pass over V: HC * NV accumulators in registers
  for (int64_t k0 = 0; k0 < n; k0 += HC) {
    const int nh = (int)std::min<int64_t>(HC, n - k0);
    for (int h = 0; h < nh; ++h) inv[h] = softmax16(p + (k0 + h) * ldp, j1 - j0, m + k0 + h, l + k0 + h);
    const float* pk = p + k0 * ldp;
    float* ok = o + k0 * d;
    switch (nh) {
      case 1: weighted_sums16<NV, 1, KvT>(pk, ldp, inv, c, vcur, pos, j0, j1, ok); break;
      case 2: weighted_sums16<NV, 2, KvT>(pk, ldp, inv, c, vcur, pos, j0, j1, ok); break;
      case 3: weighted_sums16<NV, HC >= 3 ? 3 : 1, KvT>(pk, ldp, inv, c, vcur, pos, j0, j1, ok); break;
      default: weighted_sums16<NV, HC, KvT>(pk, ldp, inv, c, vcur, pos, j0, j1, ok); break;
    }
  }
}
#endif

// attend() for n query heads q [n, d] that share one KV head, over the chunk [j0, j1); o [n, d], m and l [n];
// p: n rows of ldp >= j1 - j0 floats
template <typename KvT>
inline void attend_heads(const float* q, int64_t n, const KvRow<KvT>& c, const KvT* kcur, const KvT* vcur,
                         int64_t pos, int64_t j0, int64_t j1, int64_t d, float scale, float* p, int64_t ldp, float* o,
                         float* m, float* l) {
#ifdef CAMELID_AVX512_Q8
  switch (d) {
    case 16: return attend_group<1>(q, n, c, kcur, vcur, pos, j0, j1, scale, p, ldp, o, m, l);
    case 32: return attend_group<2>(q, n, c, kcur, vcur, pos, j0, j1, scale, p, ldp, o, m, l);
    case 64: return attend_group<4>(q, n, c, kcur, vcur, pos, j0, j1, scale, p, ldp, o, m, l);
    case 128: return attend_group<8>(q, n, c, kcur, vcur, pos, j0, j1, scale, p, ldp, o, m, l);
    default: break;
  }
#endif
  for (int64_t k = 0; k < n; ++k) attend(q + k * d, c, kcur, vcur, pos, j0, j1, d, scale, p, o + k * d, m + k, l + k);
}

// One head's output from its chunks' outputs o_c (o + c * stride) and (m_c, l_c) (ml + c * ml_stride), in chunk
// order: sum_c w_c o_c / sum_c w_c with w_c = l_c exp(m_c - max m). A single chunk is copied as it is.
inline void merge_chunks(const float* o, int64_t stride, const float* ml, int64_t ml_stride, int64_t chunks,
                         int64_t d, float* out) {
  if (chunks == 1) return (void)std::copy_n(o, d, out);
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t c = 0; c < chunks; ++c) mx = std::max(mx, ml[c * ml_stride]);
  float total = 0.f;
  for (int64_t c = 0; c < chunks; ++c) total += ml[c * ml_stride + 1] * std::exp(ml[c * ml_stride] - mx);
  std::fill(out, out + d, 0.f);
  for (int64_t c = 0; c < chunks; ++c) {
    const float wc = ml[c * ml_stride + 1] * std::exp(ml[c * ml_stride] - mx) / total;
    for (int64_t e = 0; e < d; ++e) out[e] += wc * o[c * stride + e];
  }
}

Linear make_linear(int64_t kind, const std::vector<at::Tensor>& t, std::vector<at::Tensor>& keep) {
  Linear L;
  TORCH_CHECK(kind >= F32 && kind <= F16, "unknown weight kind ", kind);
  L.kind = static_cast<Kind>(kind);
  for (const auto& x : t) TORCH_CHECK(x.is_contiguous() && x.device().is_cpu(), "contiguous CPU weights expected");
  keep.insert(keep.end(), t.begin(), t.end());
  L.N = t[0].size(0);
  switch (L.kind) {
    case F32:
      TORCH_CHECK(t.size() == 1 && t[0].scalar_type() == at::kFloat, "fp32 weight expected");
      L.K = t[0].size(1); L.w = t[0].data_ptr<float>(); break;
    case F16:
      TORCH_CHECK(t.size() == 1 && t[0].scalar_type() == at::kHalf, "fp16 weight expected");
      L.K = t[0].size(1); L.w = t[0].data_ptr<at::Half>(); break;
    case INT8:
      TORCH_CHECK(t.size() == 2 && t[0].scalar_type() == at::kChar && t[1].scalar_type() == at::kFloat,
                  "int8 weight and fp32 scale expected");
      L.K = t[0].size(1); L.w = t[0].data_ptr<int8_t>(); L.scale8 = t[1].data_ptr<float>(); break;
    case INT4:
      TORCH_CHECK(t.size() == 3 && t[0].scalar_type() == at::kByte && t[1].scalar_type() == at::kHalf &&
                  t[2].scalar_type() == at::kHalf, "uint8 weight and fp16 scale/minimum expected");
      L.K = t[0].size(1) * 2; L.w = t[0].data_ptr<uint8_t>();
      L.scale4 = t[1].data_ptr<at::Half>(); L.min4 = t[2].data_ptr<at::Half>(); break;
  }
  return L;
}

}  // namespace

DecodeStep::DecodeStep(int64_t dim, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, int64_t ffn, double eps,
                       bool int8_activations)
    : D(dim), H(n_heads), KV(n_kv_heads), d(head_dim), F(ffn), eps((float)eps), q8(int8_activations) {
  TORCH_CHECK(H % KV == 0, "n_heads must be a multiple of n_kv_heads");
  TORCH_CHECK(H / KV <= kMaxGroup, "at most ", kMaxGroup, " query heads per KV head are supported");
}

void DecodeStep::set_embedding(int64_t kind, std::vector<at::Tensor> t) {
  TORCH_CHECK(kind != INT4, "int4 embeddings are not supported");
  embed = make_linear(kind, t, keep);
  TORCH_CHECK(embed.K == D, "embedding width does not match dim");
}

void DecodeStep::add_layer(at::Tensor attn_norm, at::Tensor ffn_norm, std::vector<int64_t> kinds,
                           std::vector<std::vector<at::Tensor>> t) {
  TORCH_CHECK(kinds.size() == 4 && t.size() == 4, "four linears expected: wqkv, wo, w13, w2");
  keep.push_back(attn_norm); keep.push_back(ffn_norm);
  Layer L;
  L.attn_norm = attn_norm.data_ptr<float>(); L.ffn_norm = ffn_norm.data_ptr<float>();
  L.wqkv = make_linear(kinds[0], t[0], keep); L.wo = make_linear(kinds[1], t[1], keep);
  L.w13 = make_linear(kinds[2], t[2], keep); L.w2 = make_linear(kinds[3], t[3], keep);
  TORCH_CHECK(L.wqkv.N == (H + 2 * KV) * d && L.wqkv.K == D && L.wo.N == D && L.wo.K == H * d &&
              L.w13.N == 2 * F && L.w13.K == D && L.w2.N == D && L.w2.K == F, "layer shapes do not match the config");
  layers.push_back(L);
}

void DecodeStep::set_head(at::Tensor norm_w, int64_t kind, std::vector<at::Tensor> t) {
  keep.push_back(norm_w);
  norm = norm_w.data_ptr<float>();
  head = make_linear(kind, t, keep);
  TORCH_CHECK(head.K == D, "output head width does not match dim");
}

namespace {

#ifdef CAMELID_AVX512_Q8
// int4 weights [N, K/2] (dot_int4's layout) with their scales and minimums -> int4x16_q8's blocks, N padded to a
// multiple of 16 with zero rows
at::Tensor interleave_int4(const Linear& L) {
  const int64_t G = L.K / 32, blocks = (L.N + kInterleavedRows - 1) / kInterleavedRows;
  auto out = at::zeros({blocks * G * kInterleavedGroupBytes}, at::TensorOptions().dtype(at::kByte));
  uint8_t* o = out.data_ptr<uint8_t>();
  const uint8_t* w = static_cast<const uint8_t*>(L.w);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t g = 0; g < G; ++g) {
        uint8_t* p = o + (b * G + g) * kInterleavedGroupBytes;
        for (int64_t i = 0; i < kInterleavedRows && b * kInterleavedRows + i < L.N; ++i) {
          const int64_t n = b * kInterleavedRows + i;
          const uint8_t* src = w + n * (L.K / 2) + g * 16;  // byte j: input j (low nibble), input j + 16 (high)
          auto code = [&](int64_t k) { return k < 16 ? src[k] & 15 : src[k - 16] >> 4; };
          for (int c = 0; c < 4; ++c)
            for (int j = 0; j < 4; ++j) p[64 * c + 4 * i + j] = (uint8_t)(code(8 * c + j) | code(8 * c + 4 + j) << 4);
          std::memcpy(p + 256 + 2 * i, L.scale4 + n * G + g, 2);
          std::memcpy(p + 288 + 2 * i, L.min4 + n * G + g, 2);
        }
      }
  });
  return out;
}

// int8 weights [N, K] with their row scales -> int8x16_q8's blocks, N padded to a multiple of 16 with zero rows
at::Tensor interleave_int8(const Linear& L) {
  const int64_t G = L.K / 32, blocks = (L.N + kInterleavedRows - 1) / kInterleavedRows;
  const int64_t block_bytes = G * kInterleavedInt8GroupBytes + 64;
  auto out = at::zeros({blocks * block_bytes}, at::TensorOptions().dtype(at::kByte));
  uint8_t* o = out.data_ptr<uint8_t>();
  const int8_t* w = static_cast<const int8_t*>(L.w);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      uint8_t* blk = o + b * block_bytes;
      for (int64_t i = 0; i < kInterleavedRows; ++i) {
        const int64_t n = b * kInterleavedRows + i;
        for (int64_t k = 0; k < L.K; ++k)  // padding rows: code 0, stored as 128
          blk[(k / 32) * kInterleavedInt8GroupBytes + 64 * ((k % 32) / 4) + 4 * i + k % 4] =
              (uint8_t)((n < L.N ? (int)w[n * L.K + k] : 0) + 128);
        const float s = n < L.N ? L.scale8[n] : 0.f;
        std::memcpy(blk + G * kInterleavedInt8GroupBytes + 4 * i, &s, 4);
      }
    }
  });
  return out;
}
#endif

}  // namespace

int64_t DecodeStep::interleave() {
#ifdef CAMELID_AVX512_Q8
  if (!q8) return 0;  // the interleaved kernels take int8 activations
  int64_t bytes = 0;
  auto convert = [&](Linear& L) {
    if ((L.kind != INT8 && L.kind != INT4) || L.w16 || L.K % 32 || L.K / 32 > 2 * kMaxPairs) return;
    at::Tensor t = L.kind == INT4 ? interleave_int4(L) : interleave_int8(L);
    bytes += t.numel();
    L.w16 = t.data_ptr();
    keep.push_back(t);
  };
  for (Layer& L : layers)
    for (Linear* lin : {&L.wqkv, &L.wo, &L.w13, &L.w2}) convert(*lin);
  convert(head);
  return bytes;
#else
  return 0;
#endif
}

// The model's KV cache (one [rows, KV, S, d] k and v per layer, fp32 or fp16) and the RoPE tables [S, d] for
// its positions.
void DecodeStep::bind_cache(std::vector<at::Tensor> ks, std::vector<at::Tensor> vs, at::Tensor cos_t,
                            at::Tensor sin_t) {
  TORCH_CHECK(ks.size() == layers.size() && vs.size() == layers.size(), "one k and v cache per layer expected");
  TORCH_CHECK(cos_t.is_contiguous() && sin_t.is_contiguous() && cos_t.size(1) == d, "[S, head_dim] tables expected");
  S = cos_t.size(0);
  cache_rows = ks.empty() ? 0 : ks[0].size(0);
  cache.clear();
  kv16 = !ks.empty() && ks[0].scalar_type() == at::kHalf;
  for (size_t i = 0; i < layers.size(); ++i) {
    for (auto* c : {&ks[i], &vs[i]})
      TORCH_CHECK(c->is_contiguous() && c->scalar_type() == (kv16 ? at::kHalf : at::kFloat) && c->size(1) == KV &&
                  c->size(2) == S && c->size(3) == d && c->size(0) == cache_rows,
                  "contiguous [B, KV, S, head_dim] caches, all fp32 or all fp16, expected");
    layers[i].cache_k = ks[i].data_ptr(); layers[i].cache_v = vs[i].data_ptr();
    cache.push_back(ks[i]); cache.push_back(vs[i]);
  }
  cos = cos_t; sin = sin_t;
}

// Logits [1, 1, vocab] of `token` at position `pos`; writes this position's keys and values into the cache.
at::Tensor DecodeStep::forward(int64_t token, int64_t pos) {
  return run({token}, {pos}, {0}, {}, {}, false).view({1, 1, -1});
}

void DecodeStep::set_greedy_head(at::Tensor q, at::Tensor scale, at::Tensor err, at::Tensor wq) {
  TORCH_CHECK(head.kind == F32 && head.w, "the greedy head needs an fp32 output head (set_head first)");
  TORCH_CHECK(q.scalar_type() == at::kChar && q.is_contiguous() && q.dim() == 2 && q.size(0) == head.N &&
              q.size(1) == head.K, "greedy head: int8 q [vocab, dim] expected");
  TORCH_CHECK(head.K % 32 == 0, "the greedy head needs a width that is a multiple of 32");
  for (const auto* v : {&scale, &err, &wq})
    TORCH_CHECK(v->scalar_type() == at::kFloat && v->is_contiguous() && v->numel() == head.N,
                "greedy head: fp32 scale, err and wq [vocab] expected");
  keep.insert(keep.end(), {q, scale, err, wq});
  greedy_q = q.data_ptr<int8_t>(); greedy_scale = scale.data_ptr<float>(); greedy_err = err.data_ptr<float>();
  greedy_wq = wq.data_ptr<float>();
  approx.resize(head.N);
}

// The int8 head's logits of h (fp32 activations: rounding h to int8 as well doubled the bound, and on flat
// logits, a synthetic prompt's, left 9,500 of SmolLM2's 49,152 rows as candidates instead of about 170). A row's
// int8 logit and its fp32 logit differ by at most b * err[n] + c * wq[n]: b = ||h||_2 for the weights' rounding
// (err: greedy_head), c for the float rounding of the int8 product, times wq = ||int8 row||_2. Rows whose int8
// logit plus that bound reaches the largest int8 logit minus its bound (`lows`: each thread's largest, shared
// through one barrier) can be the argmax; only they are computed in fp32 (dot_f32_row).
void DecodeStep::greedy_share(const float* h, int t, int nt, float* lows) {
  const int64_t V = head.N;
  int64_t n0, n1;
  share(V, t, nt, n0, n1);
  double hh = 0.0;
  for (int64_t k = 0; k < D; ++k) hh += (double)h[k] * h[k];
  const double nu = (double)(D + 2) * std::ldexp(1.0, -24), gamma = nu / (1.0 - nu);
  const double hn = std::sqrt(hh);
  const float b = (float)(hn * (1.0 + 1e-6)), c = (float)(2.0 * gamma * hn * (1.0 + 1e-6));
#if defined(CAMELID_AVX2) && defined(__AVX512F__)
  if (D % 16 == 0)
    dot_int8_avx512(h, greedy_q, greedy_scale, D, n0, n1, approx.data());
  else
#endif
    dot_int8(h, greedy_q, greedy_scale, D, n0, n1, approx.data());
  float low = -INFINITY;
  for (int64_t n = n0; n < n1; ++n) low = std::max(low, approx[n] - (b * greedy_err[n] + c * greedy_wq[n]));
  lows[t] = low;
#pragma omp barrier
  float top = -INFINITY;
  for (int i = 0; i < nt; ++i) top = std::max(top, lows[i]);
  std::pair<float, int64_t> mine{-INFINITY, -1};
  const float* w = static_cast<const float*>(head.w);
  for (int64_t n = n0; n < n1; ++n)
    if (approx[n] + (b * greedy_err[n] + c * greedy_wq[n]) >= top) {
      const float v = dot_f32_row(h, w, D, n);
      if (mine.second < 0 || v > mine.first) mine = {v, n};
    }
  best[t] = mine;
}

int64_t DecodeStep::greedy_pick(int nt) const {
  std::pair<float, int64_t> top{-INFINITY, -1};
  for (int i = 0; i < nt; ++i)  // threads hold rows in order, so a tie keeps the first row, as argmax does
    if (best[i].second >= 0 && (top.second < 0 || best[i].first > top.first)) top = best[i];
  TORCH_CHECK(top.second >= 0, "greedy head: no candidate row (non-finite logits?)");
  return top.second;
}

int64_t DecodeStep::forward_argmax(int64_t token, int64_t pos) {
  TORCH_CHECK(greedy_q, "no greedy head is set (set_greedy_head)");
  return run({token}, {pos}, {0}, {}, {}, true).item<int64_t>();
}

int64_t DecodeStep::head_argmax(at::Tensor h) {
  TORCH_CHECK(greedy_q, "no greedy head is set (set_greedy_head)");
  h = h.contiguous();
  TORCH_CHECK(h.scalar_type() == at::kFloat && h.numel() == D, "fp32 h [dim] expected");
  const int T = std::max(1, at::get_num_threads());
  std::vector<float> lows(T);
  best.assign(T, {-INFINITY, -1});
  int used = 1;
#pragma omp parallel num_threads(T)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    if (t == 0) used = nt;
    greedy_share(h.data_ptr<float>(), t, nt, lows.data());
  }
  return greedy_pick(used);
}

// Logits [B, vocab]: one new token per row b, at position positions[b] of cache row rows[b] (continuous
// batching: every sequence at its own position, in its own row of the cache).
at::Tensor DecodeStep::forward_rows(std::vector<int64_t> tokens, std::vector<int64_t> positions,
                                    std::vector<int64_t> rows, std::vector<int64_t> sources,
                                    std::vector<int64_t> shared) {
  return run(tokens, positions, rows, std::move(sources), std::move(shared), false);
}

// forward_rows; greedy (one row, a greedy head set): the argmax [1] (int64) instead of the logits
at::Tensor DecodeStep::run(const std::vector<int64_t>& tokens, const std::vector<int64_t>& positions,
                           const std::vector<int64_t>& rows, std::vector<int64_t> sources,
                           std::vector<int64_t> shared, bool greedy) {
  TORCH_CHECK(embed.w && norm && !cache.empty(), "decode step is not fully set up");
  const int64_t B = (int64_t)tokens.size();
  TORCH_CHECK(B > 0 && positions.size() == tokens.size() && rows.size() == tokens.size(),
              "one position and one cache row per token expected");
  TORCH_CHECK(sources.size() == shared.size() && (shared.empty() || (int64_t)shared.size() == B),
              "one source row and one shared length per token expected (or none)");
  if (shared.empty()) sources = shared = std::vector<int64_t>(B, 0);
  int64_t max_pos = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(shared[b] == 0 || (shared[b] % 16 == 0 && shared[b] <= positions[b] && 0 <= sources[b] &&
                                   sources[b] < cache_rows),
                "a shared prefix is a multiple of 16 positions before the token's, in a cache row");
    TORCH_CHECK(0 <= tokens[b] && tokens[b] < embed.N, "token id outside the vocabulary");
    TORCH_CHECK(0 <= positions[b] && positions[b] < S, "position outside the cache");
    TORCH_CHECK(0 <= rows[b] && rows[b] < cache_rows, "cache row outside the cache");
    for (int64_t c = 0; c < b; ++c) TORCH_CHECK(rows[c] != rows[b], "two tokens in one cache row");
    max_pos = std::max(max_pos, positions[b]);
  }
  const int64_t W = (H + 2 * KV) * d, G = H / KV, V = head.N, row_stride = KV * S * d;
  const int T = std::max(1, at::get_num_threads());
  // Attention tasks: (row, KV head, chunk of kAttnChunk positions, block of hc query heads). Each cached key and
  // value is read once per task, so whole groups of heads where there are enough tasks to keep every thread
  // busy, single heads otherwise. The chunks (flash-decoding) let the threads share one long sequence; they
  // and their merge depend on the row alone, so a row's logits are the same alone or in any batch, at any
  // thread count. Tasks go to the threads in contiguous runs of about equal cost (positions x heads).
  const int64_t max_chunks = max_pos / kAttnChunk + 1;
  int64_t group_tasks = 0;
  for (int64_t b = 0; b < B; ++b) group_tasks += KV * (positions[b] / kAttnChunk + 1);
  const int64_t hc = T == 1 || group_tasks >= 4 * T ? G : 1;
  tasks.clear();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h0 = 0; h0 < H; h0 += hc)
      for (int64_t c = 0; c <= positions[b] / kAttnChunk; ++c) tasks.push_back({b, h0, c});
  task_end.assign(T + 1, 0);
  {
    auto cost = [&](const AttnTask& k) {
      return std::min(kAttnChunk, positions[k.b] + 1 - k.chunk * kAttnChunk) * (hc + 1);
    };
    int64_t total = 0, done = 0;
    for (const auto& k : tasks) total += cost(k);
    for (size_t i = 0; i < tasks.size(); ++i) {  // task i goes to the thread whose share holds its midpoint
      const int64_t c = cost(tasks[i]);
      const int th = (int)std::min<int64_t>(T - 1, (2 * done + c) * T / (2 * total));
      task_end[th + 1] = (int64_t)i + 1;
      done += c;
    }
    for (int t = 1; t <= T; ++t) task_end[t] = std::max(task_end[t], task_end[t - 1]);
  }
  x.resize(B * D); qkv.resize(B * W); gu.resize(B * 2 * F); hid.resize(B * F);
  tmp.resize(B * D); part.resize(B * H * max_chunks * (d + 2));
  greedy = greedy && greedy_q && B == 1;
  auto logits = at::empty({greedy ? 0 : B, V}, at::TensorOptions().dtype(at::kFloat));
  float* out = logits.data_ptr<float>();
  std::vector<float> lows(T);
  if (greedy) best.assign(T, {-INFINITY, -1});
  int used = 1;
  for (int64_t b = 0; b < B; ++b) {  // embedding rows (dequantised)
    const int64_t token = tokens[b];
    if (embed.kind == F32) {
      std::copy_n(static_cast<const float*>(embed.w) + token * D, D, x.data() + b * D);
    } else if (embed.kind == F16) {
      const at::Half* r = static_cast<const at::Half*>(embed.w) + token * D;
      for (int64_t i = 0; i < D; ++i) x[b * D + i] = h2f(r[i]);
    } else {
      const int8_t* r = static_cast<const int8_t*>(embed.w) + token * D;
      for (int64_t i = 0; i < D; ++i) x[b * D + i] = (float)r[i] * embed.scale8[token];
    }
  }
  const float* cos_p = cos.data_ptr<float>();
  const float* sin_p = sin.data_ptr<float>();
  const float scale = 1.f / std::sqrt((float)d);
  float* part_o = part.data();                       // [B, max_chunks, H, d]: each chunk's attention output
  float* part_ml = part_o + B * H * max_chunks * d;  // [B, max_chunks, H, 2]: its largest score and its sum

#pragma omp parallel num_threads(T)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    // private scratch: each thread normalises the rows of x itself (B x 576 floats: cheaper than a barrier)
    const int64_t maxK = std::max({D, H * d, F}), nG = maxK / 32 + 1;
    const int64_t ldp = kAttnChunk;  // a row of scores per query head of a task
    std::vector<float> xn(B * D), xs(B * nG), dq(B * nG), q(G * d), kcur(d), p(G * ldp), att(B * H * d);
    std::vector<at::Half> kcur16(kv16 ? d : 0), vcur16(kv16 ? d : 0);
    std::vector<int8_t> xq(B * maxK);
    std::vector<Act> a(B);
    for (int64_t b = 0; b < B; ++b) {
      a[b].xs = xs.data() + b * nG; a[b].q = xq.data() + b * maxK; a[b].dq = dq.data() + b * nG;
    }
    // every activation row in `src` (rows of width K) through rms_norm (if w) and into a[b]
    auto set_acts = [&](const float* src, int64_t K, const float* w) {
      for (int64_t b = 0; b < B; ++b) {
        const float* v = src + b * K;
        if (w) { rms_norm(v, w, K, eps, xn.data() + b * K); v = xn.data() + b * K; }
        a[b].set(v, K, q8);
      }
    };
    int64_t n0, n1;
    for (const Layer& L : layers) {
      // -- attention: x += wo(attend(rope(wqkv(norm(x)))))
      set_acts(x.data(), D, L.attn_norm);
      share(W, t, nt, n0, n1);
      L.wqkv.rows_batch(a.data(), B, n0, n1, qkv.data(), W);
#pragma omp barrier
      for (int64_t i = task_end[t]; i < task_end[t + 1]; ++i) {
        const int64_t b = tasks[i].b, h0 = tasks[i].h0, kvh = h0 / G, pos = positions[b];
        const int64_t j0 = tasks[i].chunk * kAttnChunk, j1 = std::min(pos + 1, j0 + kAttnChunk);
        const float* row = qkv.data() + b * W;
        const float* c = cos_p + pos * d;
        const float* s = sin_p + pos * d;
        const int64_t at_row = rows[b] * row_stride + kvh * S * d;
        for (int64_t k = 0; k < hc; ++k) rope(row + (h0 + k) * d, c, s, d, q.data() + k * d);
        rope(row + (H + kvh) * d, c, s, d, kcur.data());
        const float* vcur = row + (H + KV + kvh) * d;
        // the group's first head, in its last chunk, writes the new key and value; every task reads positions
        // < pos only from the cache, so no other thread waits on this write. Position pos is attended in the
        // cache's precision (kc, vc), as if read back from it.
        const int64_t from_row = shared[b] > 0 ? sources[b] * row_stride + kvh * S * d : at_row;
        auto run = [&](auto* K, auto* Vc, auto* kc, auto* vc) {
          if (h0 % G == 0 && j1 == pos + 1) {
            store_kv(kcur.data(), d, K + pos * d);
            store_kv(vcur, d, Vc + pos * d);
          }
          using KvT = std::remove_pointer_t<decltype(K)>;
          const KvRow<KvT> c{K, Vc, static_cast<KvT*>(L.cache_k) + from_row, static_cast<KvT*>(L.cache_v) + from_row,
                             shared[b], d};
          float ml[2 * kMaxGroup];  // (m, l) per head of the task
          const int64_t at_part = (b * max_chunks + tasks[i].chunk) * H + h0;
          attend_heads(q.data(), hc, c, kc, vc, pos, j0, j1, d, scale, p.data(), ldp, part_o + at_part * d, ml,
                       ml + hc);
          for (int64_t k = 0; k < hc; ++k) {
            part_ml[(at_part + k) * 2] = ml[k];
            part_ml[(at_part + k) * 2 + 1] = ml[hc + k];
          }
        };
        if (kv16) {
          store_kv(kcur.data(), d, kcur16.data());
          store_kv(vcur, d, vcur16.data());
          run(static_cast<at::Half*>(L.cache_k) + at_row, static_cast<at::Half*>(L.cache_v) + at_row,
              static_cast<const at::Half*>(kcur16.data()), static_cast<const at::Half*>(vcur16.data()));
        } else {
          run(static_cast<float*>(L.cache_k) + at_row, static_cast<float*>(L.cache_v) + at_row,
              static_cast<const float*>(kcur.data()), vcur);
        }
      }
#pragma omp barrier
      // every thread merges every head's chunks into its own copy (a few thousand flops: cheaper than a barrier)
      for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < H; ++h) {
          const int64_t at_part = b * max_chunks * H + h;
          merge_chunks(part_o + at_part * d, H * d, part_ml + at_part * 2, H * 2, positions[b] / kAttnChunk + 1, d,
                       att.data() + (b * H + h) * d);
        }
      set_acts(att.data(), H * d, nullptr);
      share(D, t, nt, n0, n1);
      L.wo.rows_batch(a.data(), B, n0, n1, tmp.data(), D);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t n = n0; n < n1; ++n) x[b * D + n] += tmp[b * D + n];
#pragma omp barrier
      // -- feed-forward: x += w2(silu(gate) * up), gate and up = w13(norm(x)); a thread computes the gate
      // and up rows of the same features, so it can apply SiLU * up without waiting
      set_acts(x.data(), D, L.ffn_norm);
      share(F, t, nt, n0, n1);
      L.w13.rows_batch(a.data(), B, n0, n1, gu.data(), 2 * F);
      L.w13.rows_batch(a.data(), B, F + n0, F + n1, gu.data(), 2 * F);
      for (int64_t b = 0; b < B; ++b) {
        const float* g_b = gu.data() + b * 2 * F;
        for (int64_t n = n0; n < n1; ++n) {
          const float g = g_b[n];
          hid[b * F + n] = g * camelid::sigmoid(g) * g_b[F + n];
        }
      }
#pragma omp barrier
      set_acts(hid.data(), F, nullptr);
      share(D, t, nt, n0, n1);
      L.w2.rows_batch(a.data(), B, n0, n1, tmp.data(), D);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t n = n0; n < n1; ++n) x[b * D + n] += tmp[b * D + n];
#pragma omp barrier
    }
    set_acts(x.data(), D, norm);
    if (greedy) {
      if (t == 0) used = nt;
      greedy_share(a[0].x, t, nt, lows.data());
    } else {
      share(V, t, nt, n0, n1);
      head.rows_batch(a.data(), B, n0, n1, out, V);
    }
  }
  if (greedy) {
    auto token = at::empty({1}, at::TensorOptions().dtype(at::kLong));
    token.data_ptr<int64_t>()[0] = greedy_pick(used);
    return token;
  }
  return logits;
}

// y = W x for one activation row with int8 activations (what the step does per linear); for the tests.
at::Tensor gemv_q8(at::Tensor x, int64_t kind, std::vector<at::Tensor> t) {
  std::vector<at::Tensor> keep;
  const Linear L = make_linear(kind, t, keep);
  x = x.contiguous();
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.numel() == L.K && L.K % 32 == 0,
              "fp32 x of K (a multiple of 32) expected");
  std::vector<float> xs(L.K / 32), dq(L.K / 32);
  std::vector<int8_t> q(L.K);
  Act a;
  a.xs = xs.data(); a.q = q.data(); a.dq = dq.data();
  a.set(x.data_ptr<float>(), L.K, true);
  auto y = at::empty({L.N}, x.options());
  L.rows(a, 0, L.N, y.data_ptr<float>());
  return y;
}

// Y [M, N] = X W^T with int8 activations for M rows of X (what the step does for M sequences, and the prompt path
// of camelid.ops.linear): each row quantised once, then each thread's share of W's rows multiplies every row of
// X, up to kMaxActs at a time, through Linear::rows_batch. Row m of Y is bit for bit gemv_q8(X[m]).
at::Tensor gemm_q8(at::Tensor x, int64_t kind, std::vector<at::Tensor> t) {
  std::vector<at::Tensor> keep;
  const Linear L = make_linear(kind, t, keep);
  x = x.contiguous();
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) == L.K && L.K % 32 == 0,
              "fp32 x [M, K] (K a multiple of 32) expected");
  const int64_t M = x.size(0), K = L.K, G = K / 32, N = L.N;
  std::vector<float> xs(M * G), dq(M * G);
  std::vector<int8_t> q(M * K);
  std::vector<Act> a(M);
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      a[m].xs = xs.data() + m * G; a[m].q = q.data() + m * K; a[m].dq = dq.data() + m * G;
      a[m].set(xp + m * K, K, true);
    }
  });
  auto y = at::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, (N + 3) / 4, 16, [&](int64_t b0, int64_t b1) {
    L.rows_batch(a.data(), M, b0 * 4, std::min(N, b1 * 4), yp, N);
  });
  return y;
}
