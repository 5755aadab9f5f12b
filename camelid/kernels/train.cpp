// The elementwise parts of a training step, forward and backward, one pass over memory each: RMSNorm, SwiGLU
// (silu(gate) * up) and RoPE. Eager PyTorch spends 3-6 passes and an allocation per pass on each (and inductor
// fuses them only under torch.compile); on a CPU these memory-bound passes are a tenth of a step.
// camelid/model.py holds the reference ops; tests/test_kernels.py compares each function with them.
#include "vecmath.h"
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <omp.h>
#include <algorithm>
#include <cmath>
#include <vector>

namespace {

void check(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dtype() == torch::kFloat32 && t.is_contiguous(), name,
              ": a contiguous fp32 CPU tensor expected");
}

}  // namespace

// x [N, d], weight [d] -> (y = x * rstd * weight, rstd [N]), rstd = 1 / sqrt(mean(x^2) + eps).
std::vector<torch::Tensor> rms_norm_forward(torch::Tensor x, torch::Tensor weight, double eps) {
  check(x, "x"), check(weight, "weight");
  const int64_t d = x.size(-1), n = x.numel() / d;
  auto y = torch::empty_like(x);
  auto rstd = torch::empty({n}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>();
  float *yp = y.data_ptr<float>(), *rp = rstd.data_ptr<float>();
#pragma omp parallel for num_threads(at::get_num_threads()) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float* xr = xp + i * d;
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < d; ++j) ss += xr[j] * xr[j];
    const float r = 1.f / std::sqrt(ss / d + static_cast<float>(eps));
    rp[i] = r;
    float* yr = yp + i * d;
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) yr[j] = xr[j] * r * wp[j];
  }
  return {y, rstd};
}

// -> (dx, dweight) for dy: with xhat = x * rstd and gw = dy * weight, dx = rstd * (gw - xhat * mean(gw * xhat))
// and dweight = sum over rows of dy * xhat (per-thread partial sums over fixed row ranges: deterministic).
std::vector<torch::Tensor> rms_norm_backward(torch::Tensor dy, torch::Tensor x, torch::Tensor weight,
                                             torch::Tensor rstd) {
  check(dy, "dy"), check(x, "x"), check(weight, "weight"), check(rstd, "rstd");
  const int64_t d = x.size(-1), n = x.numel() / d;
  const int threads = at::get_num_threads();
  auto dx = torch::empty_like(x);
  auto partial = torch::zeros({threads, d}, x.options());
  const float *gp = dy.data_ptr<float>(), *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>();
  const float* rp = rstd.data_ptr<float>();
  float *dxp = dx.data_ptr<float>(), *pp = partial.data_ptr<float>();
#pragma omp parallel num_threads(threads)
  {
    float* dw = pp + omp_get_thread_num() * d;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const float *g = gp + i * d, *xr = xp + i * d;
      const float r = rp[i];
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t j = 0; j < d; ++j) {
        dot += g[j] * wp[j] * xr[j];
        dw[j] += g[j] * xr[j] * r;
      }
      const float c = dot * r * r / d;
      float* out = dxp + i * d;
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) out[j] = r * (g[j] * wp[j] - xr[j] * c);
    }
  }
  return {dx, partial.sum(0)};
}

// silu(gate) * up, elementwise.
torch::Tensor swiglu_forward(torch::Tensor gate, torch::Tensor up) {
  check(gate, "gate"), check(up, "up");
  TORCH_CHECK(gate.sizes() == up.sizes(), "gate and up shapes differ");
  auto h = torch::empty_like(gate);
  const float *a = gate.data_ptr<float>(), *b = up.data_ptr<float>();
  float* out = h.data_ptr<float>();
  const int64_t n = gate.numel();
#pragma omp parallel for simd num_threads(at::get_num_threads()) schedule(static)
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] * camelid::sigmoid(a[i]) * b[i];
  return h;
}

// In place: gate becomes dgate and up becomes dup, for dh: dup = dh * silu(gate), dgate = dh * up * s *
// (1 + gate * (1 - s)), s = sigmoid(gate). The forward's inputs are dead after this backward, and reusing them
// saves two fresh [tokens, hidden] buffers, whose page faults cost more than the arithmetic. Their version
// counters are bumped, so a second backward through the same graph fails loudly instead of reading gradients.
void swiglu_backward_(torch::Tensor dh, torch::Tensor gate, torch::Tensor up) {
  check(dh, "dh"), check(gate, "gate"), check(up, "up");
  TORCH_CHECK(dh.sizes() == gate.sizes() && gate.sizes() == up.sizes(), "dh, gate and up shapes differ");
  const float* g = dh.data_ptr<float>();
  float *a = gate.data_ptr<float>(), *b = up.data_ptr<float>();
  const int64_t n = gate.numel();
#pragma omp parallel for simd num_threads(at::get_num_threads()) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float s = camelid::sigmoid(a[i]), ai = a[i], bi = b[i];
    b[i] = g[i] * ai * s;
    a[i] = g[i] * bi * s * (1.f + ai * (1.f - s));
  }
  gate.unsafeGetTensorImpl()->bump_version();
  up.unsafeGetTensorImpl()->bump_version();
}

// In place: logits [n, V] become softmax(logits) - onehot(targets) (the gradient of the summed cross-entropy);
// returns each row's loss, logsumexp(logits) - logits[target]. Rows in parallel, each in cache: three passes over
// a row where eager PyTorch makes six over the whole chunk.
torch::Tensor cross_entropy_grad_(torch::Tensor logits, torch::Tensor targets) {
  check(logits, "logits");
  TORCH_CHECK(logits.dim() == 2 && targets.dtype() == torch::kInt64 && targets.is_contiguous() &&
                  targets.numel() == logits.size(0), "logits [n, V] and int64 targets [n] expected");
  const int64_t n = logits.size(0), V = logits.size(1);
  auto loss = torch::empty({n}, logits.options());
  float *lp = logits.data_ptr<float>(), *out = loss.data_ptr<float>();
  const int64_t* tp = targets.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(tp[i] >= 0 && tp[i] < V, "target ", tp[i], " is outside the vocabulary of ", V, " tokens");
#pragma omp parallel for num_threads(at::get_num_threads()) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    float* row = lp + i * V;
    const float picked = row[tp[i]];
    float mx = row[0];
    for (int64_t j = 1; j < V; ++j) mx = std::max(mx, row[j]);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < V; ++j) {
      row[j] = camelid::exp_nonpositive(row[j] - mx);
      sum += row[j];
    }
    const float inv = 1.f / sum;
    out[i] = mx + std::log(sum) - picked;
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) row[j] *= inv;
    row[tp[i]] -= 1.f;
  }
  return loss;
}

// x [B, T, H, D] rotated pairwise (i, i + D/2) by the angles with cos, sin [T, D/2]; sign -1 turns backwards
// (the backward of a rotation is the opposite rotation).
torch::Tensor rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, double sign) {
  check(x, "x"), check(cos, "cos"), check(sin, "sin");
  TORCH_CHECK(x.dim() == 4 && cos.dim() == 2 && cos.size(0) == x.size(1) && cos.size(1) * 2 == x.size(3) &&
                  sin.sizes() == cos.sizes(), "rope: x [B, T, H, D] and cos, sin [T, D/2] expected");
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2), D = x.size(3), half = D / 2;
  auto out = torch::empty_like(x);
  const float *xp = x.data_ptr<float>(), *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float sg = static_cast<float>(sign);
#pragma omp parallel for num_threads(at::get_num_threads()) schedule(static)
  for (int64_t bt = 0; bt < B * T; ++bt) {
    const float *c = cp + (bt % T) * half, *s = sp + (bt % T) * half;
    for (int64_t h = 0; h < H; ++h) {
      const float* xr = xp + (bt * H + h) * D;
      float* o = op + (bt * H + h) * D;
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        o[i] = xr[i] * c[i] - sg * xr[i + half] * s[i];
        o[i + half] = xr[i + half] * c[i] + sg * xr[i] * s[i];
      }
    }
  }
  return out;
}
