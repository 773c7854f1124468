// NVFP4 (docs/design.md §5): quantize and the W4A16 tensor-core GEMM.
//
// Quantize, one thread per block of 16 elements along K, every step an IEEE fp32 operation in
// the recipe's order (bit-identical to elastic_kernels/reference/nvfp4.py):
//   s = e4m3_rne(clamp((block_amax / 6) / g, 2^-6, 448));  r = (1 / g) / s
//   code = e2m1_rne(clamp(x * r, -6, 6))          (bit 3 = sign, kept when rounding to 0: -0 = 8)
// A block holding a NaN or Inf (or a NaN g) gets a NaN scale (byte 0x7F: e4m3 has no Inf) and
// codes 0, so it decodes to NaN, as the reference does (docs/design.md §5).
// mode 0 writes packed codes (element 2i in the low nibble) and the scale byte; mode 1 writes the
// fake-quantized value e2m1 * s * g; mode 2 writes the exact e2m1 * s (W4A4 activations).
//
// GEMM: y = ((x @ (e2m1 * s_w)^T) * g_w) [* g_x] + bias, x (M, K) bf16/fp16, W packed (N, K/2).
// Per K tile (BK = 64) the CTA stages x in shared memory, unpacks the weight tile and multiplies
// its block scales (e2m1 * s is exact in bf16/fp16) into shared memory, then each warp runs
// mma.sync.m16n8k16 with fp32 accumulators; g (and g_x) are applied once in the epilogue.
// Backward (in PyTorch): dx = (dy @ (e2m1 * s_w)) * g_w.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "dtype.cuh"
#include "launch.h"

namespace ek {
namespace {

__device__ __forceinline__ float e2m1_value(uint32_t code) {
  // magnitudes of codes 0..7 times 4: 0 2 4 6 8 12 16 24
  const uint32_t mag = code & 7u, e = mag >> 1;
  const uint32_t sig = (e > 0 ? 2u : 0u) + (mag & 1u);
  const float v = static_cast<float>(sig << (e > 1 ? e : 1u)) * 0.25f;
  return (code & 8u) ? -v : v;
}

__device__ __forceinline__ float e4m3_value(uint32_t b) {
  const uint32_t e = (b >> 3) & 15u, m = b & 7u;
  const float v = static_cast<float>(e == 0 ? m : (8u + m) << (e - 1)) * 0.001953125f;  // 2^-9
  return (b & 128u) ? -v : v;
}

__device__ __forceinline__ uint32_t e2m1_code(float u) {
  const float a = fabsf(u);
  const uint32_t mag = (a > 0.25f) + (a >= 0.75f) + (a > 1.25f) + (a >= 1.75f) + (a > 2.5f) +
                       (a >= 3.5f) + (a > 5.0f);
  return mag | ((signbit(u) && !isnan(u)) ? 8u : 0u);  // -0 keeps its sign, as cvt.rn.satfinite.e2m1x2
}

// ---------------------------------------------------------------------------------------------
// quantize
// ---------------------------------------------------------------------------------------------

template <typename T, bool VEC>
__device__ __forceinline__ void load16(const T* p, float* v) {
  if constexpr (VEC) {
    constexpr int kPer = 16 / sizeof(T);  // elements per 16-byte load
#pragma unroll
    for (int c = 0; c < 16 / kPer; ++c) {
      const uint4 raw = reinterpret_cast<const uint4*>(p)[c];
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < kPer; ++i) v[c * kPer + i] = to_f(e[i]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < 16; ++i) v[i] = to_f(p[i]);
  }
}

template <typename T, bool VEC>
__device__ __forceinline__ void store16(T* p, const float* v) {
  if constexpr (VEC) {
    constexpr int kPer = 16 / sizeof(T);
#pragma unroll
    for (int c = 0; c < 16 / kPer; ++c) {
      uint4 raw;
      T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int i = 0; i < kPer; ++i) e[i] = from_f<T>(v[c * kPer + i]);
      reinterpret_cast<uint4*>(p)[c] = raw;
    }
  } else {
#pragma unroll
    for (int i = 0; i < 16; ++i) p[i] = from_f<T>(v[i]);
  }
}

template <typename T, bool VEC>
__global__ void nvfp4_quantize_kernel(Nvfp4QuantizeArgs a) {
  const int64_t nb = a.cols / 16;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= a.rows * nb) return;
  const int64_t row = t / nb, blk = t % nb;
  float v[16];
  load16<T, VEC>(reinterpret_cast<const T*>(a.x) + row * a.s_x + blk * 16, v);
  float amax = 0.f;
  bool bad = false;  // a NaN/Inf element: fmaxf would drop a NaN
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    amax = fmaxf(amax, fabsf(v[i]));
    bad = bad || !isfinite(v[i]);
  }
  const float g = reinterpret_cast<const float*>(a.g)[row / a.rows_per_g];
  float sf = __fdiv_rn(__fdiv_rn(amax, 6.0f), g);
  bad = bad || isnan(sf);
  sf = fminf(fmaxf(sf, 0.015625f), 448.0f);
  uint32_t bits = __float_as_uint(sf);
  bits = (bits + 0x7FFFFu + ((bits >> 20) & 1u)) & 0xFFF00000u;  // e4m3: 3 mantissa bits, RNE
  const float sq = bad ? __uint_as_float(0x7FC00000u) : __uint_as_float(bits);
  const float r = __fdiv_rn(__fdiv_rn(1.0f, g), sq);
  uint32_t code[16];
#pragma unroll
  for (int i = 0; i < 16; ++i) code[i] = bad ? 0u : e2m1_code(fminf(fmaxf(__fmul_rn(v[i], r), -6.0f), 6.0f));
  if (a.mode == 0) {
    uint2 packed;
    uint32_t* w = reinterpret_cast<uint32_t*>(&packed);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint32_t word = 0;
#pragma unroll
      for (int i = 0; i < 4; ++i) word |= (code[h * 8 + 2 * i] | (code[h * 8 + 2 * i + 1] << 4)) << (8 * i);
      w[h] = word;
    }
    *reinterpret_cast<uint2*>(reinterpret_cast<uint8_t*>(a.data) + row * a.s_data + blk * 8) = packed;
    const uint32_t sbyte = bad ? 0x7Fu : ((((bits >> 23) & 255u) - 120u) << 3) | ((bits >> 20) & 7u);
    reinterpret_cast<uint8_t*>(a.scales)[row * a.s_scales + blk] = static_cast<uint8_t>(sbyte);
  } else {
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      v[i] = __fmul_rn(e2m1_value(code[i]), sq);
      if (a.mode == 1) v[i] = __fmul_rn(v[i], g);
    }
    store16<T, VEC>(reinterpret_cast<T*>(a.out) + row * a.s_out + blk * 16, v);
  }
}

template <typename T>
void launch_quantize(const Nvfp4QuantizeArgs& a, bool vec, cudaStream_t stream) {
  const int64_t n = a.rows * (a.cols / 16);
  const int threads = 256;
  const dim3 grid(static_cast<unsigned>((n + threads - 1) / threads));
  if (vec) nvfp4_quantize_kernel<T, true><<<grid, threads, 0, stream>>>(a);
  else nvfp4_quantize_kernel<T, false><<<grid, threads, 0, stream>>>(a);
}

// ---------------------------------------------------------------------------------------------
// W4A16 GEMM
// ---------------------------------------------------------------------------------------------

constexpr int kBN = 64, kBK = 64, kPad = 8, kThreads = 128;  // 4 warps side by side along N

template <typename T> struct Mma;
template <> struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float* c, const uint32_t* a, const uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};
template <> struct Mma<__half> {
  static __device__ __forceinline__ void run(float* c, const uint32_t* a, const uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

// MT m16 tiles per warp (BM = 16 * MT); each warp owns 16 columns (two n8 tiles) of the BN tile.
// Split-K (decode, few CTAs): CTA z covers K tiles [z * k_chunk, (z + 1) * k_chunk) and writes its
// raw fp32 partial sums to part[z][m][n]; nvfp4_splitk_reduce_kernel sums them in a fixed order
// (deterministic) and applies the epilogue. k_chunk == K means no split (epilogue in place).
template <typename T, int MT>
__global__ void __launch_bounds__(kThreads) nvfp4_linear_kernel(Nvfp4LinearArgs a, int64_t k_chunk) {
  constexpr int BM = 16 * MT;
  __shared__ __align__(16) T xs[BM][kBK + kPad];
  __shared__ __align__(16) T ws[kBN][kBK + kPad];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int gid = lane >> 2, tig = lane & 3;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kBN;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * BM;
  const T* x = reinterpret_cast<const T*>(a.x);
  const uint8_t* wd = reinterpret_cast<const uint8_t*>(a.data);
  const uint8_t* sc = reinterpret_cast<const uint8_t*>(a.scales);

  float acc[MT][2][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.f;

  const int64_t k_begin = static_cast<int64_t>(blockIdx.z) * k_chunk;
  const int64_t k_end = k_begin + k_chunk < a.K ? k_begin + k_chunk : a.K;
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kBK) {
    // x tile: BM x BK in 16-byte chunks of 8 elements (K % 16 == 0: a chunk is all in or all out)
    for (int c = tid; c < BM * (kBK / 8); c += kThreads) {
      const int r = c / (kBK / 8), kc = (c % (kBK / 8)) * 8;
      const int64_t gm = m0 + r, gk = k0 + kc;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (gm < a.M && gk < k_end) v = *reinterpret_cast<const uint4*>(x + gm * a.s_x + gk);
      *reinterpret_cast<uint4*>(&xs[r][kc]) = v;
    }
    // weight tile: BN rows x (BK / 16) scale blocks; each block = 8 packed bytes + 1 scale byte
    for (int c = tid; c < kBN * (kBK / 16); c += kThreads) {
      const int r = c / (kBK / 16), j = c % (kBK / 16);
      const int64_t gn = n0 + r, gk = k0 + j * 16;
      uint4 out[2] = {make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0)};
      if (gn < a.N && gk < k_end) {
        const uint2 p = *reinterpret_cast<const uint2*>(wd + gn * a.s_data + gk / 2);
        const float s = e4m3_value(sc[gn * a.s_scales + gk / 16]);
        T* o = reinterpret_cast<T*>(out);
        const uint32_t words[2] = {p.x, p.y};
#pragma unroll
        for (int i = 0; i < 16; ++i) {
          const uint32_t code = (words[i >> 3] >> (4 * (i & 7))) & 15u;
          o[i] = from_f<T>(e2m1_value(code) * s);  // exact
        }
      }
      *reinterpret_cast<uint4*>(&ws[r][j * 16]) = out[0];
      *reinterpret_cast<uint4*>(&ws[r][j * 16 + 8]) = out[1];
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      uint32_t bf[2][2];
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int n = warp * 16 + j * 8 + gid;
        bf[j][0] = *reinterpret_cast<const uint32_t*>(&ws[n][kk + tig * 2]);
        bf[j][1] = *reinterpret_cast<const uint32_t*>(&ws[n][kk + tig * 2 + 8]);
      }
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        const int m = i * 16 + gid;
        uint32_t af[4];
        af[0] = *reinterpret_cast<const uint32_t*>(&xs[m][kk + tig * 2]);
        af[1] = *reinterpret_cast<const uint32_t*>(&xs[m + 8][kk + tig * 2]);
        af[2] = *reinterpret_cast<const uint32_t*>(&xs[m][kk + tig * 2 + 8]);
        af[3] = *reinterpret_cast<const uint32_t*>(&xs[m + 8][kk + tig * 2 + 8]);
#pragma unroll
        for (int j = 0; j < 2; ++j) Mma<T>::run(acc[i][j], af, bf[j]);
      }
    }
    __syncthreads();
  }

  const float g = *reinterpret_cast<const float*>(a.g);
  const float gx = a.gx ? *reinterpret_cast<const float*>(a.gx) : 1.f;
  const float* bias = reinterpret_cast<const float*>(a.bias);
  T* y = reinterpret_cast<T*>(a.y);
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int64_t gm = m0 + i * 16 + gid + (c >= 2 ? 8 : 0);
        const int64_t gn = n0 + warp * 16 + j * 8 + tig * 2 + (c & 1);
        if (gm < a.M && gn < a.N) {
          if (k_chunk < a.K) {  // split-K partial: raw sums, epilogue in the reduce kernel
            reinterpret_cast<float*>(a.workspace)[(blockIdx.z * a.M + gm) * a.N + gn] = acc[i][j][c];
            continue;
          }
          float v = acc[i][j][c] * g;
          if (a.gx) v = v * gx;
          if (bias) v = v + bias[gn];
          y[gm * a.s_y + gn] = from_f<T>(v);
        }
      }
}

template <typename T>
__global__ void nvfp4_splitk_reduce_kernel(Nvfp4LinearArgs a, int splits) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= a.M * a.N) return;
  const int64_t m = t / a.N, n = t % a.N;
  const float* part = reinterpret_cast<const float*>(a.workspace);
  float acc = 0.f;
  for (int z = 0; z < splits; ++z) acc += part[z * a.M * a.N + t];
  float v = acc * *reinterpret_cast<const float*>(a.g);
  if (a.gx) v = v * *reinterpret_cast<const float*>(a.gx);
  if (a.bias) v = v + reinterpret_cast<const float*>(a.bias)[n];
  reinterpret_cast<T*>(a.y)[m * a.s_y + n] = from_f<T>(v);
}

int sm_count() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
    return 1;
  }
  return sms;
}

template <typename T>
void launch_linear(const Nvfp4LinearArgs& a, cudaStream_t stream) {
  const unsigned gx = static_cast<unsigned>((a.N + kBN - 1) / kBN);
  if (a.M <= 16) {
    // Few CTAs (decode): split K so that about two CTAs per SM stream the weights.
    const int64_t ctas = static_cast<int64_t>(gx) * ((a.M + 15) / 16);
    const int64_t tiles = (a.K + kBK - 1) / kBK;
    int64_t splits = (2 * sm_count() + ctas - 1) / ctas;
    if (splits > tiles) splits = tiles;
    if (a.M * a.N > 0 && splits > a.workspace_floats / (a.M * a.N)) splits = a.workspace_floats / (a.M * a.N);
    if (splits > 65535) splits = 65535;
    if (splits < 1) splits = 1;
    const int64_t k_chunk = splits > 1 ? ((tiles + splits - 1) / splits) * kBK : a.K;
    if (splits > 1) splits = (a.K + k_chunk - 1) / k_chunk;  // no empty split
    const dim3 grid(gx, static_cast<unsigned>((a.M + 15) / 16), static_cast<unsigned>(splits));
    nvfp4_linear_kernel<T, 1><<<grid, kThreads, 0, stream>>>(a, splits > 1 ? k_chunk : a.K);
    if (splits > 1) {
      const int64_t n = a.M * a.N;
      nvfp4_splitk_reduce_kernel<T><<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(
          a, static_cast<int>(splits));
    }
  } else {
    const dim3 grid(gx, static_cast<unsigned>((a.M + 63) / 64));
    nvfp4_linear_kernel<T, 4><<<grid, kThreads, 0, stream>>>(a, a.K);
  }
}

}  // namespace

std::string nvfp4_quantize_launch(const Nvfp4QuantizeArgs& a) {
  if (a.cols % 16) return "nvfp4_quantize: cols must be a multiple of 16";
  if (a.rows <= 0 || a.cols == 0) return "";
  if (a.rows_per_g <= 0) return "nvfp4_quantize: rows_per_g must be positive";
  if ((a.rows * (a.cols / 16) + 255) / 256 > 0x7FFFFFFF) return "nvfp4_quantize: tensor too large";
  if (a.mode == 0) {
    if (!a.data || !a.scales) return "nvfp4_quantize: mode 0 needs data and scales";
    if (a.data % 8 || a.s_data % 8) return "nvfp4_quantize: data must be 8-byte aligned per row";
  } else if (a.mode == 1 || a.mode == 2) {
    if (!a.out) return "nvfp4_quantize: modes 1 and 2 need out";
  } else {
    return "nvfp4_quantize: mode must be 0, 1 or 2";
  }
  const int64_t esize = a.dtype == kFloat32 ? 4 : 2;
  bool vec = a.x % 16 == 0 && (a.s_x * esize) % 16 == 0;
  if (a.mode != 0) vec = vec && a.out % 16 == 0 && (a.s_out * esize) % 16 == 0;
  auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  switch (a.dtype) {
    case kFloat32: launch_quantize<float>(a, vec, stream); break;
    case kFloat16: launch_quantize<__half>(a, vec, stream); break;
    case kBFloat16: launch_quantize<__nv_bfloat16>(a, vec, stream); break;
    default: return "nvfp4_quantize: unsupported dtype code";
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? "" : std::string("nvfp4_quantize: ") + cudaGetErrorString(err);
}

std::string nvfp4_linear_launch(const Nvfp4LinearArgs& a) {
  if (a.K % 16) return "nvfp4_linear: K must be a multiple of 16";
  if (a.M <= 0 || a.N <= 0) return "";
  if (a.x % 16 || a.s_x % 8) return "nvfp4_linear: x rows must be 16-byte aligned";
  if (a.data % 8 || a.s_data % 8) return "nvfp4_linear: packed weight rows must be 8-byte aligned";
  if ((a.M + 15) / 16 > 65535) return "nvfp4_linear: M is too large for one launch (max 1048560)";
  auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  switch (a.dtype) {
    case kFloat16: launch_linear<__half>(a, stream); break;
    case kBFloat16: launch_linear<__nv_bfloat16>(a, stream); break;
    default: return "nvfp4_linear: x must be fp16 or bf16";
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? "" : std::string("nvfp4_linear: ") + cudaGetErrorString(err);
}

}  // namespace ek
