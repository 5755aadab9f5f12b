// Causal self-attention for training on the CPU, forward and backward, with grouped-query heads.
//
// Why: PyTorch's CPU flash attention takes keys in blocks of 512, so at sequence lengths up to 512 it computes
// the whole T x T score matrix and masks half of it away, and its backward does the same. Here each block of
// 64 queries multiplies only the keys at or before its last row (the exact causal triangle, rounded up to the
// block), with single-threaded BLAS calls inside one OpenMP region. Softmax is exact per row (the scores of a
// query block fit in a [64, T] buffer), the forward keeps the rows' log-sum-exp, and the backward recomputes
// the probabilities from it, as FlashAttention does.
//
// Layout: q [B, T, H, D], k and v [B, T, KV, D] (the projections' own layout: no transposes on either side), all
// contiguous fp32; query head h reads key head h / (H / KV). Rows of one head are H * D (or KV * D) floats apart,
// which BLAS takes as its leading dimension.
//
// Also here: attend_cached, the decode-time attention of a few new tokens against the KV cache, and
// prompt_attention, a prompt's attention at inference on machines where oneDNN is the GEMM library.
// camelid/ops/attention.py holds the reference (F.scaled_dot_product_attention); tests/ops/test_attention.py compares.
#include "kernels.h"
#include "vecmath.h"
#include <omp.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

// The BLAS that PyTorch links (MKL in the x86 wheels; weak, so a build without it still loads and says so).
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

namespace {

using camelid::exp_nonpositive;

constexpr int64_t kBlock = 64;  // queries per block

// Row-major C[M, N] = alpha * op(A) op(B) + beta * C, with BLAS (column-major) underneath: C^T = op(B)^T op(A)^T.
inline void mm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
               const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
  const int m = N, n = M, k = K, la = ldb, lb = lda, lc = ldc;
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
}

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 4,
              name, ": a contiguous 4-d fp32 CPU tensor expected");
}

}  // namespace

bool causal_attention_available() { return sgemm_ != nullptr; }

// Returns (o [B, T, H, D], lse [B, H, T]): the attention output and each row's log-sum-exp of scaled scores.
std::vector<at::Tensor> causal_attention_forward(at::Tensor q, at::Tensor k, at::Tensor v, double scale) {
  check(q, "q"), check(k, "k"), check(v, "v");
  TORCH_CHECK(sgemm_ != nullptr, "no BLAS sgemm in this PyTorch build");
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3), KV = k.size(2);
  TORCH_CHECK(H % KV == 0 && k.sizes() == v.sizes() && k.size(0) == B && k.size(1) == T && k.size(3) == D,
              "q, k, v shapes do not match");
  auto o = at::empty_like(q);
  auto lse = at::empty({B, H, T}, q.options());
  const int64_t n_blocks = (T + kBlock - 1) / kBlock, n_tasks = B * H * n_blocks, G = H / KV;
  const int64_t ldq = H * D, ldk = KV * D;
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float *op = o.data_ptr<float>(), *lp = lse.data_ptr<float>();
  const float alpha = static_cast<float>(scale);
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<float> buf(kBlock * T);
    float* s = buf.data();
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < n_tasks; ++task) {
      const int64_t blk = n_blocks - 1 - task % n_blocks;  // the longest blocks first
      const int64_t bh = task / n_blocks, b = bh / H, h = bh % H;
      const int64_t q0 = blk * kBlock, nq = std::min(kBlock, T - q0), nk = q0 + nq;
      const int64_t q_at = (b * T + q0) * ldq + h * D, kv_at = b * T * ldk + (h / G) * D;
      mm(false, true, nq, nk, D, alpha, qp + q_at, ldq, kp + kv_at, ldk, 0.f, s, nk);  // scaled scores
      for (int64_t r = 0; r < nq; ++r) {
        float* row = s + r * nk;
        const int64_t valid = q0 + r + 1;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < valid; ++j) mx = std::max(mx, row[j]);
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < valid; ++j) {
          row[j] = exp_nonpositive(row[j] - mx);
          sum += row[j];
        }
        const float inv = 1.f / sum;
        for (int64_t j = 0; j < valid; ++j) row[j] *= inv;
        std::fill(row + valid, row + nk, 0.f);
        lp[bh * T + q0 + r] = mx + std::log(sum);
      }
      mm(false, false, nq, D, nk, 1.f, s, nk, vp + kv_at, ldk, 0.f, op + q_at, ldq);
    }
  }
  return {o, lse};
}

// Returns (dq, dk, dv) for grad_o = dL/do. One task per (batch, key head) owns that head's dk and dv and the dq
// of its query heads, so no two threads write the same memory.
std::vector<at::Tensor> causal_attention_backward(at::Tensor grad_o, at::Tensor q, at::Tensor k,
                                                     at::Tensor v, at::Tensor o, at::Tensor lse,
                                                     double scale) {
  check(grad_o, "grad_o"), check(q, "q"), check(k, "k"), check(v, "v"), check(o, "o");
  TORCH_CHECK(lse.is_contiguous() && grad_o.sizes() == q.sizes() && o.sizes() == q.sizes(), "shapes do not match");
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3), KV = k.size(2), G = H / KV;
  const int64_t ldq = H * D, ldk = KV * D;
  auto dq = at::empty_like(q);
  auto dk = at::zeros_like(k);
  auto dv = at::zeros_like(v);
  const float *gp = grad_o.data_ptr<float>(), *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>();
  const float *vp = v.data_ptr<float>(), *op = o.data_ptr<float>(), *lp = lse.data_ptr<float>();
  float *dqp = dq.data_ptr<float>(), *dkp = dk.data_ptr<float>(), *dvp = dv.data_ptr<float>();
  const float alpha = static_cast<float>(scale);
  const int64_t n_blocks = (T + kBlock - 1) / kBlock;
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<float> p_buf(kBlock * T), dp_buf(kBlock * T), delta(T);
    float *p = p_buf.data(), *dp = dp_buf.data();
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < B * KV; ++task) {
      const int64_t b = task / KV, kv_at = b * T * ldk + (task % KV) * D;
      const float *kh = kp + kv_at, *vh = vp + kv_at;
      float *dkh = dkp + kv_at, *dvh = dvp + kv_at;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = (task % KV) * G + g, q_at = b * T * ldq + h * D;
        const float *gh = gp + q_at, *qh = qp + q_at, *oh = op + q_at, *lh = lp + (b * H + h) * T;
        for (int64_t t = 0; t < T; ++t) {  // delta = rowsum(grad_o * o)
          float acc = 0.f;
#pragma omp simd reduction(+ : acc)
          for (int64_t d = 0; d < D; ++d) acc += gh[t * ldq + d] * oh[t * ldq + d];
          delta[t] = acc;
        }
        for (int64_t blk = 0; blk < n_blocks; ++blk) {
          const int64_t q0 = blk * kBlock, nq = std::min(kBlock, T - q0), nk = q0 + nq;
          const float *qi = qh + q0 * ldq, *gi = gh + q0 * ldq;
          mm(false, true, nq, nk, D, alpha, qi, ldq, kh, ldk, 0.f, p, nk);
          for (int64_t r = 0; r < nq; ++r) {  // the forward's probabilities, from its log-sum-exp
            float* row = p + r * nk;
            const int64_t valid = q0 + r + 1;
            const float l = lh[q0 + r];
#pragma omp simd
            for (int64_t j = 0; j < valid; ++j) row[j] = exp_nonpositive(row[j] - l);
            std::fill(row + valid, row + nk, 0.f);
          }
          mm(true, false, nk, D, nq, 1.f, p, nk, gi, ldq, 1.f, dvh, ldk);  // dv += p^T grad_o
          mm(false, true, nq, nk, D, 1.f, gi, ldq, vh, ldk, 0.f, dp, nk);  // dp = grad_o v^T
          for (int64_t r = 0; r < nq; ++r) {                               // ds = p (dp - delta) * scale
            float *prow = p + r * nk, *drow = dp + r * nk;
            const float dl = delta[q0 + r];
#pragma omp simd
            for (int64_t j = 0; j < nk; ++j) drow[j] = prow[j] * (drow[j] - dl) * alpha;
          }
          mm(false, false, nq, D, nk, 1.f, dp, nk, kh, ldk, 0.f, dqp + q_at + q0 * ldq, ldq);  // dq = ds k
          mm(true, false, nk, D, nq, 1.f, dp, nk, qi, ldq, 1.f, dkh, ldk);                    // dk += ds^T q
        }
      }
    }
  }
  return {dq, dk, dv};
}

// One attention layer for a few new tokens against the KV cache, in place of: split qkv, RoPE on q and k
// (Hugging Face rotate-half layout), write k and v into the cache at `positions`, masked softmax attention
// with grouped-query heads.
//   qkv [B, T, (H + 2 KV) * d]; positions int64 [T] with cos, sin [T, d], or [B, T] (each row at its own
//   positions: continuous batching) with cos, sin [B, 1, T, d]; cache_k, cache_v [Bc >= B, KV, S, d];
//   mask bool [B, T, S] (true = may attend). Returns [B, T, H * d].
at::Tensor attend_cached(at::Tensor qkv, at::Tensor cos, at::Tensor sin, at::Tensor positions,
                            at::Tensor cache_k, at::Tensor cache_v, at::Tensor mask, int64_t H,
                            int64_t KV) {
  TORCH_CHECK(qkv.scalar_type() == at::kFloat && cache_k.scalar_type() == at::kFloat, "fp32 expected");
  TORCH_CHECK(cache_k.is_contiguous() && cache_v.is_contiguous(), "contiguous cache expected");
  qkv = qkv.contiguous(); cos = cos.contiguous(); sin = sin.contiguous();
  positions = positions.contiguous(); mask = mask.contiguous();
  const int64_t B = qkv.size(0), T = qkv.size(1), W = qkv.size(2), d = cos.size(-1), half = d / 2;
  const int64_t S = cache_k.size(2), G = H / KV;
  const bool per_row = positions.dim() == 2;
  TORCH_CHECK(positions.numel() == (per_row ? B * T : T) && cos.numel() == positions.numel() * d,
              "positions [T] with cos [T, d], or [B, T] with cos [B, 1, T, d], expected");
  auto index_of = [&](int64_t b, int64_t t) { return per_row ? b * T + t : t; };  // index of (b, t) in positions/cos
  TORCH_CHECK(W == (H + 2 * KV) * d, "qkv width does not match heads");
  const float* in = qkv.data_ptr<float>(); const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>(); const int64_t* pos = positions.data_ptr<int64_t>();
  const bool* mp = mask.data_ptr<bool>();
  float* kc = cache_k.data_ptr<float>(); float* vc = cache_v.data_ptr<float>();
  int64_t n_keys = 0;  // keys past the last position are never visible: stop there
  for (int64_t i = 0; i < positions.numel(); ++i) n_keys = std::max(n_keys, pos[i] + 1);
  TORCH_CHECK(n_keys <= S, "position outside the cache");

  auto rope = [&](const float* x, int64_t i, float* out) {  // i: the index of the token's position
    const float* c = cp + i * d; const float* s = sp + i * d;
    for (int64_t i = 0; i < half; ++i) {
      out[i] = x[i] * c[i] - x[i + half] * s[i];
      out[i + half] = x[i + half] * c[i + half] + x[i] * s[i + half];
    }
  };
  // 1) rotated keys and the values into the cache
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const float* row = in + (b * T + t) * W;
      for (int64_t h = 0; h < KV; ++h) {
        const int64_t slot = ((b * KV + h) * S + pos[index_of(b, t)]) * d;
        rope(row + (H + h) * d, index_of(b, t), kc + slot);
        std::copy(row + (H + KV + h) * d, row + (H + KV + h + 1) * d, vc + slot);
      }
    }
  // 2) attention, one (batch, head) per task
  auto out = at::empty({B, T, H * d}, qkv.options());
  float* op = out.data_ptr<float>();
  const float scale = 1.f / std::sqrt((float)d);
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> q(d), p(n_keys);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H, kvh = h / G;
      const float* K = kc + (b * KV + kvh) * S * d; const float* V = vc + (b * KV + kvh) * S * d;
      for (int64_t t = 0; t < T; ++t) {
        rope(in + (b * T + t) * W + h * d, index_of(b, t), q.data());
        const bool* m = mp + (b * T + t) * S;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < n_keys; ++j) {
          if (!m[j]) { p[j] = -std::numeric_limits<float>::infinity(); continue; }
          float acc = 0.f;
          for (int64_t e = 0; e < d; ++e) acc += q[e] * K[j * d + e];
          p[j] = acc * scale;
          mx = std::max(mx, p[j]);
        }
        float sum = 0.f;
        for (int64_t j = 0; j < n_keys; ++j) { p[j] = m[j] ? std::exp(p[j] - mx) : 0.f; sum += p[j]; }
        float* o = op + (b * T + t) * H * d + h * d;
        std::fill(o, o + d, 0.f);
        for (int64_t j = 0; j < n_keys; ++j) {
          if (p[j] == 0.f) continue;
          const float pj = p[j] / sum;
          for (int64_t e = 0; e < d; ++e) o[e] += pj * V[j * d + e];
        }
      }
    }
  });
  return out;
}

// ---- prompt attention: a prompt's queries against its keys (and any earlier cache entries), inference only ----
// One OpenMP region over (row, key/value head, block of queries) tasks; inside a task, single-threaded: the
// group's queries of the block times the keys some of them see (the causal triangle, block by block), mask,
// softmax, times the values. The two products are oneDNN's GEMM through the dispatcher (mkldnn::_linear_pointwise,
// the op camelid.ops.linear.matmul_t calls): inside this region its own OpenMP region runs on one thread. Tasks
// are taken from a shared counter, the most expensive (last query blocks) first, so two threads stay balanced.
// q [B, H, T, d], k and v [B, KV, S, d] (last dimension contiguous), mask [1 or B, T, S] bool, every query seeing
// at least one key (attention.py checks); returns [B, T, H, d].
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/core/List.h>
#include <c10/core/InferenceMode.h>
#include <atomic>

static at::Tensor onednn_matmul_t(const at::Tensor& x, const at::Tensor& w) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                         c10::string_view, c10::List<std::optional<at::Scalar>>,
                                         std::optional<c10::string_view>)>();
  return op.call(x, w, std::nullopt, "none", c10::List<std::optional<at::Scalar>>(), std::nullopt);
}

at::Tensor prompt_attention(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor mask, int64_t block) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && mask.dim() == 3,
              "prompt_attention: q [B, H, T, d], k and v [B, KV, S, d], mask [1 or B, T, S] expected");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), d = q.size(3);
  const int64_t KV = k.size(1), S = k.size(2);
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat &&
                  q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "prompt_attention: fp32 CPU tensors expected");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(3) == d && KV > 0 && H % KV == 0,
              "prompt_attention: k and v [B, KV, S, d] with KV dividing H expected");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "prompt_attention: rows of q, k, v contiguous");
  TORCH_CHECK(mask.scalar_type() == at::kBool && (mask.size(0) == 1 || mask.size(0) == B) && mask.size(1) == T &&
                  mask.size(2) == S,
              "prompt_attention: mask [1 or B, T, S] bool expected");
  TORCH_CHECK(block > 0, "prompt_attention: block > 0 expected");
  mask = mask.contiguous();
  const int64_t rep = H / KV, n_blocks = (T + block - 1) / block, n_tasks = B * n_blocks * KV;
  const bool* mp = mask.data_ptr<bool>();
  const float* qp = q.data_ptr<float>();
  auto out = at::empty({B, T, H, d}, q.options());
  float* op = out.data_ptr<float>();
  const float scale = 1.f / std::sqrt((float)d);
  std::atomic<int64_t> next{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n_tasks);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    c10::InferenceMode guard;
    for (int64_t task = next++; task < n_tasks; task = next++) {
      // the last query blocks (the most keys) first
      const int64_t blk = n_blocks - 1 - task / (B * KV), b = task % (B * KV) / KV, g = task % KV;
      const int64_t t0 = blk * block, rows = std::min(T, t0 + block) - t0;
      const bool* m = mp + ((mask.size(0) == 1 ? 0 : b) * T + t0) * S;
      // keys: up to the last one a query of the block sees; cut: the first one some query does not see
      int64_t keys = 0, cut = S;
      for (int64_t i = 0; i < rows; ++i) {
        const bool* r = m + i * S;
        int64_t last = S;
        while (last > 0 && !r[last - 1]) --last;
        int64_t first_hidden = 0;
        while (first_hidden < S && r[first_hidden]) ++first_hidden;
        keys = std::max(keys, last);
        cut = std::min(cut, first_hidden);
      }
      cut = std::min(cut, keys);
      // the group's queries of this block, scaled: [rep * rows, d]
      auto qs = at::empty({rep * rows, d}, q.options());
      float* qsp = qs.data_ptr<float>();
      for (int64_t h = 0; h < rep; ++h)
        for (int64_t i = 0; i < rows; ++i) {
          const float* src = qp + b * q.stride(0) + (g * rep + h) * q.stride(1) + (t0 + i) * q.stride(2);
          float* dst = qsp + (h * rows + i) * d;
          for (int64_t e = 0; e < d; ++e) dst[e] = src[e] * scale;
        }
      at::Tensor kg = k.select(0, b).select(0, g).narrow(0, 0, keys);
      at::Tensor vg = v.select(0, b).select(0, g).narrow(0, 0, keys);
      at::Tensor scores = onednn_matmul_t(qs, kg).contiguous();  // [rep * rows, keys]
      float* sp = scores.data_ptr<float>();
      std::vector<float> inv(rep * rows);
      for (int64_t r = 0; r < rep * rows; ++r) {
        float* s = sp + r * keys;
        const bool* mr = m + (r % rows) * S;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < cut; ++j) mx = std::max(mx, s[j]);
        for (int64_t j = cut; j < keys; ++j) mx = mr[j] ? std::max(mx, s[j]) : mx;
        float sum = 0.f;
        for (int64_t j = 0; j < cut; ++j) { s[j] = camelid::exp_nonpositive(s[j] - mx); sum += s[j]; }
        for (int64_t j = cut; j < keys; ++j) { s[j] = mr[j] ? camelid::exp_nonpositive(s[j] - mx) : 0.f; sum += s[j]; }
        inv[r] = 1.f / sum;
      }
      at::Tensor o = onednn_matmul_t(scores, vg.t()).contiguous();  // [rep * rows, d], unnormalised
      const float* opp = o.data_ptr<float>();
      for (int64_t h = 0; h < rep; ++h)
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t r = h * rows + i;
          float* dst = op + ((b * T + t0 + i) * H + g * rep + h) * d;
          for (int64_t e = 0; e < d; ++e) dst[e] = opp[r * d + e] * inv[r];
        }
    }
  });
  return out;
}
