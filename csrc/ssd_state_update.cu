// Mamba2 SSD decode step with elastic (group-aware) head widths.
//
// For every active (b, h), with g the group of head h:
//   dt'  = softplus?(dt[b,h] + dt_bias[h]);   dA = exp(dt' * A[h])
//   state[b,h,p,n] = state[b,h,p,n] * dA + dt' * B[b,g,n] * x[b,h,p]
//   y[b,h,p] = sum_n state[b,h,p,n] * C[b,g,n] + D[h(,p)] * x[b,h,p];  y *= silu(z[b,h,p])
// Inactive heads (index within group >= active/ngroups) do no work: y = 0, state untouched.
// One warp per (b, h, p) row, lanes over dstate (coalesced on the contiguous n axis).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "dtype.cuh"
#include "launch.h"

namespace ek {
namespace {

constexpr int kRowsPerBlock = 4;  // warps per block, one headdim row each

template <typename T>
__global__ void ssd_state_update_kernel(SsdStateUpdateArgs a) {
  const int64_t b = blockIdx.z, h = blockIdx.y;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  const int lane = threadIdx.x;
  if (p >= a.headdim) return;
  const int64_t hpg = a.nheads / a.ngroups;
  const int64_t g = a.interleaved ? h % a.ngroups : h / hpg;
  const int64_t j = a.interleaved ? h / a.ngroups : h % hpg;  // index of h within its group
  int64_t active = a.active_heads ? reinterpret_cast<const int64_t*>(a.active_heads)[b]
                                  : a.active_heads_int;
  if (active < 0) active = a.nheads;
  T* y = reinterpret_cast<T*>(a.y) + b * a.s_y[0] + h * a.s_y[1] + p * a.s_y[2];
  if (j >= active / a.ngroups) {  // inactive head: no work
    if (lane == 0) *y = from_f<T>(0.f);
    return;
  }
  float dt = reinterpret_cast<const float*>(a.dt)[b * a.s_dt[0] + h * a.s_dt[1]];
  if (a.dt_bias) dt += reinterpret_cast<const float*>(a.dt_bias)[h];
  if (a.dt_softplus) dt = dt <= 20.f ? log1pf(expf(dt)) : dt;
  const float dA = expf(dt * reinterpret_cast<const float*>(a.A)[h]);
  const float xv = to_f(reinterpret_cast<const T*>(a.x)[b * a.s_x[0] + h * a.s_x[1] + p * a.s_x[2]]);
  const T* Bp = reinterpret_cast<const T*>(a.B) + b * a.s_B[0] + g * a.s_B[1];
  const T* Cp = reinterpret_cast<const T*>(a.C) + b * a.s_C[0] + g * a.s_C[1];
  float* sp = reinterpret_cast<float*>(a.state) + b * a.s_state[0] + h * a.s_state[1] + p * a.s_state[2];
  float acc = 0.f;
  for (int64_t n = lane; n < a.dstate; n += 32) {
    float s = sp[n * a.s_state[3]] * dA + dt * to_f(Bp[n * a.s_B[2]]) * xv;
    sp[n * a.s_state[3]] = s;
    acc += s * to_f(Cp[n * a.s_C[2]]);
  }
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane != 0) return;
  if (a.D) acc += reinterpret_cast<const float*>(a.D)[h * a.s_D[0] + p * a.s_D[1]] * xv;
  if (a.z) {
    const float zv = to_f(reinterpret_cast<const T*>(a.z)[b * a.s_z[0] + h * a.s_z[1] + p * a.s_z[2]]);
    acc *= zv / (1.f + expf(-zv));
  }
  *y = from_f<T>(acc);
}

}  // namespace

std::string ssd_state_update_launch(const SsdStateUpdateArgs& a) {
  if (a.batch == 0 || a.headdim == 0 || a.nheads == 0) return "";
  if (a.ngroups <= 0 || a.nheads % a.ngroups) return "ssd_state_update: nheads must be a multiple of ngroups";
  if (a.batch > 65535 || a.nheads > 65535) return "ssd_state_update: batch and nheads must be <= 65535";
  dim3 block(32, kRowsPerBlock);
  dim3 grid(static_cast<unsigned>((a.headdim + kRowsPerBlock - 1) / kRowsPerBlock),
            static_cast<unsigned>(a.nheads), static_cast<unsigned>(a.batch));
  auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  switch (a.dtype) {
    case kFloat32: ssd_state_update_kernel<float><<<grid, block, 0, stream>>>(a); break;
    case kFloat16: ssd_state_update_kernel<__half><<<grid, block, 0, stream>>>(a); break;
    case kBFloat16: ssd_state_update_kernel<__nv_bfloat16><<<grid, block, 0, stream>>>(a); break;
    default: return "ssd_state_update: unsupported dtype code";
  }
  cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? "" : std::string("ssd_state_update: ") + cudaGetErrorString(err);
}

}  // namespace ek
