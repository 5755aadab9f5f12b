// RoPE for training, Hugging Face's rotate-half layout, forward and backward (the inverse rotation), one pass
// over memory in the projections' [B, T, heads, d] layout. camelid/ops/rope.py holds the reference.
#include "kernels.h"
#include "vecmath.h"
#include <omp.h>
#include <algorithm>
#include <cmath>

using camelid::check_f32;

// x [B, T, H, D] rotated pairwise (i, i + D/2) by the angles with cos, sin [T, D/2]; sign -1 turns backwards
// (the backward of a rotation is the opposite rotation).
at::Tensor rope(at::Tensor x, at::Tensor cos, at::Tensor sin, double sign) {
  check_f32(x, "x"), check_f32(cos, "cos"), check_f32(sin, "sin");
  TORCH_CHECK(x.dim() == 4 && cos.dim() == 2 && cos.size(0) == x.size(1) && cos.size(1) * 2 == x.size(3) &&
                  sin.sizes() == cos.sizes(), "rope: x [B, T, H, D] and cos, sin [T, D/2] expected");
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2), D = x.size(3), half = D / 2;
  auto out = at::empty_like(x);
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
