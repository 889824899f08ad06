// RMSNorm as one op (CPU): y = weight * (x * rsqrt(mean(x^2) + eps)), normalised in float32
// whatever x's dtype, as the PyTorch path (and the reference) does: x * rsqrt(...) is rounded
// to x's dtype, then multiplied by the weight and rounded again. PyTorch spends eight ops
// (cast, pow, mean, add, rsqrt, mul, cast, mul) on this; the only difference here is the order
// in which the squares are summed.
//
// rms_norm_scaled is Gemma's order: y = (x * rsqrt(mean(x^2) + eps)) * scale, all in float32
// with `scale` (1 + w) float32, rounded once to x's dtype; x [rows, dim] or [a, b, dim] with
// only its last dimension contiguous (the q or k heads sliced out of a fused QKV output).
//
// Registered as torch.ops.rillm.rms_norm and rms_norm_scaled (see rillm/kernels/__init__.py).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace {

// 1 / sqrt(mean(x^2) + eps) of one row, the squares summed in float32 in order.
template <typename scalar_t>
inline float inverse_rms(const scalar_t* src, int64_t dim, float eps) {
  float squares = 0.0f;
  for (int64_t i = 0; i < dim; ++i) {
    const float v = static_cast<float>(src[i]);
    squares += v * v;
  }
  return 1.0f / std::sqrt(squares / static_cast<float>(dim) + eps);
}

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
      const float inverse = inverse_rms(src, dim, feps);
      scalar_t* dst = out_data + r * dim;
      for (int64_t i = 0; i < dim; ++i) {
        const scalar_t normed = static_cast<scalar_t>(static_cast<float>(src[i]) * inverse);
        dst[i] = static_cast<scalar_t>(static_cast<float>(w[i]) * static_cast<float>(normed));
      }
    }
  });
}

template <typename scalar_t>
void rms_norm_scaled_rows(const at::Tensor& x, const float* scale, double eps, at::Tensor& out) {
  const int64_t dim = x.size(-1);
  const int64_t inner = x.dim() == 3 ? x.size(1) : 1;
  const int64_t rows = x.numel() / std::max<int64_t>(dim, 1);
  const int64_t outer_stride = x.stride(0), inner_stride = x.dim() == 3 ? x.stride(1) : 0;
  const scalar_t* x_data = x.data_ptr<scalar_t>();
  scalar_t* out_data = out.data_ptr<scalar_t>();
  const float feps = static_cast<float>(eps);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* src = x_data + (r / inner) * outer_stride + (r % inner) * inner_stride;
      const float inverse = inverse_rms(src, dim, feps);
      scalar_t* dst = out_data + r * dim;
      for (int64_t i = 0; i < dim; ++i)
        dst[i] = static_cast<scalar_t>(static_cast<float>(src[i]) * inverse * scale[i]);
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

at::Tensor rms_norm_scaled(const at::Tensor& x, const at::Tensor& scale, double eps) {
  TORCH_CHECK(x.device().is_cpu(), "rms_norm_scaled runs on the CPU");
  TORCH_CHECK((x.dim() == 2 || x.dim() == 3) && x.stride(-1) == 1,
              "x must be [rows, dim] or [a, b, dim] with its last dimension contiguous");
  TORCH_CHECK(scale.dim() == 1 && scale.is_contiguous() && scale.size(0) == x.size(-1) &&
                  scale.scalar_type() == at::kFloat,
              "scale must be contiguous float32 [dim]");
  auto out = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_scaled",
                                  [&] {
                                    rms_norm_scaled_rows<scalar_t>(x, scale.data_ptr<float>(),
                                                                   eps, out);
                                  });
  return out;
}

}  // namespace rillm

TORCH_LIBRARY_FRAGMENT(rillm, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.impl("rms_norm", c10::DispatchKey::CPU, &rillm::rms_norm);
  m.def("rms_norm_scaled(Tensor x, Tensor scale, float eps) -> Tensor");
  m.impl("rms_norm_scaled", c10::DispatchKey::CPU, &rillm::rms_norm_scaled);
}
