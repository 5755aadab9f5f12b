// Matrix-vector products for batch-1 decode on CPU, written so the compiler vectorises them (AVX2 + FMA
// with -O3 -march=native -ffast-math). Decode is memory bound: each kernel streams every weight row once,
// rows split across threads with at::parallel_for. Activations stay fp32; weights may be fp32, int8 with
// one scale per row, or int4 in groups of 32 (Q4_1-like: scale and min per group).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>

static constexpr int64_t GRAIN = 16;  // rows per task: enough work to amortise scheduling

// y[m, n] = sum_k x[m, k] * w[n, k]
torch::Tensor gemv_f32(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && w.dtype() == torch::kFloat32, "fp32 expected");
  x = x.contiguous(); w = w.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>(); const float* wp = w.data_ptr<float>(); float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, GRAIN, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const float* row = wp + n * K;
      for (int64_t m = 0; m < M; ++m) {
        const float* xr = xp + m * K;
        float acc = 0.f;
        for (int64_t k = 0; k < K; ++k) acc += xr[k] * row[k];
        yp[m * N + n] = acc;
      }
    }
  });
  return y;
}

// w: int8 [N, K], scale: fp32 [N]
torch::Tensor gemv_int8(torch::Tensor x, torch::Tensor w, torch::Tensor scale) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && w.dtype() == torch::kInt8, "fp32 x and int8 w expected");
  x = x.contiguous(); w = w.contiguous(); scale = scale.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>(); const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>(); float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, GRAIN, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* row = wp + n * K;
      for (int64_t m = 0; m < M; ++m) {
        const float* xr = xp + m * K;
        float acc = 0.f;
        for (int64_t k = 0; k < K; ++k) acc += xr[k] * (float)row[k];
        yp[m * N + n] = acc * sp[n];
      }
    }
  });
  return y;
}

// w: uint8 [N, K/2]; in each group of 32 weights, byte j holds weight j (low nibble) and j+16 (high nibble).
// scale, minimum: fp32 [N, K/32]; weight = q * scale + minimum.
torch::Tensor gemv_int4(torch::Tensor x, torch::Tensor w, torch::Tensor scale, torch::Tensor minimum) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && w.dtype() == torch::kUInt8, "fp32 x and uint8 w expected");
  x = x.contiguous(); w = w.contiguous(); scale = scale.contiguous(); minimum = minimum.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), G = K / 32;
  TORCH_CHECK(K % 32 == 0, "K must be a multiple of 32");
  auto y = torch::empty({M, N}, x.options());
  // per-group sums of x, so the `minimum` term costs one FMA per group
  auto xsum = x.view({M, G, 32}).sum(-1).contiguous();
  const float* xp = x.data_ptr<float>(); const float* xs = xsum.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>(); const float* sp = scale.data_ptr<float>();
  const float* mp = minimum.data_ptr<float>(); float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, GRAIN, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* row = wp + n * (K / 2);
      for (int64_t m = 0; m < M; ++m) {
        const float* xr = xp + m * K;
        float acc = 0.f;
        for (int64_t g = 0; g < G; ++g) {
          const uint8_t* b = row + g * 16;
          const float* xg = xr + g * 32;
          // unpack to floats first: two simple loops the compiler turns into vector code
          float q[32];
          for (int j = 0; j < 16; ++j) { q[j] = (float)(b[j] & 15); q[j + 16] = (float)(b[j] >> 4); }
          float dot = 0.f;
          for (int j = 0; j < 32; ++j) dot += xg[j] * q[j];
          acc += dot * sp[n * G + g] + mp[n * G + g] * xs[m * G + g];
        }
        yp[m * N + n] = acc;
      }
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv_f32", &gemv_f32);
  m.def("gemv_int8", &gemv_int8);
  m.def("gemv_int4", &gemv_int4);
}
