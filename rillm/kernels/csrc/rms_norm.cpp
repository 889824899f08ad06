// RMSNorm as one op (CPU): y = weight * (x * rsqrt(mean(x^2) + eps)), normalised in float32
// whatever x's dtype, as the PyTorch path (and the reference) does: x * rsqrt(...) is rounded
// to x's dtype, then multiplied by the weight and rounded again. PyTorch spends eight ops
// (cast, pow, mean, add, rsqrt, mul, cast, mul) on this; the only difference here is the order
// in which the squares are summed.
//
// Registered as torch.ops.rillm.rms_norm (see rillm/kernels/__init__.py).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "kernels.h"

#include <cmath>
#include <cstdint>

namespace {

template <typename scalar_t>
void rms_norm_rows(const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor& out) {
  const int64_t rows = x.size(0), dim = x.size(1);
  const scalar_t* x_data = x.data_ptr<scalar_t>();
  const scalar_t* w = weight.data_ptr<scalar_t>();
  scalar_t* out_data = out.data_ptr<scalar_t>();
  const float feps = static_cast<float>(eps);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* src = x_data + r * dim;
      float squares = 0.0f;
      for (int64_t i = 0; i < dim; ++i) {
        const float v = static_cast<float>(src[i]);
        squares += v * v;
      }
      const float mean = squares / static_cast<float>(dim);
      const float inverse = 1.0f / std::sqrt(mean + feps);
      scalar_t* dst = out_data + r * dim;
      for (int64_t i = 0; i < dim; ++i) {
        const scalar_t normed = static_cast<scalar_t>(static_cast<float>(src[i]) * inverse);
        dst[i] = static_cast<scalar_t>(static_cast<float>(w[i]) * static_cast<float>(normed));
      }
    }
  });
}

}  // namespace

namespace rillm {

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.device().is_cpu(), "rms_norm runs on the CPU");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be contiguous [rows, dim]");
  TORCH_CHECK(weight.dim() == 1 && weight.is_contiguous() && weight.size(0) == x.size(1),
              "weight must be contiguous [dim]");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "x and weight must share a dtype");
  auto out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm",
                                  [&] { rms_norm_rows<scalar_t>(x, weight, eps, out); });
  return out;
}

}  // namespace rillm

TORCH_LIBRARY_FRAGMENT(rillm, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.impl("rms_norm", c10::DispatchKey::CPU, &rillm::rms_norm);
}
