// Shared declarations for the host launchers of elastic_kernels._C.
//
// Every launcher takes raw device pointers (as uintptr_t), sizes, element strides and a
// cudaStream_t handle, so the module needs no libtorch. Errors are reported by returning a
// non-empty message, which the bindings turn into a Python RuntimeError.
#pragma once
#include <cstdint>
#include <string>

namespace ek {

// dtype codes shared with Python (elastic_kernels/_ext.py).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

#ifdef EK_WITH_CUDA
struct SsdStateUpdateArgs {
  // state: (batch, nheads, headdim, dstate) fp32, updated in place.
  uintptr_t state, x, dt, A, B, C, D, z, dt_bias, active_heads, y;
  int64_t batch, nheads, headdim, dstate, ngroups;
  int64_t s_state[4], s_x[3], s_dt[2], s_B[3], s_C[3], s_z[3], s_y[3], s_D[2];
  int dtype;               // dtype of x, B, C, z, y (dt, A, D, dt_bias are fp32)
  int interleaved;         // head layout: 0 blocked, 1 interleaved
  int dt_softplus;
  int64_t active_heads_int;  // used when active_heads == 0; -1 means all heads
  uintptr_t stream;
};
std::string ssd_state_update_launch(const SsdStateUpdateArgs& a);
#endif

}  // namespace ek
