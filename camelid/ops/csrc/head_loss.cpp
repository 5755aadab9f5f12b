// The softmax cross-entropy of one chunk of logits and its gradient, in place (camelid/ops/head_loss.py's fused
// output head + loss calls it chunk by chunk and holds the reference).
#include "kernels.h"
#include "vecmath.h"
#include <omp.h>
#include <algorithm>
#include <cmath>

using camelid::check_f32;

// In place: logits [n, V] become softmax(logits) - onehot(targets) (the gradient of the summed cross-entropy);
// returns each row's loss, logsumexp(logits) - logits[target]. Rows in parallel, each in cache: three passes over
// a row where eager PyTorch makes six over the whole chunk.
at::Tensor cross_entropy_grad_(at::Tensor logits, at::Tensor targets) {
  check_f32(logits, "logits");
  TORCH_CHECK(logits.dim() == 2 && targets.scalar_type() == at::kLong && targets.is_contiguous() &&
                  targets.numel() == logits.size(0), "logits [n, V] and int64 targets [n] expected");
  const int64_t n = logits.size(0), V = logits.size(1);
  auto loss = at::empty({n}, logits.options());
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
