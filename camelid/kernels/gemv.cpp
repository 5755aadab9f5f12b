// Matrix-vector products for batch-1 decode on CPU. Decode is memory bound: each kernel streams every
// weight row once, rows split across threads with at::parallel_for. Activations stay fp32; weights may be
// fp32, int8 with one scale per row, or int4 in groups of 32 (Q4_1's layout: fp16 scale and min per group).
// The inner loops live in dot.h (shared with step.cpp).
#include "dot.h"
#include <ATen/Parallel.h>

static constexpr int64_t GRAIN = 32;  // rows per task: enough work to amortise scheduling

#ifdef CAMELID_AVX2
// A few activation rows at once (speculative verification, small batches): each weight vector is loaded
// once and multiplied into M accumulators, so the weights are streamed once, not M times.
template <int M>
static void dot_f32_rows(const float* x, const float* w, int64_t K, int64_t N, int64_t n0, int64_t n1, float* y) {
  for (int64_t n = n0; n < n1; ++n) {
    const float* row = w + n * K;
    __m256 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) {
      const __m256 wv = _mm256_loadu_ps(row + k);
      for (int m = 0; m < M; ++m) acc[m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k), acc[m]);
    }
    for (int m = 0; m < M; ++m) y[m * N + n] = hsum(acc[m]);
  }
}

static bool dot_f32_multi(int64_t M, const float* x, const float* w, int64_t K, int64_t N, int64_t n0, int64_t n1,
                          float* y) {
  if (K % 8) return false;
  switch (M) {
    case 2: dot_f32_rows<2>(x, w, K, N, n0, n1, y); return true;
    case 3: dot_f32_rows<3>(x, w, K, N, n0, n1, y); return true;
    case 4: dot_f32_rows<4>(x, w, K, N, n0, n1, y); return true;
    case 5: dot_f32_rows<5>(x, w, K, N, n0, n1, y); return true;
    case 6: dot_f32_rows<6>(x, w, K, N, n0, n1, y); return true;
    case 7: dot_f32_rows<7>(x, w, K, N, n0, n1, y); return true;
    case 8: dot_f32_rows<8>(x, w, K, N, n0, n1, y); return true;
    default: return false;
  }
}
#endif

torch::Tensor gemv_f32(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && w.dtype() == torch::kFloat32, "fp32 expected");
  x = x.contiguous(); w = w.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>(); const float* wp = w.data_ptr<float>(); float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, GRAIN, [&](int64_t n0, int64_t n1) {
#ifdef CAMELID_AVX2
    if (M > 1 && dot_f32_multi(M, xp, wp, K, N, n0, n1, yp)) return;
#endif
    for (int64_t m = 0; m < M; ++m) dot_f32(xp + m * K, wp, K, n0, n1, yp + m * N);
  });
  return y;
}

torch::Tensor gemv_int8(torch::Tensor x, torch::Tensor w, torch::Tensor scale) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && w.dtype() == torch::kInt8, "fp32 x and int8 w expected");
  x = x.contiguous(); w = w.contiguous(); scale = scale.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>(); const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>(); float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, GRAIN, [&](int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < M; ++m) dot_int8(xp + m * K, wp, sp, K, n0, n1, yp + m * N);
  });
  return y;
}

torch::Tensor gemv_int4(torch::Tensor x, torch::Tensor w, torch::Tensor scale, torch::Tensor minimum) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && w.dtype() == torch::kUInt8, "fp32 x and uint8 w expected");
  TORCH_CHECK(scale.dtype() == torch::kHalf && minimum.dtype() == torch::kHalf, "fp16 scale and minimum expected");
  x = x.contiguous(); w = w.contiguous(); scale = scale.contiguous(); minimum = minimum.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), G = K / 32;
  TORCH_CHECK(K % 32 == 0, "K must be a multiple of 32");
  auto y = torch::empty({M, N}, x.options());
  auto xsum = x.view({M, G, 32}).sum(-1).contiguous();
  const float* xp = x.data_ptr<float>(); const float* xs = xsum.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>(); const at::Half* sp = scale.data_ptr<at::Half>();
  const at::Half* mp = minimum.data_ptr<at::Half>(); float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, GRAIN, [&](int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < M; ++m) dot_int4(xp + m * K, xs + m * G, wp, sp, mp, K, n0, n1, yp + m * N);
  });
  return y;
}

// Whole-matrix dequantisation for prompt passes (then torch's GEMM): one parallel pass instead of ~8 tensor ops.
torch::Tensor dequant_int8(torch::Tensor w, torch::Tensor scale) {
  w = w.contiguous(); scale = scale.contiguous();
  const int64_t N = w.size(0), K = w.size(1);
  auto out = torch::empty({N, K}, scale.options());
  const int8_t* wp = w.data_ptr<int8_t>(); const float* sp = scale.data_ptr<float>(); float* op = out.data_ptr<float>();
  at::parallel_for(0, N, GRAIN, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t k = 0; k < K; ++k) op[n * K + k] = (float)wp[n * K + k] * sp[n];
  });
  return out;
}

torch::Tensor dequant_int4(torch::Tensor w, torch::Tensor scale, torch::Tensor minimum) {
  TORCH_CHECK(scale.dtype() == torch::kHalf && minimum.dtype() == torch::kHalf, "fp16 scale and minimum expected");
  w = w.contiguous(); scale = scale.contiguous(); minimum = minimum.contiguous();
  const int64_t N = w.size(0), K = w.size(1) * 2, G = K / 32;
  auto out = torch::empty({N, K}, scale.options().dtype(torch::kFloat32));
  const uint8_t* wp = w.data_ptr<uint8_t>(); const at::Half* sp = scale.data_ptr<at::Half>();
  const at::Half* mp = minimum.data_ptr<at::Half>(); float* op = out.data_ptr<float>();
  at::parallel_for(0, N, GRAIN, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t g = 0; g < G; ++g) {
        const uint8_t* b = wp + n * (K / 2) + g * 16;
        float* o = op + n * K + g * 32;
        const float s = h2f(sp[n * G + g]), m = h2f(mp[n * G + g]);
        for (int j = 0; j < 16; ++j) { o[j] = (float)(b[j] & 15) * s + m; o[j + 16] = (float)(b[j] >> 4) * s + m; }
      }
  });
  return out;
}

// decode.cpp
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps);
torch::Tensor attend_cached(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor positions,
                            torch::Tensor cache_k, torch::Tensor cache_v, torch::Tensor mask, int64_t H,
                            int64_t KV);
// step.cpp
void register_step(pybind11::module& m);
bool causal_attention_available();
std::vector<torch::Tensor> rms_norm_forward(torch::Tensor x, torch::Tensor weight, double eps);
std::vector<torch::Tensor> rms_norm_backward(torch::Tensor dy, torch::Tensor x, torch::Tensor weight,
                                             torch::Tensor rstd);
torch::Tensor swiglu_forward(torch::Tensor gate, torch::Tensor up);
void swiglu_backward_(torch::Tensor dh, torch::Tensor gate, torch::Tensor up);
torch::Tensor rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, double sign);
torch::Tensor cross_entropy_grad_(torch::Tensor logits, torch::Tensor targets);
std::vector<torch::Tensor> causal_attention_forward(torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale);
std::vector<torch::Tensor> causal_attention_backward(torch::Tensor grad_o, torch::Tensor q, torch::Tensor k,
                                                     torch::Tensor v, torch::Tensor o, torch::Tensor lse,
                                                     double scale);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dequant_int8", &dequant_int8);
  m.def("dequant_int4", &dequant_int4);
  m.def("rms_norm", &rms_norm);
  m.def("attend_cached", &attend_cached);
  m.def("gemv_f32", &gemv_f32);
  m.def("gemv_int8", &gemv_int8);
  m.def("gemv_int4", &gemv_int4);
  register_step(m);
  m.def("causal_attention_available", &causal_attention_available);
  m.def("causal_attention_forward", &causal_attention_forward);
  m.def("causal_attention_backward", &causal_attention_backward);
  m.def("rms_norm_forward", &rms_norm_forward);
  m.def("rms_norm_backward", &rms_norm_backward);
  m.def("swiglu_forward", &swiglu_forward);
  m.def("swiglu_backward_", &swiglu_backward_);
  m.def("rope", &rope);
  m.def("cross_entropy_grad_", &cross_entropy_grad_);
}
