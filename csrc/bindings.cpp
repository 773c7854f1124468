// pybind11 bindings of elastic_kernels._C. Host code only: CUDA launchers are declared in
// launch.h and compiled from the .cu files when nvcc is available (EK_WITH_CUDA).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>

#include "launch.h"

namespace py = pybind11;

namespace {
void raise_if(const std::string& err) {
  if (!err.empty()) throw std::runtime_error(err);
}
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "elastic_kernels CUDA kernels (host launchers taking raw pointers and a stream)";
#ifdef EK_WITH_CUDA
  m.attr("built_with_cuda") = true;
  py::class_<ek::SsdStateUpdateArgs>(m, "SsdStateUpdateArgs")
      .def(py::init<>())
#define EK_RW(f) .def_readwrite(#f, &ek::SsdStateUpdateArgs::f)
      EK_RW(state) EK_RW(x) EK_RW(dt) EK_RW(A) EK_RW(B) EK_RW(C) EK_RW(D) EK_RW(z)
      EK_RW(dt_bias) EK_RW(active_heads) EK_RW(y) EK_RW(batch) EK_RW(nheads) EK_RW(headdim)
      EK_RW(dstate) EK_RW(ngroups) EK_RW(dtype) EK_RW(interleaved) EK_RW(dt_softplus)
      EK_RW(active_heads_int) EK_RW(stream)
#undef EK_RW
#define EK_ARR(f, n)                                                               \
  .def_property(                                                                  \
      #f, [](const ek::SsdStateUpdateArgs& a) { return std::vector<int64_t>(a.f, a.f + n); }, \
      [](ek::SsdStateUpdateArgs& a, const std::vector<int64_t>& v) {              \
        if (v.size() != n) throw std::invalid_argument(#f " needs " #n " strides"); \
        for (size_t i = 0; i < n; ++i) a.f[i] = v[i];                             \
      })
      EK_ARR(s_state, 4) EK_ARR(s_x, 3) EK_ARR(s_dt, 2) EK_ARR(s_B, 3) EK_ARR(s_C, 3)
      EK_ARR(s_z, 3) EK_ARR(s_y, 3) EK_ARR(s_D, 2);
#undef EK_ARR
  m.def("ssd_state_update", [](const ek::SsdStateUpdateArgs& a) {
    raise_if(ek::ssd_state_update_launch(a));
  });
  py::class_<ek::Nvfp4QuantizeArgs>(m, "Nvfp4QuantizeArgs")
      .def(py::init<>())
#define EK_RW(f) .def_readwrite(#f, &ek::Nvfp4QuantizeArgs::f)
      EK_RW(x) EK_RW(g) EK_RW(data) EK_RW(scales) EK_RW(out) EK_RW(rows) EK_RW(cols)
      EK_RW(rows_per_g) EK_RW(s_x) EK_RW(s_data) EK_RW(s_scales) EK_RW(s_out) EK_RW(dtype)
      EK_RW(mode) EK_RW(stream);
#undef EK_RW
  m.def("nvfp4_quantize", [](const ek::Nvfp4QuantizeArgs& a) { raise_if(ek::nvfp4_quantize_launch(a)); });
  py::class_<ek::Nvfp4LinearArgs>(m, "Nvfp4LinearArgs")
      .def(py::init<>())
#define EK_RW(f) .def_readwrite(#f, &ek::Nvfp4LinearArgs::f)
      EK_RW(x) EK_RW(data) EK_RW(scales) EK_RW(g) EK_RW(gx) EK_RW(bias) EK_RW(y) EK_RW(M) EK_RW(N)
      EK_RW(K) EK_RW(s_x) EK_RW(s_data) EK_RW(s_scales) EK_RW(s_y) EK_RW(workspace)
      EK_RW(workspace_floats) EK_RW(dtype) EK_RW(stream);
#undef EK_RW
  m.def("nvfp4_linear", [](const ek::Nvfp4LinearArgs& a) { raise_if(ek::nvfp4_linear_launch(a)); });
#else
  m.attr("built_with_cuda") = false;
#endif
}
