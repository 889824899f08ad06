// The entry points of rillm's CPU kernels, for kernels that call one another directly (a call
// through torch's dispatcher costs microseconds; decode_layer.cpp makes seven a layer).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>

// The CPU features a kernel's vector path is written for; -march=native decides them. One set
// for every kernel, and one question for Python: torch.ops.rillm.vectorized(name).
#if defined(__AVX512F__)
#define RILLM_AVX512 1
#endif
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define RILLM_AVX512_BF16 1
#endif
#if defined(RILLM_AVX512_BF16) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define RILLM_AVX512_VNNI 1
#endif
#ifdef RILLM_AVX512
#include <immintrin.h>
#endif

namespace rillm {

// Whether the kernel `name` (decode_attention, prefill_attention, gguf_linear, argmax) runs
// its vector path on this build; false for a name it does not know.
bool vectorized(c10::string_view name);

// A bfloat16 (its bits) as float32: the top half of a float32, so a shift, which vectorizes
// where c10::BFloat16's conversion may not.
inline float bf16_to_float(uint16_t bits) {
  const uint32_t word = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &word, sizeof value);
  return value;
}

// e^x for x <= 0 (softmax inputs less their maximum), branch-free so loops over it vectorize:
// x = n ln2 + r with |r| <= ln2 / 2, e^r by a degree-6 polynomial, 2^n built in the exponent.
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  // Nearest integer by truncation (x <= 0): a vector conversion, not a libm call.
  const int32_t k = static_cast<int32_t>(x * 1.44269504088896341f - 0.5f);
  const float n = static_cast<float>(k);
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (k + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// The attention kernels read wherever the block tables point: check that every block
// sequence `b` reads (the first ceil(length / block_size) entries of its row `table`) is a block
// of the cache.
inline void check_block_table(const int64_t* table, int64_t b, int64_t length, int64_t block_size,
                              int64_t num_blocks) {
  for (int64_t i = 0; i * block_size < length; ++i) {
    TORCH_CHECK(table[i] >= 0 && table[i] < num_blocks, "block_tables[", b, "][", i, "] = ",
                table[i], " is not a cache block");
  }
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& key_cache,
                                  const at::Tensor& value_cache, const at::Tensor& block_tables,
                                  const at::Tensor& context_lens, int64_t block_size,
                                  double scale, int64_t window);

at::Tensor rotary_cache_write(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& cos, const at::Tensor& sin, at::Tensor key_cache,
                              at::Tensor value_cache, const at::Tensor& slot_mapping);

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);

at::Tensor silu_mul(const at::Tensor& gate_up);

// x [rows, K] bfloat16 times a matrix of GGUF blocks packed by rillm.kernels.gguf_pack, in
// parts (of any formats) whose outputs are concatenated; bfloat16 out, or float32 (unrounded)
// where `float_out`.
at::Tensor gguf_linear(const at::Tensor& x, at::TensorList packed, bool float_out = false);

}  // namespace rillm
