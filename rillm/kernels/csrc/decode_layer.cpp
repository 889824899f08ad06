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
// The four matmuls run on the file's blocks packed for gguf_linear (gguf_linear.cpp), the
// GGUFBlocksMethod of rillm/model/linear.py: a model whose matrices run another way decodes
// layer by layer instead, so Python holds the only routing table.
//
// Registered as torch.ops.rillm.decode_layer (see rillm/kernels/__init__.py); the Python side
// is FusedDecode (rillm/model/fused_decode.py).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "kernels.h"

namespace rillm {

// `weights`: the input and post-attention norms, then the packed parts of the QKV, output,
// gate/up and down matrices, `parts[i]` of matrix i (a Q4_K_M file mixes formats in one
// fused matrix: each part keeps its own).
at::Tensor decode_layer(const at::Tensor& x, at::TensorList weights, at::IntArrayRef parts,
                        const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& key_cache,
                        const at::Tensor& value_cache, const at::Tensor& slot_mapping,
                        const at::Tensor& block_tables, const at::Tensor& context_lens,
                        int64_t block_size, double scale, int64_t num_heads,
                        int64_t num_kv_heads, double eps, int64_t window) {
  TORCH_CHECK(x.device().is_cpu(), "decode_layer runs on the CPU");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kBFloat16,
              "x must be contiguous bfloat16 [tokens, hidden]");
  TORCH_CHECK(parts.size() == 4 && std::all_of(parts.begin(), parts.end(),
                                               [](int64_t p) { return p > 0; }),
              "decode_layer takes the parts of 4 matrices");
  TORCH_CHECK(static_cast<int64_t>(weights.size()) ==
                  2 + parts[0] + parts[1] + parts[2] + parts[3],
              "decode_layer takes 2 norms and the matrices' parts, got ", weights.size(),
              " tensors");
  const int64_t tokens = x.size(0), head_dim = cos.size(1);
  const auto& input_norm = weights[0];
  const auto& post_norm = weights[1];
  at::TensorList matrices[4];
  int64_t at = 2;
  for (int i = 0; i < 4; ++i) {
    matrices[i] = weights.slice(at, parts[i]);
    at += parts[i];
  }
  const auto normed = rms_norm(x, input_norm, eps);
  const auto qkv = gguf_linear(normed, matrices[0])
                       .view({tokens, num_heads + 2 * num_kv_heads, head_dim});
  const auto q = rotary_cache_write(qkv.narrow(1, 0, num_heads),
                                    qkv.narrow(1, num_heads, num_kv_heads),
                                    qkv.narrow(1, num_heads + num_kv_heads, num_kv_heads), cos,
                                    sin, key_cache, value_cache, slot_mapping);
  const auto attention = paged_decode_attention(q, key_cache, value_cache, block_tables,
                                                context_lens, block_size, scale, window);
  const auto h = at::add(x, gguf_linear(attention, matrices[1]));
  const auto gate_up = gguf_linear(rms_norm(h, post_norm, eps), matrices[2]);
  return at::add(h, gguf_linear(silu_mul(gate_up), matrices[3]));
}

}  // namespace rillm

TORCH_LIBRARY_FRAGMENT(rillm, m) {
  m.def(
      "decode_layer(Tensor x, Tensor[] weights, int[] parts, Tensor cos, Tensor sin, "
      "Tensor(a!) key_cache, Tensor(b!) value_cache, Tensor slot_mapping, Tensor block_tables, Tensor context_lens, "
      "int block_size, float scale, int num_heads, int num_kv_heads, float eps, int window=0) "
      "-> Tensor");
  m.impl("decode_layer", c10::DispatchKey::CPU, &rillm::decode_layer);
}
