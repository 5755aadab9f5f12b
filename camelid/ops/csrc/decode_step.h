// The whole-model decode step (decode_step.cpp): its class, for the Python bindings in module.cpp, and the
// weight and activation formats it reads.
#pragma once
#include "dot.h"
#include <vector>

namespace camelid {

inline void group_sums(const float* x, int64_t K, float* xs) {
  for (int64_t g = 0; g < K / 32; ++g) {
    float s = 0.f;
    for (int j = 0; j < 32; ++j) s += x[g * 32 + j];
    xs[g] = s;
  }
}

enum Kind : int64_t { F32 = 0, INT8 = 1, INT4 = 2, F16 = 3 };

// Attention over the cache goes in chunks of this many positions (a multiple of 16), merged afterwards.
constexpr int64_t kAttnChunk = 128;
constexpr int64_t kMaxGroup = 64;  // query heads per KV head
struct AttnTask {
  int64_t b, h0, chunk;  // row, first query head, chunk
};

// An activation vector as the kernels read it: fp32, its sums over groups of 32 (int4's minimum), and
// optionally an int8 copy in blocks of 32 (q8: the integer dot-product kernels).
struct Act {
  const float* x = nullptr;
  float* xs = nullptr;
  int8_t* q = nullptr;
  float* dq = nullptr;
  bool q8 = false;

  void set(const float* v, int64_t K, bool int8_activations) {
    x = v;
    q8 = int8_activations && K % 32 == 0;
    if (!q8) {
      group_sums(v, K, xs);
      return;
    }
    quantize_q8(v, K, q, dq);
    // int4's minimum then multiplies the sums of the int8 activations, not of x: the product is exactly
    // dequantised W times dequantised x. (Exact sums leave (w - min) * rounding error, and w - min runs
    // from 0 to twice |w|: measured +2.0% perplexity instead of +0.x%.)
    for (int64_t g = 0; g < K / 32; ++g) {
      int32_t sum = 0;
      for (int j = 0; j < 32; ++j) sum += q[g * 32 + j];
      xs[g] = (float)sum * dq[g];
    }
  }
};

// One linear layer y = W x, W [N, K], in one of the four weight formats (camelid/variants/quantized.py's layouts).
struct Linear {
  Kind kind = F32;
  const void* w = nullptr;
  const float* scale8 = nullptr;   // int8: one scale per row
  const at::Half* scale4 = nullptr; // int4: fp16 scale and minimum per group of 32
  const at::Half* min4 = nullptr;
  const void* w16 = nullptr;  // the same int8/int4 weights interleaved 16 rows at a time (int8x16_q8, int4x16_q8)
  int64_t N = 0, K = 0;

  // rows [n0, n1) of y = W x; int8/int4 weights use the int8 copy of x when there is one
  void rows(const Act& a, int64_t n0, int64_t n1, float* y) const {
    if (n0 >= n1) return;
    switch (kind) {
      case F32: dot_f32(a.x, static_cast<const float*>(w), K, n0, n1, y); break;
      case F16: dot_f16(a.x, static_cast<const at::Half*>(w), K, n0, n1, y); break;
      case INT8:
#ifdef CAMELID_AVX512_Q8
        if (a.q8 && w16) return int8x16_q8<1>(&a.q, &a.dq, static_cast<const int8_t*>(w16), K, N, n0, n1, y, 0);
#endif
        if (a.q8) dot_int8_q8(a.q, a.dq, static_cast<const int8_t*>(w), scale8, K, n0, n1, y);
        else dot_int8(a.x, static_cast<const int8_t*>(w), scale8, K, n0, n1, y);
        break;
      case INT4:
#ifdef CAMELID_AVX512_Q8
        if (a.q8 && w16)
          return int4x16_q8<1>(&a.q, &a.dq, &a.xs, static_cast<const uint8_t*>(w16), K, N, n0, n1, y, 0);
#endif
        if (a.q8) dot_int4_q8(a.q, a.dq, a.xs, static_cast<const uint8_t*>(w), scale4, min4, K, n0, n1, y);
        else dot_int4(a.x, a.xs, static_cast<const uint8_t*>(w), scale4, min4, K, n0, n1, y);
        break;
    }
  }

  // rows [n0, n1) of y_b = W x_b for B activations (y_b = y + b * ldy): each block of weight rows is read
  // from memory once and multiplies every activation while it is in cache; int8/int4 weights with int8
  // activations go through the *_q8_multi kernels, which also load (unpack) each weight group once for up to
  // 8 activations. Every y_b is bit for bit what `rows` gives for a_b alone.
  void rows_batch(const Act* a, int64_t B, int64_t n0, int64_t n1, float* y, int64_t ldy) const {
    if (B == 1) return rows(a[0], n0, n1, y);
    // blocks of weight rows (a multiple of the kernels' 4), each multiplied by every group of kMaxActs
    // activations while it is in cache; one block when one group takes them all
    const bool multi = (kind == INT8 || kind == INT4) && a[0].q8;  // (every activation of a layer has one width)
    const int64_t block = !multi ? 16 : B <= kMaxActs ? std::max<int64_t>(n1 - n0, 1) : 64;
    for (int64_t n = n0; n < n1; n += block) {
      const int64_t e = std::min(n1, n + block);
      if (!multi) {
        for (int64_t b = 0; b < B; ++b) rows(a[b], n, e, y + b * ldy);
        continue;
      }
      for (int64_t b0 = 0; b0 < B; b0 += kMaxActs) {
        const int M = (int)std::min<int64_t>(kMaxActs, B - b0);
        const int8_t* q[kMaxActs]; const float* dq[kMaxActs]; const float* xs[kMaxActs];
        for (int m = 0; m < M; ++m) { q[m] = a[b0 + m].q; dq[m] = a[b0 + m].dq; xs[m] = a[b0 + m].xs; }
#ifdef CAMELID_AVX512_Q8
        if (w16 && kind == INT8) {
          dot_int8x16_q8_multi(M, q, dq, static_cast<const int8_t*>(w16), K, N, n, e, y + b0 * ldy, ldy);
          continue;
        }
        if (w16) {
          dot_int4x16_q8_multi(M, q, dq, xs, static_cast<const uint8_t*>(w16), K, N, n, e, y + b0 * ldy, ldy);
          continue;
        }
#endif
        if (kind == INT8)
          dot_int8_q8_multi(M, q, dq, static_cast<const int8_t*>(w), scale8, K, n, e, y + b0 * ldy, ldy);
        else
          dot_int4_q8_multi(M, q, dq, xs, static_cast<const uint8_t*>(w), scale4, min4, K, n, e, y + b0 * ldy, ldy);
      }
    }
  }
};

struct Layer {
  const float* attn_norm;
  const float* ffn_norm;
  Linear wqkv, wo, w13, w2;
  void* cache_k = nullptr;  // [rows, KV, S, d] of this layer (fp32, or fp16 where kv16), bound per generation
  void* cache_v = nullptr;
};

}  // namespace camelid

class DecodeStep {
 public:
  DecodeStep(int64_t dim, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, int64_t ffn, double eps,
             bool int8_activations);
  void set_embedding(int64_t kind, std::vector<at::Tensor> t);
  void add_layer(at::Tensor attn_norm, at::Tensor ffn_norm, std::vector<int64_t> kinds,
                 std::vector<std::vector<at::Tensor>> t);
  void set_head(at::Tensor norm_w, int64_t kind, std::vector<at::Tensor> t);
  // A copy of every int8/int4 linear's weights (the output head included) interleaved 16 rows at a time, which
  // every later step reads (faster steps of several sequences); returns the copy's bytes, 0 where this build or
  // these weights cannot use it.
  int64_t interleave();
  // The model's KV cache (one [rows, KV, S, d] k and v per layer, all fp32 or all fp16) and the RoPE tables [S, d] for its positions.
  void bind_cache(std::vector<at::Tensor> ks, std::vector<at::Tensor> vs, at::Tensor cos_t,
                  at::Tensor sin_t);
  // Logits [1, 1, vocab] of `token` at position `pos`; writes this position's keys and values into the cache.
  at::Tensor forward(int64_t token, int64_t pos);
  // The greedy head: an int8 copy of the fp32 head, q [V, D] with one scale per row, per row a bound err on
  // |h . w - h . (q * scale)| / ||h||_2 and wq = ||q * scale||_2 (camelid/variants/decode_step.py: greedy_head). With it
  // forward_argmax and head_argmax read the int8 rows, and the fp32 rows only of the tokens that can still be
  // the largest logit: the argmax of the fp32 logits, from a quarter of the head's bytes.
  void set_greedy_head(at::Tensor q, at::Tensor scale, at::Tensor err, at::Tensor wq);
  // The argmax of forward(token, pos)'s logits (the first on ties), through the greedy head.
  int64_t forward_argmax(int64_t token, int64_t pos);
  // The argmax of the head's fp32 logits of h [D] (a final-norm hidden state), through the greedy head.
  int64_t head_argmax(at::Tensor h);
  // Logits [B, vocab] of one token per sequence: tokens[b] at positions[b], in cache row rows[b] (distinct).
  // sources/shared (empty, or one each per token): positions [0, shared[b]) of row rows[b] hold exactly what
  // row sources[b] holds there, so attention reads them from that row (shared[b]: a multiple of 16; 0: none).
  at::Tensor forward_rows(std::vector<int64_t> tokens, std::vector<int64_t> positions, std::vector<int64_t> rows,
                          std::vector<int64_t> sources, std::vector<int64_t> shared);

 private:
  int64_t D, H, KV, d, F, S = 0, cache_rows = 0;
  float eps;
  bool q8;  // int8 activations for int8/int4 weights
  bool kv16 = false;  // the bound KV cache holds fp16 (attention computes in fp32)
  camelid::Linear embed, head;
  const int8_t* greedy_q = nullptr;  // set_greedy_head's tensors (kept alive in `keep`)
  const float *greedy_scale = nullptr, *greedy_err = nullptr, *greedy_wq = nullptr;
  std::vector<float> approx;  // the int8 head's logits
  std::vector<std::pair<float, int64_t>> best;  // per thread: its best candidate (logit, row)
  const float* norm = nullptr;
  std::vector<camelid::Layer> layers;
  std::vector<at::Tensor> keep, cache;  // keep the weights and caches alive while their pointers are held
  at::Tensor cos, sin;
  std::vector<float> x, qkv, gu, hid, tmp, part;  // shared activations, reused across steps
  std::vector<camelid::AttnTask> tasks;  // attention tasks; thread t runs [task_end[t], task_end[t + 1])
  std::vector<int64_t> task_end;
  at::Tensor run(const std::vector<int64_t>& tokens, const std::vector<int64_t>& positions,
                 const std::vector<int64_t>& rows, std::vector<int64_t> sources, std::vector<int64_t> shared,
                 bool greedy);
  // thread t of nt: its share of the greedy head for the normalised activation h (one barrier inside)
  void greedy_share(const float* h, int t, int nt, float* lows);
  int64_t greedy_pick(int nt) const;
};

at::Tensor gemv_q8(at::Tensor x, int64_t kind, std::vector<at::Tensor> t);
at::Tensor gemm_q8(at::Tensor x, int64_t kind, std::vector<at::Tensor> t);
