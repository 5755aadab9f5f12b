// Fused decode-step operations: in eager PyTorch each of these is 7-25 small ops (a few microseconds of
// dispatch each, thousands per token); here each is one call. fp32 on CPU; the PyTorch code in
// camelid/model.py is the reference the tests compare against.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <limits>
#include <vector>

// RMSNorm over the last dim: y = x / sqrt(mean(x^2) + eps) * w.   x [N, D], w [D]
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && w.dtype() == torch::kFloat32, "fp32 expected");
  auto xc = x.contiguous();
  const int64_t D = xc.size(-1), N = xc.numel() / D;
  auto y = torch::empty_like(xc);
  const float* xp = xc.data_ptr<float>(); const float* wp = w.contiguous().data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t n = 0; n < N; ++n) {
    const float* r = xp + n * D;
    float ss = 0.f;
    for (int64_t i = 0; i < D; ++i) ss += r[i] * r[i];
    const float inv = 1.f / std::sqrt(ss / (float)D + (float)eps);
    for (int64_t i = 0; i < D; ++i) yp[n * D + i] = wp[i] * (r[i] * inv);
  }
  return y;
}

// One attention layer for a few new tokens against the KV cache, in place of: split qkv, RoPE on q and k
// (Hugging Face rotate-half layout), write k and v into the cache at `positions`, masked softmax attention
// with grouped-query heads.
//   qkv [B, T, (H + 2 KV) * d]; cos, sin [T, d]; positions int64 [T]; cache_k, cache_v [Bc >= B, KV, S, d];
//   mask bool [B, T, S] (true = may attend). Returns [B, T, H * d].
torch::Tensor attend_cached(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor positions,
                            torch::Tensor cache_k, torch::Tensor cache_v, torch::Tensor mask, int64_t H,
                            int64_t KV) {
  TORCH_CHECK(qkv.dtype() == torch::kFloat32 && cache_k.dtype() == torch::kFloat32, "fp32 expected");
  TORCH_CHECK(cache_k.is_contiguous() && cache_v.is_contiguous(), "contiguous cache expected");
  qkv = qkv.contiguous(); cos = cos.contiguous(); sin = sin.contiguous();
  positions = positions.contiguous(); mask = mask.contiguous();
  const int64_t B = qkv.size(0), T = qkv.size(1), W = qkv.size(2), d = cos.size(1), half = d / 2;
  const int64_t S = cache_k.size(2), G = H / KV;
  TORCH_CHECK(W == (H + 2 * KV) * d, "qkv width does not match heads");
  const float* in = qkv.data_ptr<float>(); const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>(); const int64_t* pos = positions.data_ptr<int64_t>();
  const bool* mp = mask.data_ptr<bool>();
  float* kc = cache_k.data_ptr<float>(); float* vc = cache_v.data_ptr<float>();
  int64_t n_keys = 0;  // keys past the last position are never visible: stop there
  for (int64_t t = 0; t < T; ++t) n_keys = std::max(n_keys, pos[t] + 1);
  TORCH_CHECK(n_keys <= S, "position outside the cache");

  auto rope = [&](const float* x, int64_t t, float* out) {
    const float* c = cp + t * d; const float* s = sp + t * d;
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
        const int64_t slot = ((b * KV + h) * S + pos[t]) * d;
        rope(row + (H + h) * d, t, kc + slot);
        std::copy(row + (H + KV + h) * d, row + (H + KV + h + 1) * d, vc + slot);
      }
    }
  // 2) attention, one (batch, head) per task
  auto out = torch::empty({B, T, H * d}, qkv.options());
  float* op = out.data_ptr<float>();
  const float scale = 1.f / std::sqrt((float)d);
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> q(d), p(n_keys);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H, kvh = h / G;
      const float* K = kc + (b * KV + kvh) * S * d; const float* V = vc + (b * KV + kvh) * S * d;
      for (int64_t t = 0; t < T; ++t) {
        rope(in + (b * T + t) * W + h * d, t, q.data());
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
