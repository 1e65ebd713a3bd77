// PyTorch binding of the CUDA glue ops: torch.ops.framepack.{layer_norm_modulate, gated_residual,
// gated_residual_layer_norm_modulate}. Importing the built module `framepack_kernels._cuda_ops` registers them;
// kernels/cuda_ops.py does that and falls back to the Triton twins when the module was not built.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "norm_modulate.h"

namespace framepack {
namespace {

ElementType element_type(const at::Tensor& tensor) {
  switch (tensor.scalar_type()) {
    case at::ScalarType::Float: return ElementType::Float32;
    case at::ScalarType::Half: return ElementType::Float16;
    case at::ScalarType::BFloat16: return ElementType::BFloat16;
    default:
      TORCH_CHECK(false, "framepack CUDA ops take float32, float16 or bfloat16 tensors, got ", tensor.scalar_type());
  }
}

void check_hidden(const char* name, const at::Tensor& hidden, const at::Tensor& x) {
  TORCH_CHECK(hidden.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(hidden.dim() == 3 && hidden.sizes() == x.sizes(), name, " must be (batch, tokens, channels) like x");
  TORCH_CHECK(hidden.stride(2) == 1, name, " must have contiguous channels");
  TORCH_CHECK(hidden.scalar_type() == x.scalar_type() && hidden.device() == x.device(),
              name, " must share x's dtype and device");
}

void check_vector(const char* name, const at::Tensor& vector, const at::Tensor& x) {
  TORCH_CHECK(vector.dim() == 2 && vector.size(0) == x.size(0) && vector.size(1) == x.size(2),
              name, " must be (batch, channels)");
  TORCH_CHECK(vector.stride(1) == 1, name, " must have contiguous channels");
  TORCH_CHECK(vector.scalar_type() == x.scalar_type() && vector.device() == x.device(),
              name, " must share x's dtype and device");
}

HiddenLayout layout(const at::Tensor& hidden) { return HiddenLayout{hidden.stride(0), hidden.stride(1)}; }

at::Tensor layer_norm_modulate(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale, double eps) {
  check_hidden("x", x, x);
  check_vector("shift", shift, x);
  check_vector("scale", scale, x);
  TORCH_CHECK(x.size(2) <= kMaxChannels, "layer_norm_modulate supports at most ", kMaxChannels, " channels");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options());
  launch_layer_norm_modulate(element_type(x), x.data_ptr(), layout(x), shift.data_ptr(), shift.stride(0),
                             scale.data_ptr(), scale.stride(0), out.data_ptr(), x.size(0), x.size(1), x.size(2),
                             static_cast<float>(eps), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor gated_residual(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& y) {
  check_hidden("x", x, x);
  check_hidden("y", y, x);
  check_vector("gate", gate, x);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options());
  launch_gated_residual(element_type(x), x.data_ptr(), layout(x), gate.data_ptr(), gate.stride(0), y.data_ptr(),
                        layout(y), out.data_ptr(), x.size(0), x.size(1), x.size(2),
                        c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> gated_residual_layer_norm_modulate(const at::Tensor& x, const at::Tensor& gate,
                                                                      const at::Tensor& y, const at::Tensor& shift,
                                                                      const at::Tensor& scale, double eps) {
  check_hidden("x", x, x);
  check_hidden("y", y, x);
  check_vector("gate", gate, x);
  check_vector("shift", shift, x);
  check_vector("scale", scale, x);
  TORCH_CHECK(x.size(2) <= kMaxChannels, "gated_residual_layer_norm_modulate supports at most ", kMaxChannels,
              " channels");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor residual = at::empty(x.sizes(), x.options());
  at::Tensor normalized = at::empty(x.sizes(), x.options());
  launch_gated_residual_layer_norm_modulate(
      element_type(x), x.data_ptr(), layout(x), gate.data_ptr(), gate.stride(0), y.data_ptr(), layout(y),
      shift.data_ptr(), shift.stride(0), scale.data_ptr(), scale.stride(0), residual.data_ptr(), normalized.data_ptr(),
      x.size(0), x.size(1), x.size(2), static_cast<float>(eps), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {residual, normalized};
}

}  // namespace
}  // namespace framepack

TORCH_LIBRARY(framepack, m) {
  m.def("layer_norm_modulate(Tensor x, Tensor shift, Tensor scale, float eps) -> Tensor");
  m.def("gated_residual(Tensor x, Tensor gate, Tensor y) -> Tensor");
  m.def("gated_residual_layer_norm_modulate(Tensor x, Tensor gate, Tensor y, Tensor shift, Tensor scale, float eps)"
        " -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(framepack, CUDA, m) {
  m.impl("layer_norm_modulate", &framepack::layer_norm_modulate);
  m.impl("gated_residual", &framepack::gated_residual);
  m.impl("gated_residual_layer_norm_modulate", &framepack::gated_residual_layer_norm_modulate);
}

// The ops register themselves when the library is loaded; Python only needs an importable module to load it.
extern "C" PyObject* PyInit__cuda_ops(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "framepack_kernels._cuda_ops", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
