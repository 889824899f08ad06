// SiLU(gate) * up as one op (CPU), for the MLP of bfloat16 models: gate_up [T, 2I] (the fused
// gate/up projection's output) -> [T, I], computed in float32 and rounded once. PyTorch runs
// it as a slice, silu (rounded to bfloat16), and a multiply (rounded again): two passes, and
// its silu alone took ~0.5 ms for a 1024-token prefill chunk of the default model a layer.
//
// silu(g) = g * sigmoid(g), sigmoid from e = exp(-|g|) (never overflows): 1 / (1 + e) for
// g >= 0, e / (1 + e) below.
//
// gelu_tanh_mul is Gemma's GeGLU the same way: gelu(g) = g / 2 * (1 + tanh(c (g + 0.044715 g^3)))
// with c = sqrt(2 / pi), tanh(u) = sign(u) (1 - e) / (1 + e) from e = exp(-2 |u|).
//
// Registered as torch.ops.rillm.silu_mul and gelu_tanh_mul (see rillm/kernels/__init__.py);
// decode_layer calls silu_mul directly.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels.h"

namespace {

constexpr int64_t kChunk = 256;  // values converted a pass (float scratch on the stack)

using rillm::bf16_to_float;

void silu_mul_row(const uint16_t* gate, const uint16_t* up, uint16_t* out, int64_t n) {
  float values[kChunk];
  for (int64_t start = 0; start < n; start += kChunk) {
    const int64_t len = std::min(kChunk, n - start);
    for (int64_t j = 0; j < len; ++j) {
      const float g = bf16_to_float(gate[start + j]);
      const float e = rillm::exp_nonpositive(-std::fabs(g));
      const float sigmoid = (g >= 0.0f ? 1.0f : e) / (1.0f + e);
      values[j] = g * sigmoid * bf16_to_float(up[start + j]);
    }
    for (int64_t j = 0; j < len; ++j) out[start + j] = c10::BFloat16(values[j]).x;
  }
}

void gelu_tanh_mul_row(const uint16_t* gate, const uint16_t* up, uint16_t* out, int64_t n) {
  constexpr float kC = 0.7978845608028654f;  // sqrt(2 / pi)
  float values[kChunk];
  for (int64_t start = 0; start < n; start += kChunk) {
    const int64_t len = std::min(kChunk, n - start);
    for (int64_t j = 0; j < len; ++j) {
      const float g = bf16_to_float(gate[start + j]);
      const float u = kC * (g + 0.044715f * g * g * g);
      const float e = rillm::exp_nonpositive(-2.0f * std::fabs(u));
      const float t = std::copysign((1.0f - e) / (1.0f + e), u);
      values[j] = 0.5f * g * (1.0f + t) * bf16_to_float(up[start + j]);
    }
    for (int64_t j = 0; j < len; ++j) out[start + j] = c10::BFloat16(values[j]).x;
  }
}

using RowOp = void (*)(const uint16_t*, const uint16_t*, uint16_t*, int64_t);

at::Tensor gated(const at::Tensor& gate_up, RowOp row_op, const char* name) {
  TORCH_CHECK(gate_up.device().is_cpu() && gate_up.dim() == 2 &&
                  gate_up.scalar_type() == at::kBFloat16 && gate_up.size(1) % 2 == 0,
              name, " takes gate_up [tokens, 2 * inner] bfloat16 on the CPU");
  const auto x = gate_up.contiguous();
  const int64_t rows = x.size(0), inner = x.size(1) / 2;
  auto out = at::empty({rows, inner}, x.options());
  const auto* in = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  auto* dst = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(inner, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      row_op(in + r * 2 * inner, in + r * 2 * inner + inner, dst + r * inner, inner);
  });
  return out;
}

}  // namespace

namespace rillm {

at::Tensor silu_mul(const at::Tensor& gate_up) { return gated(gate_up, silu_mul_row, "silu_mul"); }

at::Tensor gelu_tanh_mul(const at::Tensor& gate_up) {
  return gated(gate_up, gelu_tanh_mul_row, "gelu_tanh_mul");
}

}  // namespace rillm

TORCH_LIBRARY_FRAGMENT(rillm, m) {
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.impl("silu_mul", c10::DispatchKey::CPU, &rillm::silu_mul);
  m.def("gelu_tanh_mul(Tensor gate_up) -> Tensor");
  m.impl("gelu_tanh_mul", c10::DispatchKey::CPU, &rillm::gelu_tanh_mul);
}
