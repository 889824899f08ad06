// The entry points of rillm's CPU kernels, for kernels that call one another directly (a call
// through torch's dispatcher costs microseconds; decode_layer.cpp makes seven a layer).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace rillm {

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& key_cache,
                                  const at::Tensor& value_cache, const at::Tensor& block_tables,
                                  const at::Tensor& context_lens, int64_t block_size,
                                  double scale);

at::Tensor rotary_cache_write(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& cos, const at::Tensor& sin, at::Tensor key_cache,
                              at::Tensor value_cache, const at::Tensor& slot_mapping);

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& d,
                     const at::Tensor& mins);

// x [rows, K] bfloat16 times a matrix packed by gguf_pack_q4_1 / gguf_pack_q8_0.
at::Tensor gguf_linear(const at::Tensor& x, const at::Tensor& packed);

// int8_linear rotates the inputs of a layer whose width is a multiple of this (Int8Weight's
// rule, rillm/model/int4_linear.py ROTATION: its weights were rotated the same way).
constexpr int64_t kInt8Rotation = 64;

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales,
                       bool rotate, const std::optional<at::Tensor>& few_rows_weight);

}  // namespace rillm
