// One decoder layer of a Llama-family model for a decode step of a few sequences (CPU), as one
// op: RMSNorm, the fused QKV projection, rotary embedding + K/V cache write, paged decode
// attention, the output projection, the residual add, RMSNorm, the fused gate/up projection,
// SiLU(gate) * up, the down projection and the second residual add.
//
// The Python layer makes ~20 op calls and ~10 module calls for this; at one to four sequences
// each is a few microseconds of dispatch against kernels that run for tens, so in a decode step
// of 30 layers the calls cost about as much as the matmuls. Here the kernels are called directly
// (kernels.h) and the elementwise steps are written out with the roundings PyTorch's bfloat16
// ops make: x + y rounded once; SiLU rounded, then the product with up rounded.
//
// Registered as torch.ops.rillm.decode_layer (see rillm/kernels/__init__.py); the Python side
// is LlamaModel's fused decode path (rillm/model/llama.py).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "kernels.h"

namespace {

// Weights of one layer, in the order of the op's `weights` list.
enum Weight : int64_t {
  kInputNorm,
  kQkvPacked, kQkvScales, kQkvMins,
  kOPacked, kOScales, kOMins,
  kPostNorm,
  kGateUpPacked, kGateUpScales, kGateUpMins,
  kDownPacked, kDownScales, kDownMins,
  kNumWeights,
};

// a + b, rounded to bfloat16 once: what PyTorch's bfloat16 add gives.
at::Tensor add_bf16(const at::Tensor& a, const at::Tensor& b) {
  auto out = at::empty_like(a);
  const at::BFloat16* pa = a.data_ptr<at::BFloat16>();
  const at::BFloat16* pb = b.data_ptr<at::BFloat16>();
  at::BFloat16* po = out.data_ptr<at::BFloat16>();
  for (int64_t i = 0, n = a.numel(); i < n; ++i)
    po[i] = static_cast<at::BFloat16>(static_cast<float>(pa[i]) + static_cast<float>(pb[i]));
  return out;
}

// gate_up [T, 2 I] -> silu(gate) * up [T, I], rounded as PyTorch's two bfloat16 ops round.
at::Tensor silu_mul_bf16(const at::Tensor& gate_up) {
  const int64_t tokens = gate_up.size(0), inner = gate_up.size(1) / 2;
  auto out = at::empty({tokens, inner}, gate_up.options());
  const at::BFloat16* in = gate_up.data_ptr<at::BFloat16>();
  at::BFloat16* po = out.data_ptr<at::BFloat16>();
  for (int64_t t = 0; t < tokens; ++t) {
    const at::BFloat16* gate = in + t * 2 * inner;
    const at::BFloat16* up = gate + inner;
    for (int64_t i = 0; i < inner; ++i) {
      const float g = static_cast<float>(gate[i]);
      const auto silu = static_cast<at::BFloat16>(g / (1.0f + std::exp(-g)));
      po[t * inner + i] =
          static_cast<at::BFloat16>(static_cast<float>(silu) * static_cast<float>(up[i]));
    }
  }
  return out;
}

}  // namespace

namespace rillm {

at::Tensor decode_layer(const at::Tensor& x, at::TensorList weights, const at::Tensor& cos,
                        const at::Tensor& sin, const at::Tensor& key_cache,
                        const at::Tensor& value_cache, const at::Tensor& slot_mapping,
                        const at::Tensor& block_tables, const at::Tensor& context_lens,
                        int64_t block_size, double scale, int64_t num_heads,
                        int64_t num_kv_heads, double eps) {
  TORCH_CHECK(x.device().is_cpu(), "decode_layer runs on the CPU");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kBFloat16,
              "x must be contiguous bfloat16 [tokens, hidden]");
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == kNumWeights, "decode_layer takes ",
              kNumWeights, " weights, got ", weights.size());
  const int64_t tokens = x.size(0), head_dim = cos.size(1);
  const auto& w = weights;
  const auto normed = rms_norm(x, w[kInputNorm], eps);
  const auto qkv = q4_linear(normed, w[kQkvPacked], w[kQkvScales], w[kQkvMins])
                       .view({tokens, num_heads + 2 * num_kv_heads, head_dim});
  const auto q = rotary_cache_write(qkv.narrow(1, 0, num_heads),
                                    qkv.narrow(1, num_heads, num_kv_heads),
                                    qkv.narrow(1, num_heads + num_kv_heads, num_kv_heads), cos,
                                    sin, key_cache, value_cache, slot_mapping);
  const auto attention = paged_decode_attention(q, key_cache, value_cache, block_tables,
                                                context_lens, block_size, scale);
  const auto h = add_bf16(x, q4_linear(attention, w[kOPacked], w[kOScales], w[kOMins]));
  const auto gate_up = q4_linear(rms_norm(h, w[kPostNorm], eps), w[kGateUpPacked],
                                 w[kGateUpScales], w[kGateUpMins]);
  const auto down = q4_linear(silu_mul_bf16(gate_up), w[kDownPacked], w[kDownScales],
                              w[kDownMins]);
  return add_bf16(h, down);
}

}  // namespace rillm

TORCH_LIBRARY_FRAGMENT(rillm, m) {
  m.def(
      "decode_layer(Tensor x, Tensor[] weights, Tensor cos, Tensor sin, Tensor(a!) key_cache, "
      "Tensor(b!) value_cache, Tensor slot_mapping, Tensor block_tables, Tensor context_lens, "
      "int block_size, float scale, int num_heads, int num_kv_heads, float eps) -> Tensor");
  m.impl("decode_layer", c10::DispatchKey::CPU, &rillm::decode_layer);
}
