// Element-wise kernels of the ops layer (src/pipeline/ops/cuda): GEGLU with the exact (erf) GELU,
// per-row and per-column bias adds, the residual add, and the Transformer2D residual that adds
// (B, HW, C) tokens onto a (B, C, HW) image. Every input is contiguous; the row kernels run on a
// 2-D grid (x: row, y: column blocks) so a block knows its row without any per-element division,
// and every kernel computes in f32 and rounds once on store. Outputs may alias the first input
// (each element is read before it is written, by the same thread).
#include "common.cuh"

using t2i::load;
using t2i::store;

// diffusers' GEGLU after its projection: h is (rows, 2·inner), `hidden, gate = h.chunk(2, -1)`,
// out = hidden · gelu(gate) with gelu(g) = g/2 · (1 + erf(g/√2)) (torch's default, exact GELU).
template <typename T>
__device__ void geglu(const T* h, T* out, uint32_t inner) {
  const size_t row = blockIdx.x;
  const T* hidden = h + row * 2 * inner;
  const T* gate = hidden + inner;
  T* o = out + row * inner;
  for (uint32_t j = blockIdx.y * blockDim.x + threadIdx.x; j < inner; j += blockDim.x * gridDim.y) {
    const float g = load(gate[j]);
    const float gelu = 0.5f * g * (1.0f + erff(g * 0.70710678118654752440f));
    o[j] = store<T>(load(hidden[j]) * gelu);
  }
}

// out[r, j] = x[r, j] + bias[r % period]: a convolution's bias on (B, C, H·W) rows (period C) or
// a per-image, per-channel bias such as a resnet's time embedding (period B·C).
template <typename T>
__device__ void bias_rows(const T* x, const T* bias, T* out, uint32_t cols, uint32_t period) {
  const size_t row = blockIdx.x;
  const float b = load(bias[row % period]);
  const T* xr = x + row * cols;
  T* o = out + row * cols;
  for (uint32_t j = blockIdx.y * blockDim.x + threadIdx.x; j < cols; j += blockDim.x * gridDim.y) {
    o[j] = store<T>(load(xr[j]) + b);
  }
}

// out[r, j] = x[r, j] + bias[j]: a linear layer's bias on (tokens, features) rows.
template <typename T>
__device__ void bias_cols(const T* x, const T* bias, T* out, uint32_t cols) {
  const size_t row = blockIdx.x;
  const T* xr = x + row * cols;
  T* o = out + row * cols;
  for (uint32_t j = blockIdx.y * blockDim.x + threadIdx.x; j < cols; j += blockDim.x * gridDim.y) {
    o[j] = store<T>(load(xr[j]) + load(bias[j]));
  }
}

// out[i] = a[i] + b[i] over n elements, grid-stride.
template <typename T>
__device__ void add(const T* a, const T* b, T* out, size_t n) {
  const size_t stride = (size_t)blockDim.x * gridDim.x;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    out[i] = store<T>(load(a[i]) + load(b[i]));
  }
}

// out[b, c, p] = x[b, c, p] + t[b, p, c]: Transformer2D's `proj_out` tokens (B, HW, C) folded back
// onto its (B, C, H, W) input. 32×32 tiles through shared memory so that both the token reads (along
// C) and the image reads and writes (along HW) are coalesced. Block (32, 8); grid
// (⌈HW/32⌉, ⌈C/32⌉, B).
template <typename T>
__device__ void add_tokens(const T* x, const T* t, T* out, uint32_t channels, uint32_t hw) {
  __shared__ float tile[32][33];  // +1 column: no shared-memory bank conflicts on the transpose
  const size_t b = blockIdx.z;
  const uint32_t p0 = blockIdx.x * 32, c0 = blockIdx.y * 32;
  const T* tb = t + b * hw * (size_t)channels;
  for (uint32_t i = threadIdx.y; i < 32; i += blockDim.y) {
    const uint32_t p = p0 + i, c = c0 + threadIdx.x;
    if (p < hw && c < channels) tile[i][threadIdx.x] = load(tb[(size_t)p * channels + c]);
  }
  __syncthreads();
  for (uint32_t i = threadIdx.y; i < 32; i += blockDim.y) {
    const uint32_t c = c0 + i, p = p0 + threadIdx.x;
    if (c < channels && p < hw) {
      const size_t k = (b * channels + c) * hw + p;
      out[k] = store<T>(load(x[k]) + tile[threadIdx.x][i]);
    }
  }
}

#define T2I_ELEMENTWISE(T, S)                                                                    \
  extern "C" __global__ void t2i_geglu_##S(const T* h, T* out, uint32_t inner) {                 \
    geglu<T>(h, out, inner);                                                                     \
  }                                                                                              \
  extern "C" __global__ void t2i_bias_rows_##S(const T* x, const T* bias, T* out, uint32_t cols, \
                                               uint32_t period) {                                \
    bias_rows<T>(x, bias, out, cols, period);                                                    \
  }                                                                                              \
  extern "C" __global__ void t2i_bias_cols_##S(const T* x, const T* bias, T* out,                \
                                               uint32_t cols) {                                  \
    bias_cols<T>(x, bias, out, cols);                                                            \
  }                                                                                              \
  extern "C" __global__ void t2i_add_##S(const T* a, const T* b, T* out, size_t n) {             \
    add<T>(a, b, out, n);                                                                        \
  }                                                                                              \
  extern "C" __global__ void t2i_add_tokens_##S(const T* x, const T* t, T* out,                  \
                                                uint32_t channels, uint32_t hw) {                \
    add_tokens<T>(x, t, out, channels, hw);                                                      \
  }

T2I_EACH_DTYPE(T2I_ELEMENTWISE)
