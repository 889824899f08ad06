// One decoder layer of a Llama-family model for a decode step of a few sequences (CPU), as one
// op: RMSNorm, the fused QKV projection, rotary embedding + K/V cache write, paged decode
// attention, the output projection, the residual add, RMSNorm, the fused gate/up projection,
// SiLU(gate) * up (silu_mul.cpp), the down projection and the second residual add.
//
// The Python layer makes ~20 op calls and ~10 module calls for this; at one to four sequences
// each is a few microseconds of Python and dispatch against kernels that run for tens, so in a
// decode step of 30 layers the calls cost about as much as the matmuls. Here rillm's kernels
// are called directly (kernels.h) and the residual adds are the same ATen ops the Python layer
// runs, so the result is the same bit for bit.
//
// The four matmuls run as Int4Linear runs them: on the file's blocks packed for gguf_linear
// (gguf_linear.cpp) at any number of sequences, the default; or up to `int4_rows` sequences on
// rillm's int4 kernel and above on the oneDNN-packed bfloat16 copies of the same weights
// (mkldnn::_linear_pointwise) or, with quantization="int8", on int8 copies (int8_linear.cpp).
//
// Registered as torch.ops.rillm.decode_layer (see rillm/kernels/__init__.py); the Python side
// is LlamaModel's fused decode path (rillm/model/llama.py).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "kernels.h"

namespace {

// Weights of one layer, in the order of the op's `weights` list.
enum Weight : int64_t {
  kInputNorm,
  // int4 packed, d, m; or gguf_linear's packed blocks and two empty tensors
  kQkvPacked, kQkvScales, kQkvMins,
  kOPacked, kOScales, kOMins,
  kPostNorm,
  kGateUpPacked, kGateUpScales, kGateUpMins,
  kDownPacked, kDownScales, kDownMins,
  kQkvDense, kODense, kGateUpDense, kDownDense,  // oneDNN-packed bfloat16, int8, or empty
  kQkvDenseScales, kODenseScales, kGateUpDenseScales, kDownDenseScales,  // int8's; else empty
  kQkvFewRows, kOFewRows, kGateUpFewRows, kDownFewRows,  // int8 packed for few rows, or empty
  kNumWeights,
};

// x [rows, K] bfloat16 times a weight packed by mkldnn::_reorder_linear_weight.
at::Tensor packed_bf16_linear(const at::Tensor& x, const at::Tensor& weight) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            c10::string_view, c10::List<std::optional<at::Scalar>>,
                            std::optional<c10::string_view>)>();
  return op.call(x, weight, std::nullopt, "none", c10::List<std::optional<at::Scalar>>(), "");
}

// One of the layer's four matmuls: gguf_linear's blocks; or int4 blocks for few rows, the
// packed bfloat16 or int8 copy for more.
at::Tensor linear(const at::Tensor& x, at::TensorList w, int64_t first, int64_t dense,
                  int64_t int4_rows) {
  if (w[first].dim() == 3) return rillm::gguf_linear(x, w[first]);
  if (x.size(0) <= int4_rows) return rillm::q4_linear(x, w[first], w[first + 1], w[first + 2]);
  const int64_t scales = dense + (kQkvDenseScales - kQkvDense);
  if (w[dense].scalar_type() == at::kChar) {
    const int64_t few_rows = dense + (kQkvFewRows - kQkvDense);
    return rillm::int8_linear(x, w[dense], w[scales], x.size(1) % rillm::kInt8Rotation == 0,
                              w[few_rows]);
  }
  return packed_bf16_linear(x, w[dense]);
}

}  // namespace

namespace rillm {

at::Tensor decode_layer(const at::Tensor& x, at::TensorList weights, const at::Tensor& cos,
                        const at::Tensor& sin, const at::Tensor& key_cache,
                        const at::Tensor& value_cache, const at::Tensor& slot_mapping,
                        const at::Tensor& block_tables, const at::Tensor& context_lens,
                        int64_t block_size, double scale, int64_t num_heads,
                        int64_t num_kv_heads, double eps, int64_t int4_rows) {
  TORCH_CHECK(x.device().is_cpu(), "decode_layer runs on the CPU");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kBFloat16,
              "x must be contiguous bfloat16 [tokens, hidden]");
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == kNumWeights, "decode_layer takes ",
              kNumWeights, " weights, got ", weights.size());
  const int64_t tokens = x.size(0), head_dim = cos.size(1);
  const auto& w = weights;
  const auto normed = rms_norm(x, w[kInputNorm], eps);
  const auto qkv = linear(normed, w, kQkvPacked, kQkvDense, int4_rows)
                       .view({tokens, num_heads + 2 * num_kv_heads, head_dim});
  const auto q = rotary_cache_write(qkv.narrow(1, 0, num_heads),
                                    qkv.narrow(1, num_heads, num_kv_heads),
                                    qkv.narrow(1, num_heads + num_kv_heads, num_kv_heads), cos,
                                    sin, key_cache, value_cache, slot_mapping);
  const auto attention = paged_decode_attention(q, key_cache, value_cache, block_tables,
                                                context_lens, block_size, scale);
  const auto h = at::add(x, linear(attention, w, kOPacked, kODense, int4_rows));
  const auto gate_up =
      linear(rms_norm(h, w[kPostNorm], eps), w, kGateUpPacked, kGateUpDense, int4_rows);
  return at::add(h, linear(silu_mul(gate_up), w, kDownPacked, kDownDense, int4_rows));
}

}  // namespace rillm

TORCH_LIBRARY_FRAGMENT(rillm, m) {
  m.def(
      "decode_layer(Tensor x, Tensor[] weights, Tensor cos, Tensor sin, Tensor(a!) key_cache, "
      "Tensor(b!) value_cache, Tensor slot_mapping, Tensor block_tables, Tensor context_lens, "
      "int block_size, float scale, int num_heads, int num_kv_heads, float eps, int int4_rows) "
      "-> Tensor");
  m.impl("decode_layer", c10::DispatchKey::CPU, &rillm::decode_layer);
  // The oneDNN-packed weights are MkldnnCPU tensors, which the dispatcher goes by.
  m.impl("decode_layer", c10::DispatchKey::MkldnnCPU, &rillm::decode_layer);
}
