// torch `nn.GroupNorm` (biased variance, per-channel affine), optionally followed by SiLU, in two
// passes over a contiguous (B, C, H·W) input, with f32 statistics whatever the element type.
//
// 1. `t2i_gn_partial`: grid (chunks, B·G). Each block reduces one contiguous chunk of one group
//    (a group of image b is the C/G channels × H·W elements starting at (b·G + g)·group_len) to
//    (count, mean, M2): per thread, sums shifted by the chunk's first value (so large means do not
//    cancel), then Chan et al.'s pairwise merge across the warp and the block. Many blocks per
//    group, not one: a 1024² VAE group holds 4 M elements.
// 2. `t2i_gn_apply`: grid (B·C, column blocks). Warp 0 of each block merges its group's chunk
//    statistics (at most 64, read from L2), then every thread normalises its columns of the block's
//    one channel row: y = (x − mean) · rstd · w[c] + b[c], SiLU if asked. The row gives the channel
//    and the group with one division per block, none per element.
#include "common.cuh"

using t2i::load;
using t2i::store;

struct Stats {
  float n, mean, m2;
};

// Chan, Golub & LeVeque (1979): the statistics of the union of two disjoint sets.
__device__ __forceinline__ Stats merge(Stats a, Stats b) {
  const float n = a.n + b.n;
  if (b.n == 0.0f) return a;
  if (a.n == 0.0f) return b;
  const float d = b.mean - a.mean;
  const float wb = b.n / n;
  return Stats{n, a.mean + d * wb, a.m2 + b.m2 + d * d * a.n * wb};
}

__device__ __forceinline__ Stats shfl_down(Stats s, int offset) {
  return Stats{__shfl_down_sync(0xffffffffu, s.n, offset),
               __shfl_down_sync(0xffffffffu, s.mean, offset),
               __shfl_down_sync(0xffffffffu, s.m2, offset)};
}

__device__ __forceinline__ Stats warp_merge(Stats s) {
  for (int offset = 16; offset > 0; offset /= 2) s = merge(s, shfl_down(s, offset));
  return s;  // lane 0 holds the warp's statistics
}

template <typename T>
__device__ void gn_partial(const T* x, float* partial, uint32_t group_len, uint32_t chunk_len) {
  const size_t group = blockIdx.y;
  const uint32_t start = blockIdx.x * chunk_len;
  const uint32_t end = min(start + chunk_len, group_len);
  const T* g = x + group * group_len;
  const float shift = load(g[start]);
  float n = 0.0f, s1 = 0.0f, s2 = 0.0f;
  for (uint32_t i = start + threadIdx.x; i < end; i += blockDim.x) {
    const float d = load(g[i]) - shift;
    n += 1.0f;
    s1 += d;
    s2 = fmaf(d, d, s2);
  }
  Stats s{n, 0.0f, 0.0f};
  if (n > 0.0f) s = Stats{n, shift + s1 / n, fmaxf(s2 - s1 * s1 / n, 0.0f)};
  s = warp_merge(s);
  __shared__ Stats warps[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warps[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = lane < (int)(blockDim.x / 32) ? warps[lane] : Stats{0.0f, 0.0f, 0.0f};
    s = warp_merge(s);
    if (lane == 0) {
      float* out = partial + (group * gridDim.x + blockIdx.x) * 3;
      out[0] = s.n;
      out[1] = s.mean;
      out[2] = s.m2;
    }
  }
}

template <typename T>
__device__ void gn_apply(const T* x, const float* partial, const T* weight, const T* bias, T* out,
                         uint32_t hw, uint32_t channels, uint32_t channels_per_group,
                         uint32_t chunks, float eps, int silu) {
  const size_t row = blockIdx.x;
  __shared__ float scale_shift[3];
  if (threadIdx.x < 32) {
    const float* p = partial + (row / channels_per_group) * chunks * 3;
    Stats s{0.0f, 0.0f, 0.0f};
    for (uint32_t k = threadIdx.x; k < chunks; k += 32) {
      s = merge(s, Stats{p[3 * k], p[3 * k + 1], p[3 * k + 2]});
    }
    s = warp_merge(s);
    if (threadIdx.x == 0) {
      const uint32_t c = row % channels;
      const float rstd = 1.0f / sqrtf(s.m2 / s.n + eps);
      scale_shift[0] = s.mean;
      scale_shift[1] = rstd * load(weight[c]);
      scale_shift[2] = load(bias[c]);
    }
  }
  __syncthreads();
  const float mean = scale_shift[0], scale = scale_shift[1], shift = scale_shift[2];
  const T* xr = x + row * hw;
  T* o = out + row * hw;
  for (uint32_t j = blockIdx.y * blockDim.x + threadIdx.x; j < hw; j += blockDim.x * gridDim.y) {
    float v = fmaf(load(xr[j]) - mean, scale, shift);
    if (silu) v = v / (1.0f + expf(-v));
    o[j] = store<T>(v);
  }
}

#define T2I_GROUP_NORM(T, S)                                                                   \
  extern "C" __global__ void t2i_gn_partial_##S(const T* x, float* partial, uint32_t group_len, \
                                                uint32_t chunk_len) {                          \
    gn_partial<T>(x, partial, group_len, chunk_len);                                           \
  }                                                                                            \
  extern "C" __global__ void t2i_gn_apply_##S(                                                 \
      const T* x, const float* partial, const T* weight, const T* bias, T* out, uint32_t hw,   \
      uint32_t channels, uint32_t channels_per_group, uint32_t chunks, float eps, int silu) {  \
    gn_apply<T>(x, partial, weight, bias, out, hw, channels, channels_per_group, chunks, eps,  \
                silu);                                                                         \
  }

T2I_EACH_DTYPE(T2I_GROUP_NORM)
