// Launchers for the DiT's fused glue ops (LayerNorm + adaLN modulation, gated residual), callable from C++
// without any CUDA or PyTorch types beyond cudaStream_t: the PyTorch binding (ops.cpp) passes raw pointers,
// strides and the element type. Hidden states are (batch, tokens, channels) with unit column stride; modulation
// vectors are (batch, channels) with unit column stride; outputs are contiguous.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace framepack {

enum class ElementType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

struct HiddenLayout {
  int64_t batch_stride;
  int64_t token_stride;
};

// Largest row the kernels keep in shared memory: float32 per channel, 48 KB, which with the kernels' static scratch
// is over the default 48 KB per block, so the launchers opt in to more (norm_modulate.cu: allow_dynamic_shared).
constexpr int64_t kMaxChannels = 12288;

// out = LayerNorm(x) * (1 + scale) + shift, LayerNorm without affine, statistics in float32.
void launch_layer_norm_modulate(ElementType type, const void* x, HiddenLayout x_layout, const void* shift,
                                int64_t shift_batch_stride, const void* scale, int64_t scale_batch_stride, void* out,
                                int64_t batch, int64_t tokens, int64_t channels, float eps, cudaStream_t stream);

// out = x + gate * y, gate broadcast over tokens.
void launch_gated_residual(ElementType type, const void* x, HiddenLayout x_layout, const void* gate,
                           int64_t gate_batch_stride, const void* y, HiddenLayout y_layout, void* out, int64_t batch,
                           int64_t tokens, int64_t channels, cudaStream_t stream);

// residual_out = x + gate * y (rounded to the element type); norm_out = LayerNorm(residual_out) * (1 + scale) + shift.
void launch_gated_residual_layer_norm_modulate(ElementType type, const void* x, HiddenLayout x_layout,
                                               const void* gate, int64_t gate_batch_stride, const void* y,
                                               HiddenLayout y_layout, const void* shift, int64_t shift_batch_stride,
                                               const void* scale, int64_t scale_batch_stride, void* residual_out,
                                               void* norm_out, int64_t batch, int64_t tokens, int64_t channels,
                                               float eps, cudaStream_t stream);

}  // namespace framepack
