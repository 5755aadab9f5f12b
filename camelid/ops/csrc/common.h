// What every kernel file needs from ATen: tensors, their factories and at::parallel_for. Deliberately not
// <torch/extension.h>, which costs ~4x the compile time per file; only module.cpp (the Python bindings)
// includes it.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/Half.h>
#include <cstdint>
#include <vector>

namespace camelid {

// a contiguous fp32 CPU tensor, or a one-line error naming the argument
inline void check_f32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), name,
              ": a contiguous fp32 CPU tensor expected");
}

}  // namespace camelid
