// RMSNorm, y = x / sqrt(mean(x^2) + eps) * weight over the last dim, fp32 on the CPU: one sequential loop for
// the few rows of a decode step (no thread wake-up), and a training forward/backward pair, one pass over memory
// each (eager PyTorch spends 3-6 passes and an allocation per pass). camelid/ops/rmsnorm.py holds the reference.
#include "kernels.h"
#include "vecmath.h"
#include <omp.h>
#include <algorithm>
#include <cmath>

using camelid::check_f32;

// RMSNorm over the last dim: y = x / sqrt(mean(x^2) + eps) * w.   x [N, D], w [D]
at::Tensor rms_norm(at::Tensor x, at::Tensor w, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "fp32 expected");
  auto xc = x.contiguous();
  const int64_t D = xc.size(-1), N = xc.numel() / D;
  auto y = at::empty_like(xc);
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

// x [N, d], weight [d] -> (y = x * rstd * weight, rstd [N]), rstd = 1 / sqrt(mean(x^2) + eps).
std::vector<at::Tensor> rms_norm_forward(at::Tensor x, at::Tensor weight, double eps) {
  check_f32(x, "x"), check_f32(weight, "weight");
  const int64_t d = x.size(-1), n = x.numel() / d;
  auto y = at::empty_like(x);
  auto rstd = at::empty({n}, x.options());
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
std::vector<at::Tensor> rms_norm_backward(at::Tensor dy, at::Tensor x, at::Tensor weight,
                                             at::Tensor rstd) {
  check_f32(dy, "dy"), check_f32(x, "x"), check_f32(weight, "weight"), check_f32(rstd, "rstd");
  const int64_t d = x.size(-1), n = x.numel() / d;
  const int threads = at::get_num_threads();
  auto dx = at::empty_like(x);
  auto partial = at::zeros({threads, d}, x.options());
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
