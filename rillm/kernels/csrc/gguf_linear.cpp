// y = x W^T with W in a GGUF file's own blocks (Q4_1 or Q8_0) and x rounded to int8 per block
// of 32 (CPU): the arithmetic llama.cpp runs these files with (its Q8_1 / Q8_0 activations),
// on VNNI's vpdpbusd.
//
// W [N, K] in blocks of 32 weights along K with float16 constants, as the file stores them:
//   Q4_1: w = d * q + m, q in [0, 16);   Q8_0: w = d * q, q in [-128, 128).
// Each row of x (bfloat16) is cut into blocks of 32 and each block rounded to int8 with its
// own scale: s = absmax / 127, qx = round-half-even(x * (127 / absmax)). Per output and block
//   Q4_1: sum_{k in b} x_k w_k ~ d * s * sum q_k qx_k + m * s * sum qx_k
//   Q8_0: sum_{k in b} x_k w_k ~ d * s * sum q_k qx_k
// with the sums of integers exact in int32 (vpdpbusd multiplies unsigned by signed bytes, 64
// products an instruction: Q4_1's q is unsigned as it is; Q8_0's is stored as q + 128 and
// 128 * sum qx taken off); the blocks are summed in float32 in order and the result rounded
// to bfloat16. A row's result does not depend on the other rows of the batch.
//
// Q4_1's m term takes the block's sum as rounded (s * sum qx), not the exact sum of x: then
// the rounding error of x meets the weights d * q + m, which are centred near zero, rather
// than d * q (mean ~7.5 d) alone. With the exact sum the error of a layer's output was 2-3x
// larger and the default model's perplexity 1.1% above float32's; with this, within 0.6%.
// The rounding of x to int8 per block is the one loss beyond the file's (bench/perplexity.py).
//
// Against bfloat16 activations (q4_linear.cpp: vdpbf16ps, 32 products an instruction, or
// oneDNN's bfloat16 matmul on a dequantized copy) this does twice the products an
// instruction on a quarter (Q4_1) or half (Q8_0) of the bytes, at any number of rows.
//
// Layout (gguf_pack_q4_1 / gguf_pack_q8_0): the outputs in groups of kLanes = 16, each group
// block by block. A 32-bit lane of a register holds four consecutive weights of one output,
// the order vpdpbusd multiplies them in against four broadcast bytes of x.
//   Q4_1 block, 320 bytes: four 64-byte registers of nibbles; byte 4 * lane + j of register t
//     holds the weight at 8 t + j of the block (low nibble) and at 8 t + 4 + j (high nibble);
//     then the 16 d and the 16 m as float16.
//   Q8_0 block, 544 bytes: eight 64-byte registers of q + 128; byte 4 * lane + j of register t
//     holds the weight at 4 t + j; then the 16 d as float16.
//
// Registered as torch.ops.rillm.gguf_linear, gguf_pack_q4_1, gguf_pack_q8_0,
// q8_quantize_blocks (see rillm/kernels/__init__.py); decode_layer
// calls gguf_linear directly.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>

#include "kernels.h"

namespace {

// The library is built with -fassociative-math; these functions keep the order of their
// float sums, so that a row's result is the same whatever rows come with it.
#define NO_REASSOCIATION __attribute__((optimize("no-associative-math")))

constexpr int64_t kBlock = 32;  // weights per constant, inputs per activation scale
constexpr int64_t kLanes = 16;  // outputs per group: one per 32-bit lane of a register
constexpr int kMaxPassRows = 8;  // rows of x per pass over a group's weights

enum class Format { kQ4_1, kQ8_0 };

template <Format F>
struct Layout;
template <>
struct Layout<Format::kQ4_1> {
  static constexpr int64_t kWeightBytes = kLanes * kBlock / 2;        // 256: nibbles
  static constexpr int64_t kBlockBytes = kWeightBytes + 2 * kLanes * 2;  // + d, m: 320
};
template <>
struct Layout<Format::kQ8_0> {
  static constexpr int64_t kWeightBytes = kLanes * kBlock;         // 512: q + 128
  static constexpr int64_t kBlockBytes = kWeightBytes + kLanes * 2;  // + d: 544
};

using rillm::bf16_to_float;

// Where one row of x goes: per block of 32, its int8 values, scale s, sum as rounded
// (s * sum q) and the sum of its int8 values.
struct QuantizedRows {
  int8_t* q;
  float* scales;
  float* sums;
  int32_t* q_sums;
};

// One row of x, the blocks of row `i` of `out` (the scale is absmax / 127, q =
// round-half-even(x * (127 / absmax)); a block of zeros has scale 0).
#ifdef RILLM_AVX512_VNNI
NO_REASSOCIATION void quantize_row(const uint16_t* x, int64_t k, const QuantizedRows& out,
                                   int64_t i) {
  const int64_t blocks = k / kBlock;
  for (int64_t b = 0; b < blocks; ++b) {
    const __m512i words = _mm512_loadu_si512(x + b * kBlock);
    const __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm512_castsi512_si256(words)), 16));
    const __m512 hi = _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(words, 1)), 16));
    const float absmax =
        _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
    const __m512 inv = _mm512_set1_ps(absmax > 0.0f ? 127.0f / absmax : 0.0f);
    const __m512i top = _mm512_set1_epi32(127), bottom = _mm512_set1_epi32(-127);
    // Round to nearest even (the default rounding mode), then clamp.
    auto round = [&](__m512 v) {
      return _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v, inv)), bottom),
                              top);
    };
    const __m512i q_lo = round(lo), q_hi = round(hi);
    int8_t* q = out.q + i * k + b * kBlock;
    _mm_storeu_si128((__m128i*)q, _mm512_cvtepi32_epi8(q_lo));
    _mm_storeu_si128((__m128i*)(q + 16), _mm512_cvtepi32_epi8(q_hi));
    out.scales[i * blocks + b] = absmax / 127.0f;
    const int32_t q_sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q_lo, q_hi));
    out.q_sums[i * blocks + b] = q_sum;
    out.sums[i * blocks + b] = static_cast<float>(q_sum) * (absmax / 127.0f);
  }
}
#else
NO_REASSOCIATION void quantize_row(const uint16_t* x, int64_t k, const QuantizedRows& out,
                                   int64_t i) {
  const int64_t blocks = k / kBlock;
  for (int64_t b = 0; b < blocks; ++b) {
    float values[kBlock];
    float absmax = 0.0f;
    for (int t = 0; t < kBlock; ++t) {
      values[t] = bf16_to_float(x[b * kBlock + t]);
      absmax = std::max(absmax, std::fabs(values[t]));
    }
    const float inv = absmax > 0.0f ? 127.0f / absmax : 0.0f;
    int32_t q_sum = 0;
    for (int t = 0; t < kBlock; ++t) {
      const float r = std::min(127.0f, std::max(-127.0f, std::nearbyint(values[t] * inv)));
      out.q[i * k + b * kBlock + t] = static_cast<int8_t>(r);
      q_sum += static_cast<int32_t>(r);
    }
    out.scales[i * blocks + b] = absmax / 127.0f;
    out.q_sums[i * blocks + b] = q_sum;
    out.sums[i * blocks + b] = static_cast<float>(q_sum) * (absmax / 127.0f);
  }
}
#endif

#ifdef RILLM_AVX512_VNNI
// R rows of x (quantized, starting at row `first`) against one group of 16 outputs, block by
// block; y points at the group's first output of row `first`.
template <Format F, int R>
NO_REASSOCIATION void group_rows(const QuantizedRows& x, int64_t first, int64_t k,
                                 const uint8_t* group, c10::BFloat16* y, int64_t n) {
  using L = Layout<F>;
  const int64_t blocks = k / kBlock;
  const int8_t* q = x.q + first * k;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* block = group + b * L::kBlockBytes;
    __m512i dot[R];
    for (int r = 0; r < R; ++r) dot[r] = _mm512_setzero_si512();
    // Inputs 4 t .. 4 t + 3 of the block, for every row.
    auto add = [&](int t, __m512i weights) {
      for (int r = 0; r < R; ++r) {
        int32_t four;
        std::memcpy(&four, q + r * k + b * kBlock + 4 * t, sizeof four);
        dot[r] = _mm512_dpbusd_epi32(dot[r], weights, _mm512_set1_epi32(four));
      }
    };
    if constexpr (F == Format::kQ4_1) {
      for (int t = 0; t < 4; ++t) {
        const __m512i nibbles = _mm512_loadu_si512(block + 64 * t);
        add(2 * t, _mm512_and_si512(nibbles, low4));
        add(2 * t + 1, _mm512_and_si512(_mm512_srli_epi16(nibbles, 4), low4));
      }
    } else {
      for (int t = 0; t < 8; ++t) add(t, _mm512_loadu_si512(block + 64 * t));
    }
    const __m512 d =
        _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(block + L::kWeightBytes)));
    for (int r = 0; r < R; ++r) {
      const int64_t at = (first + r) * blocks + b;
      if constexpr (F == Format::kQ8_0)
        dot[r] = _mm512_sub_epi32(dot[r], _mm512_set1_epi32(128 * x.q_sums[at]));
      const __m512 ds = _mm512_mul_ps(d, _mm512_set1_ps(x.scales[at]));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r]), ds, acc[r]);
    }
    if constexpr (F == Format::kQ4_1) {
      const __m512 m =
          _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(block + L::kWeightBytes + 32)));
      for (int r = 0; r < R; ++r)
        acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(x.sums[(first + r) * blocks + b]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r)
    _mm256_storeu_si256((__m256i*)(y + r * n), (__m256i)_mm512_cvtneps_pbh(acc[r]));
}
#else
// Portable: the same sums in the same order, one output at a time.
template <Format F, int R>
NO_REASSOCIATION void group_rows(const QuantizedRows& x, int64_t first, int64_t k,
                                 const uint8_t* group, c10::BFloat16* y, int64_t n) {
  using L = Layout<F>;
  const int64_t blocks = k / kBlock;
  for (int r = 0; r < R; ++r) {
    const int64_t row = first + r;
    for (int64_t lane = 0; lane < kLanes; ++lane) {
      float total = 0.0f;
      for (int64_t b = 0; b < blocks; ++b) {
        const uint8_t* block = group + b * L::kBlockBytes;
        int32_t dot = 0;
        for (int64_t i = 0; i < kBlock; ++i) {
          int32_t w;
          if constexpr (F == Format::kQ4_1) {
            const uint8_t byte = block[64 * (i / 8) + 4 * lane + i % 4];
            w = (i % 8) < 4 ? (byte & 0x0F) : (byte >> 4);
          } else {
            w = block[64 * (i / 4) + 4 * lane + i % 4];
          }
          dot += w * x.q[row * k + b * kBlock + i];
        }
        const int64_t at = row * blocks + b;
        if constexpr (F == Format::kQ8_0) dot -= 128 * x.q_sums[at];
        c10::Half d;
        std::memcpy(&d, block + L::kWeightBytes + 2 * lane, 2);
        total = std::fma(static_cast<float>(dot), static_cast<float>(d) * x.scales[at], total);
        if constexpr (F == Format::kQ4_1) {
          c10::Half m;
          std::memcpy(&m, block + L::kWeightBytes + 32 + 2 * lane, 2);
          total = std::fma(static_cast<float>(m), x.sums[at], total);
        }
      }
      y[r * n + lane] = c10::BFloat16(total);
    }
  }
}
#endif

template <Format F>
void gguf_matmul(const QuantizedRows& x, int64_t rows, int64_t k, const uint8_t* w, int64_t n,
                 c10::BFloat16* y) {
  const int64_t group_bytes = k / kBlock * Layout<F>::kBlockBytes;
  at::parallel_for(0, n / kLanes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const uint8_t* group = w + g * group_bytes;
      for (int64_t r = 0; r < rows; r += kMaxPassRows) {
        c10::BFloat16* out = y + r * n + g * kLanes;
        switch (std::min<int64_t>(kMaxPassRows, rows - r)) {
          case 1: group_rows<F, 1>(x, r, k, group, out, n); break;
          case 2: group_rows<F, 2>(x, r, k, group, out, n); break;
          case 3: group_rows<F, 3>(x, r, k, group, out, n); break;
          case 4: group_rows<F, 4>(x, r, k, group, out, n); break;
          case 5: group_rows<F, 5>(x, r, k, group, out, n); break;
          case 6: group_rows<F, 6>(x, r, k, group, out, n); break;
          case 7: group_rows<F, 7>(x, r, k, group, out, n); break;
          default: group_rows<F, 8>(x, r, k, group, out, n); break;
        }
      }
    }
  });
}

// [N, K / 32] float16 constants -> [N / 16, K / 32, 32] bytes: per group and block, the 16
// outputs' values.
at::Tensor per_block(const at::Tensor& t, int64_t n, int64_t blocks) {
  return t.contiguous().view({n / kLanes, kLanes, blocks}).permute({0, 2, 1}).contiguous()
      .view(at::kByte);
}

void check_pack_shapes(const at::Tensor& q, const at::Tensor& d, const char* what) {
  TORCH_CHECK(q.device().is_cpu() && q.dim() == 2, what, " takes q [N, K] on the CPU");
  const int64_t n = q.size(0), k = q.size(1);
  TORCH_CHECK(n % kLanes == 0 && k % kBlock == 0, what, " needs N a multiple of ", kLanes,
              " and K of ", kBlock, ", got [", n, ", ", k, "]");
  TORCH_CHECK(d.scalar_type() == at::kHalf && d.dim() == 2 && d.size(0) == n &&
                  d.size(1) == k / kBlock,
              what, ": the block constants must be float16 [N, K / 32]");
}

}  // namespace

namespace rillm {

// x [rows, K] bfloat16 -> (q [rows, K] int8, scales [rows, K / 32] float32, sums [rows, K / 32]
// float32, q_sums [rows, K / 32] int32): each block of 32 of a row as int8 with its scale s
// (absmax / 127), the sum of its int8 values and that sum times s.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> q8_quantize_blocks(
    const at::Tensor& x_in) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.dim() == 2 && x_in.scalar_type() == at::kBFloat16,
              "q8_quantize_blocks takes x [rows, K] bfloat16 on the CPU");
  TORCH_CHECK(x_in.size(1) % kBlock == 0, "K must be a multiple of ", kBlock, ", got ",
              x_in.size(1));
  const auto x = x_in.contiguous();
  const int64_t rows = x.size(0), k = x.size(1), blocks = k / kBlock;
  auto q = at::empty({rows, k}, x.options().dtype(at::kChar));
  auto scales = at::empty({rows, blocks}, x.options().dtype(at::kFloat));
  auto sums = at::empty({rows, blocks}, x.options().dtype(at::kFloat));
  auto q_sums = at::empty({rows, blocks}, x.options().dtype(at::kInt));
  const QuantizedRows out{q.data_ptr<int8_t>(), scales.data_ptr<float>(), sums.data_ptr<float>(),
                          q_sums.data_ptr<int32_t>()};
  const auto* data = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) quantize_row(data + i * k, k, out, i);
  });
  return {q, scales, sums, q_sums};
}

at::Tensor gguf_linear(const at::Tensor& x, const at::Tensor& packed) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.scalar_type() == at::kBFloat16,
              "gguf_linear takes x [rows, K] bfloat16 on the CPU");
  const int64_t bytes = packed.dim() == 3 ? packed.size(2) : 0;
  const bool q4_1 = bytes == Layout<Format::kQ4_1>::kBlockBytes;
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                  (q4_1 || bytes == Layout<Format::kQ8_0>::kBlockBytes),
              "packed must be contiguous uint8 [N / 16, K / 32, bytes a block] (from "
              "gguf_pack_q4_1 or gguf_pack_q8_0)");
  const int64_t rows = x.size(0), k = x.size(1), n = packed.size(0) * kLanes;
  TORCH_CHECK(packed.size(1) * kBlock == k, "x has ", k, " columns, the weights ",
              packed.size(1) * kBlock);
  auto y = at::empty({rows, n}, x.options());
  if (rows == 0) return y;
  const auto [q, scales, sums, q_sums] = q8_quantize_blocks(x);
  const QuantizedRows xq{q.data_ptr<int8_t>(), scales.data_ptr<float>(), sums.data_ptr<float>(),
                         q_sums.data_ptr<int32_t>()};
  const uint8_t* w = packed.data_ptr<uint8_t>();
  auto* yd = y.data_ptr<c10::BFloat16>();
  if (q4_1) {
    gguf_matmul<Format::kQ4_1>(xq, rows, k, w, n, yd);
  } else {
    gguf_matmul<Format::kQ8_0>(xq, rows, k, w, n, yd);
  }
  return y;
}

// q [N, K] uint8 in [0, 16), d and m [N, K / 32] float16 -> [N / 16, K / 32, 320] uint8.
at::Tensor gguf_pack_q4_1(const at::Tensor& q, const at::Tensor& d, const at::Tensor& m) {
  check_pack_shapes(q, d, "gguf_pack_q4_1");
  TORCH_CHECK(q.scalar_type() == at::kByte && m.sizes() == d.sizes() &&
                  m.scalar_type() == at::kHalf,
              "gguf_pack_q4_1 takes q uint8 and m float16 shaped as d");
  const int64_t n = q.size(0), k = q.size(1), blocks = k / kBlock;
  TORCH_CHECK(n == 0 || q.max().item<uint8_t>() < 16, "gguf_pack_q4_1: q must lie in [0, 16)");
  // [N/16, 16 lanes, blocks, 4 registers, 2 halves, 4 bytes] -> one byte per (half 0, half 1).
  const auto split = q.contiguous().view({n / kLanes, kLanes, blocks, 4, 2, 4});
  const auto nibbles =
      at::bitwise_or(split.select(4, 0), at::bitwise_left_shift(split.select(4, 1), 4))
          .permute({0, 2, 3, 1, 4})  // [N/16, blocks, 4 registers, 16 lanes, 4 bytes]
          .reshape({n / kLanes, blocks, Layout<Format::kQ4_1>::kWeightBytes});
  return at::cat({nibbles, per_block(d, n, blocks), per_block(m, n, blocks)}, 2).contiguous();
}

// q [N, K] int8, d [N, K / 32] float16 -> [N / 16, K / 32, 544] uint8.
at::Tensor gguf_pack_q8_0(const at::Tensor& q, const at::Tensor& d) {
  check_pack_shapes(q, d, "gguf_pack_q8_0");
  TORCH_CHECK(q.scalar_type() == at::kChar, "gguf_pack_q8_0 takes q int8");
  const int64_t n = q.size(0), k = q.size(1), blocks = k / kBlock;
  // q + 128 as uint8, [N/16, 16 lanes, blocks, 8 registers, 4 bytes] -> registers by lane.
  const auto shifted = at::bitwise_xor(q.contiguous().view(at::kByte), 0x80);
  const auto bytes = shifted.view({n / kLanes, kLanes, blocks, 8, 4})
                         .permute({0, 2, 3, 1, 4})
                         .reshape({n / kLanes, blocks, Layout<Format::kQ8_0>::kWeightBytes});
  return at::cat({bytes, per_block(d, n, blocks)}, 2).contiguous();
}

}  // namespace rillm

TORCH_LIBRARY_FRAGMENT(rillm, m) {
  m.def("q8_quantize_blocks(Tensor x) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("gguf_linear(Tensor x, Tensor packed) -> Tensor");
  m.def("gguf_pack_q4_1(Tensor q, Tensor d, Tensor m) -> Tensor");
  m.def("gguf_pack_q8_0(Tensor q, Tensor d) -> Tensor");
  m.impl("q8_quantize_blocks", c10::DispatchKey::CPU, &rillm::q8_quantize_blocks);
  m.impl("gguf_linear", c10::DispatchKey::CPU, &rillm::gguf_linear);
  m.impl("gguf_pack_q4_1", c10::DispatchKey::CPU, &rillm::gguf_pack_q4_1);
  m.impl("gguf_pack_q8_0", c10::DispatchKey::CPU, &rillm::gguf_pack_q8_0);
}
