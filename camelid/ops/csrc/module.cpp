// The Python module: every kernel of kernels.h and the decode step's class. The only file that includes
// <torch/extension.h> (pybind11 and the tensor conversions), since that header dominates the build time.
#include <torch/extension.h>

#include "decode_step.h"
#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv_f32", &gemv_f32);
  m.def("gemv_f16", &gemv_f16);
  m.def("gemv_int8", &gemv_int8);
  m.def("gemv_int4", &gemv_int4);
  namespace py = pybind11;
  // out=None: a fresh tensor; else written in place and returned
  m.def("dequant_f16", &dequant_f16, py::arg("w"), py::arg("out") = py::none());
  m.def("dequant_int8", &dequant_int8, py::arg("w"), py::arg("scale"), py::arg("out") = py::none());
  m.def("dequant_int4", &dequant_int4, py::arg("w"), py::arg("scale"), py::arg("minimum"), py::arg("out") = py::none());
  m.def("dequant_q8_0", &dequant_q8_0, py::arg("blocks"), py::arg("K"), py::arg("out") = py::none());
  m.def("rms_norm", &rms_norm);
  m.def("rms_norm_forward", &rms_norm_forward);
  m.def("rms_norm_backward", &rms_norm_backward);
  m.def("rope", &rope);
  m.def("swiglu_forward", &swiglu_forward);
  m.def("swiglu_backward_", &swiglu_backward_);
  m.def("causal_attention_available", &causal_attention_available);
  m.def("causal_attention_forward", &causal_attention_forward);
  m.def("causal_attention_backward", &causal_attention_backward);
  m.def("attend_cached", &attend_cached);
  m.def("prompt_attention", &prompt_attention, py::call_guard<py::gil_scoped_release>());
  m.def("cross_entropy_grad_", &cross_entropy_grad_);
  m.def("gemv_q8", &gemv_q8);
  m.def("gemm_q8", &gemm_q8);
  py::class_<DecodeStep>(m, "DecodeStep")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, double, bool>())
      .def("set_embedding", &DecodeStep::set_embedding)
      .def("add_layer", &DecodeStep::add_layer)
      .def("set_head", &DecodeStep::set_head)
      .def("set_greedy_head", &DecodeStep::set_greedy_head)
      .def("forward_argmax", &DecodeStep::forward_argmax, py::call_guard<py::gil_scoped_release>())
      .def("head_argmax", &DecodeStep::head_argmax, py::call_guard<py::gil_scoped_release>())
      .def("interleave", &DecodeStep::interleave)
      .def("bind_cache", &DecodeStep::bind_cache)
      .def("forward", &DecodeStep::forward, py::call_guard<py::gil_scoped_release>())
      .def("forward_rows", &DecodeStep::forward_rows, py::arg("tokens"), py::arg("positions"), py::arg("rows"),
           py::arg("sources") = std::vector<int64_t>{}, py::arg("shared") = std::vector<int64_t>{},
           py::call_guard<py::gil_scoped_release>());
  // which instruction paths this build compiled in (`camelid info --kernels`)
  m.def("isa", []() {
    std::string s;
#ifdef CAMELID_AVX2
    s += "avx2";
#endif
#ifdef CAMELID_VNNI
    s += "+vnni";
#endif
#ifdef CAMELID_AVX512_Q8
    s += "+avx512-q8";
#endif
    return s.empty() ? std::string("generic") : s;
  });
}
