// Every kernel the Python side calls, by file: module.cpp binds them (camelid/ops/native.py builds and loads the
// extension; each camelid/ops/<op>.py calls its own).
#pragma once
#include "common.h"

// linear.cpp: GEMV for a few rows of activations, and whole-matrix dequantisation
at::Tensor gemv_f32(at::Tensor x, at::Tensor w);
at::Tensor gemv_f16(at::Tensor x, at::Tensor w);
at::Tensor gemv_int8(at::Tensor x, at::Tensor w, at::Tensor scale);
at::Tensor gemv_int4(at::Tensor x, at::Tensor w, at::Tensor scale, at::Tensor minimum);
at::Tensor dequant_f16(at::Tensor w, std::optional<at::Tensor> out);
at::Tensor dequant_int8(at::Tensor w, at::Tensor scale, std::optional<at::Tensor> out);
at::Tensor dequant_int4(at::Tensor w, at::Tensor scale, at::Tensor minimum, std::optional<at::Tensor> out);
at::Tensor dequant_q8_0(at::Tensor blocks, int64_t K, std::optional<at::Tensor> out);

// rmsnorm.cpp
at::Tensor rms_norm(at::Tensor x, at::Tensor w, double eps);
std::vector<at::Tensor> rms_norm_forward(at::Tensor x, at::Tensor weight, double eps);
std::vector<at::Tensor> rms_norm_backward(at::Tensor dy, at::Tensor x, at::Tensor weight, at::Tensor rstd);

// rope.cpp
at::Tensor rope(at::Tensor x, at::Tensor cos, at::Tensor sin, double sign);

// swiglu.cpp
at::Tensor swiglu_forward(at::Tensor gate, at::Tensor up);
void swiglu_backward_(at::Tensor dh, at::Tensor gate, at::Tensor up);

// attention.cpp: training (causal, with backward) and decode (a few new tokens against the KV cache)
bool causal_attention_available();
std::vector<at::Tensor> causal_attention_forward(at::Tensor q, at::Tensor k, at::Tensor v, double scale);
std::vector<at::Tensor> causal_attention_backward(at::Tensor grad_o, at::Tensor q, at::Tensor k, at::Tensor v,
                                                  at::Tensor o, at::Tensor lse, double scale);
at::Tensor attend_cached(at::Tensor qkv, at::Tensor cos, at::Tensor sin, at::Tensor positions, at::Tensor cache_k,
                         at::Tensor cache_v, at::Tensor mask, int64_t H, int64_t KV);
// a prompt's attention, inference only: q [B, H, T, d], k and v [B, KV, S, d], mask [1 or B, T, S] -> [B, T, H, d]
at::Tensor prompt_attention(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor mask, int64_t block);

// head_loss.cpp
at::Tensor cross_entropy_grad_(at::Tensor logits, at::Tensor targets);
