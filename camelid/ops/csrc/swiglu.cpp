// SwiGLU's elementwise part, silu(gate) * up, forward and backward, one pass over memory each (the training
// step's memory-bound share; inductor fuses it only under torch.compile). camelid/ops/swiglu.py holds the
// reference.
#include "kernels.h"
#include "vecmath.h"
#include <omp.h>
#include <algorithm>
#include <cmath>

using camelid::check_f32;

// silu(gate) * up, elementwise.
at::Tensor swiglu_forward(at::Tensor gate, at::Tensor up) {
  check_f32(gate, "gate"), check_f32(up, "up");
  TORCH_CHECK(gate.sizes() == up.sizes(), "gate and up shapes differ");
  auto h = at::empty_like(gate);
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
void swiglu_backward_(at::Tensor dh, at::Tensor gate, at::Tensor up) {
  check_f32(dh, "dh"), check_f32(gate, "gate"), check_f32(up, "up");
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
