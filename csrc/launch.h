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

// NVFP4 quantize (csrc/nvfp4.cu). x: (rows, cols) fp32/fp16/bf16 with row stride s_x (last
// stride 1), cols % 16 == 0; g: fp32 decode scales, row r uses g[r / rows_per_g].
// mode 0: data (rows, cols/2) uint8 + scales (rows, cols/16) e4m3 bytes; mode 1: out = the
// fake-quantized values; mode 2: out = the exact e2m1 * s (out has x's dtype and shape).
struct Nvfp4QuantizeArgs {
  uintptr_t x = 0, g = 0, data = 0, scales = 0, out = 0;
  int64_t rows = 0, cols = 0, rows_per_g = 1, s_x = 0, s_data = 0, s_scales = 0, s_out = 0;
  int dtype = 0, mode = 0;
  uintptr_t stream = 0;
};
std::string nvfp4_quantize_launch(const Nvfp4QuantizeArgs& a);

// NVFP4 W4A16 GEMM: y (M, N) = ((x (M, K) @ (e2m1 * s)^T) * g [* gx]) + bias, x/y fp16 or bf16,
// data (N, K/2) uint8 and scales (N, K/16) e4m3 bytes with row strides s_data, s_scales; g, gx
// fp32 scalars (gx optional), bias fp32 (N,) optional. workspace: fp32 scratch of
// workspace_floats elements for split-K partial sums when M <= 16 (0: no split).
struct Nvfp4LinearArgs {
  uintptr_t x = 0, data = 0, scales = 0, g = 0, gx = 0, bias = 0, y = 0, workspace = 0;
  int64_t M = 0, N = 0, K = 0, s_x = 0, s_data = 0, s_scales = 0, s_y = 0, workspace_floats = 0;
  int dtype = 0;
  uintptr_t stream = 0;
};
std::string nvfp4_linear_launch(const Nvfp4LinearArgs& a);
#endif

}  // namespace ek
