// Small math for the kernels' inner loops, written so that GCC vectorizes them (no libm calls).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace camelid {

// exp for x <= 0 (softmax arguments), vectorizable: 2^n * p(r), relative error ~2e-7.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.f);
  const float n = std::nearbyint(x * 1.44269504f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  int32_t bits;
  std::memcpy(&bits, &p, 4);
  bits += static_cast<int32_t>(n) << 23;
  std::memcpy(&p, &bits, 4);
  return p;
}

// 1 / (1 + exp(-a)), through exp of a non-positive argument so it neither overflows nor calls libm.
inline float sigmoid(float a) {
  const float e = exp_nonpositive(-std::abs(a));
  const float r = 1.f / (1.f + e);
  return a >= 0.f ? r : e * r;
}

}  // namespace camelid
