// The DiT's memory-bound glue as plain CUDA: one thread block per token row. The row is read from global memory
// once into shared memory as float32, reduced twice there (mean, then variance: the two-pass form avoids the
// cancellation of E[x^2] - E[x]^2), and written once, rounded to the element type. Twin and oracle: the Triton
// kernels of kernels/norm.py.
#include "norm_modulate.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace framepack {
namespace {

constexpr int kScratchFloats = 32;  // block_sum's scratch: one float per warp of a 1024-thread block

template <typename T>
__device__ __forceinline__ float to_float(T value);
template <>
__device__ __forceinline__ float to_float<float>(float value) { return value; }
template <>
__device__ __forceinline__ float to_float<__half>(__half value) { return __half2float(value); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 value) { return __bfloat162float(value); }

template <typename T>
__device__ __forceinline__ T from_float(float value);
template <>
__device__ __forceinline__ float from_float<float>(float value) { return value; }
template <>
__device__ __forceinline__ __half from_float<__half>(float value) { return __float2half_rn(value); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float value) { return __float2bfloat16_rn(value); }

// Sum over the block; blockDim.x is a multiple of 32. `scratch` holds one float per warp.
__device__ float block_sum(float value, float* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x >> 5;
    value = lane < warps ? scratch[lane] : 0.0f;
    for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
    if (lane == 0) scratch[0] = value;
  }
  __syncthreads();
  const float total = scratch[0];
  __syncthreads();  // scratch is reused by the next reduction
  return total;
}

// LayerNorm of the float32 row in shared memory, modulated, written to `out`. Each thread touches only the
// columns it loaded itself, so no barrier is needed between filling `row` and this call beyond block_sum's.
template <typename T>
__device__ void write_modulated_norm(const float* row, float row_sum, float* scratch, const T* shift,
                                     const T* scale, T* out, int channels, float eps) {
  const float mean = block_sum(row_sum, scratch) / channels;
  float squares = 0.0f;
  for (int c = threadIdx.x; c < channels; c += blockDim.x) {
    const float centered = row[c] - mean;
    squares += centered * centered;
  }
  const float inverse_std = rsqrtf(block_sum(squares, scratch) / channels + eps);
  for (int c = threadIdx.x; c < channels; c += blockDim.x) {
    const float normalized = (row[c] - mean) * inverse_std;
    out[c] = from_float<T>(normalized * (1.0f + to_float(scale[c])) + to_float(shift[c]));
  }
}

template <typename T>
__global__ void layer_norm_modulate_kernel(const T* __restrict__ x, HiddenLayout x_layout,
                                           const T* __restrict__ shift, int64_t shift_batch_stride,
                                           const T* __restrict__ scale, int64_t scale_batch_stride,
                                           T* __restrict__ out, int64_t tokens, int channels, float eps) {
  extern __shared__ float row[];
  __shared__ float scratch[kScratchFloats];
  const int64_t row_index = blockIdx.x;
  const int64_t batch = row_index / tokens;
  const int64_t token = row_index % tokens;
  const T* x_row = x + batch * x_layout.batch_stride + token * x_layout.token_stride;
  float row_sum = 0.0f;
  for (int c = threadIdx.x; c < channels; c += blockDim.x) {
    row[c] = to_float(x_row[c]);
    row_sum += row[c];
  }
  write_modulated_norm(row, row_sum, scratch, shift + batch * shift_batch_stride, scale + batch * scale_batch_stride,
                       out + row_index * channels, channels, eps);
}

template <typename T>
__global__ void gated_residual_kernel(const T* __restrict__ x, HiddenLayout x_layout, const T* __restrict__ gate,
                                      int64_t gate_batch_stride, const T* __restrict__ y, HiddenLayout y_layout,
                                      T* __restrict__ out, int64_t tokens, int channels) {
  const int64_t row_index = blockIdx.x;
  const int64_t batch = row_index / tokens;
  const int64_t token = row_index % tokens;
  const T* x_row = x + batch * x_layout.batch_stride + token * x_layout.token_stride;
  const T* y_row = y + batch * y_layout.batch_stride + token * y_layout.token_stride;
  const T* gate_row = gate + batch * gate_batch_stride;
  T* out_row = out + row_index * channels;
  for (int c = threadIdx.x; c < channels; c += blockDim.x) {
    out_row[c] = from_float<T>(to_float(x_row[c]) + to_float(gate_row[c]) * to_float(y_row[c]));
  }
}

template <typename T>
__global__ void gated_residual_layer_norm_modulate_kernel(
    const T* __restrict__ x, HiddenLayout x_layout, const T* __restrict__ gate, int64_t gate_batch_stride,
    const T* __restrict__ y, HiddenLayout y_layout, const T* __restrict__ shift, int64_t shift_batch_stride,
    const T* __restrict__ scale, int64_t scale_batch_stride, T* __restrict__ residual_out, T* __restrict__ norm_out,
    int64_t tokens, int channels, float eps) {
  extern __shared__ float row[];
  __shared__ float scratch[kScratchFloats];
  const int64_t row_index = blockIdx.x;
  const int64_t batch = row_index / tokens;
  const int64_t token = row_index % tokens;
  const T* x_row = x + batch * x_layout.batch_stride + token * x_layout.token_stride;
  const T* y_row = y + batch * y_layout.batch_stride + token * y_layout.token_stride;
  const T* gate_row = gate + batch * gate_batch_stride;
  T* residual_row = residual_out + row_index * channels;
  float row_sum = 0.0f;
  for (int c = threadIdx.x; c < channels; c += blockDim.x) {
    // Normalize the residual as stored, rounded to T: what an unfused LayerNorm would read back.
    const T residual = from_float<T>(to_float(x_row[c]) + to_float(gate_row[c]) * to_float(y_row[c]));
    residual_row[c] = residual;
    row[c] = to_float(residual);
    row_sum += row[c];
  }
  write_modulated_norm(row, row_sum, scratch, shift + batch * shift_batch_stride, scale + batch * scale_batch_stride,
                       norm_out + row_index * channels, channels, eps);
}

int threads_for(int64_t channels) {
  // About eight columns per thread at the DiT's 3072 channels; whole warps always.
  if (channels >= 4096) return 1024;
  if (channels >= 1024) return 512;
  if (channels >= 256) return 256;
  return 64;
}

// A kernel may use 48 KB of shared memory (static + dynamic) unless it opts in to more, up to the GPU's per-block
// limit (99 KB on sm_86/89, 163 KB on sm_80, 227 KB on sm_90). The rows of the widest models need the opt-in:
// kMaxChannels floats are 48 KB on their own, plus the static reduction scratch.
constexpr size_t kDefaultSharedBytes = 48 * 1024;
constexpr size_t kScratchBytes = kScratchFloats * sizeof(float);

// Allow `kernel` `dynamic_bytes` of dynamic shared memory (a call only for rows wider than 12256 channels). On
// failure the error is left for the caller's launch check (cudaGetLastError) and the kernel is not launched.
template <typename Kernel>
bool allow_dynamic_shared(Kernel kernel, size_t dynamic_bytes) {
  if (dynamic_bytes + kScratchBytes <= kDefaultSharedBytes) return true;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(dynamic_bytes)) ==
         cudaSuccess;
}

template <typename Launch>
void dispatch(ElementType type, Launch launch) {
  switch (type) {
    case ElementType::Float32: launch(float{}); break;
    case ElementType::Float16: launch(__half{}); break;
    case ElementType::BFloat16: launch(__nv_bfloat16{}); break;
  }
}

}  // namespace

void launch_layer_norm_modulate(ElementType type, const void* x, HiddenLayout x_layout, const void* shift,
                                int64_t shift_batch_stride, const void* scale, int64_t scale_batch_stride, void* out,
                                int64_t batch, int64_t tokens, int64_t channels, float eps, cudaStream_t stream) {
  const int64_t rows = batch * tokens;
  if (rows == 0 || channels == 0) return;
  const size_t shared_bytes = static_cast<size_t>(channels) * sizeof(float);
  dispatch(type, [&](auto tag) {
    using T = decltype(tag);
    if (!allow_dynamic_shared(layer_norm_modulate_kernel<T>, shared_bytes)) return;
    layer_norm_modulate_kernel<T><<<static_cast<unsigned>(rows), threads_for(channels), shared_bytes, stream>>>(
        static_cast<const T*>(x), x_layout, static_cast<const T*>(shift), shift_batch_stride,
        static_cast<const T*>(scale), scale_batch_stride, static_cast<T*>(out), tokens, static_cast<int>(channels),
        eps);
  });
}

void launch_gated_residual(ElementType type, const void* x, HiddenLayout x_layout, const void* gate,
                           int64_t gate_batch_stride, const void* y, HiddenLayout y_layout, void* out, int64_t batch,
                           int64_t tokens, int64_t channels, cudaStream_t stream) {
  const int64_t rows = batch * tokens;
  if (rows == 0 || channels == 0) return;
  dispatch(type, [&](auto tag) {
    using T = decltype(tag);
    gated_residual_kernel<T><<<static_cast<unsigned>(rows), threads_for(channels), 0, stream>>>(
        static_cast<const T*>(x), x_layout, static_cast<const T*>(gate), gate_batch_stride, static_cast<const T*>(y),
        y_layout, static_cast<T*>(out), tokens, static_cast<int>(channels));
  });
}

void launch_gated_residual_layer_norm_modulate(ElementType type, const void* x, HiddenLayout x_layout,
                                               const void* gate, int64_t gate_batch_stride, const void* y,
                                               HiddenLayout y_layout, const void* shift, int64_t shift_batch_stride,
                                               const void* scale, int64_t scale_batch_stride, void* residual_out,
                                               void* norm_out, int64_t batch, int64_t tokens, int64_t channels,
                                               float eps, cudaStream_t stream) {
  const int64_t rows = batch * tokens;
  if (rows == 0 || channels == 0) return;
  const size_t shared_bytes = static_cast<size_t>(channels) * sizeof(float);
  dispatch(type, [&](auto tag) {
    using T = decltype(tag);
    if (!allow_dynamic_shared(gated_residual_layer_norm_modulate_kernel<T>, shared_bytes)) return;
    gated_residual_layer_norm_modulate_kernel<T>
        <<<static_cast<unsigned>(rows), threads_for(channels), shared_bytes, stream>>>(
            static_cast<const T*>(x), x_layout, static_cast<const T*>(gate), gate_batch_stride,
            static_cast<const T*>(y), y_layout, static_cast<const T*>(shift), shift_batch_stride,
            static_cast<const T*>(scale), scale_batch_stride, static_cast<T*>(residual_out),
            static_cast<T*>(norm_out), tokens, static_cast<int>(channels), eps);
  });
}

}  // namespace framepack
