// Shared by the project's CUDA kernels (src/pipeline/ops/cuda): element conversions to and from
// f32, in which every kernel computes, and the macro that instantiates a kernel template for the
// three float dtypes under C names `<name>_f32`, `<name>_f16`, `<name>_bf16` (the names
// src/pipeline/ops/cuda/launch.rs loads).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace t2i {

template <typename T> __device__ __forceinline__ float load(T x);
template <> __device__ __forceinline__ float load<float>(float x) { return x; }
template <> __device__ __forceinline__ float load<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float load<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

// Round to nearest even, as candle's own conversions do.
template <typename T> __device__ __forceinline__ T store(float x);
template <> __device__ __forceinline__ float store<float>(float x) { return x; }
template <> __device__ __forceinline__ __half store<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 store<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

}  // namespace t2i

// EACH_DTYPE(M) expands M(T, suffix) for every dtype a kernel is built for.
#define T2I_EACH_DTYPE(M) \
  M(float, f32)           \
  M(__half, f16)          \
  M(__nv_bfloat16, bf16)
