// y = x W^T with W in a GGUF file's own quantized blocks and x rounded to int8 per block of 32
// (CPU): integer dot products on VNNI's vpdpbusd, the arithmetic llama.cpp runs these formats
// with, for Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q5_K and Q6_K.
//
// Every format is, per block of 32 weights of one output, unsigned integers u of 4, 5, 6 or 8
// bits with float constants (rillm/loader/gguf_blocks.py decodes the file's bytes to these):
//   zero-point formats   w = a * (u - z)      Q4_0 (z 8), Q5_0 (16), Q8_0 (128), Q6_K (32)
//   offset formats       w = a * u + b        Q4_1 (b = m), Q4_K and Q5_K (b = -dmin * m)
// a and b are the file's float16 d (and m) for the 32-weight formats; for the K-quants the
// super-block scale times the sub-block's integer scale, exact in float32 (Q6_K has two scales
// a block, one per 16 weights).
//
// Each row of x (bfloat16) is cut into blocks of 32 and each block rounded to int8 with its
// own scale: s = absmax / 127, qx = round-half-even(x * (127 / absmax)). Per output and block
//   zero-point:  sum_{k in b} x_k w_k ~ a * s * (sum u_k qx_k - z * sum qx_k)
//   offset:      sum_{k in b} x_k w_k ~ a * s * sum u_k qx_k + b * s * sum qx_k
// with the sums of integers exact in int32 (vpdpbusd multiplies unsigned by signed bytes, 64
// products an instruction); the blocks are summed in float32 in order and the result rounded
// to bfloat16 (or, with `float_out`, the lm_head's logits, left in float32). A row's result
// does not depend on the other rows of the batch.
//
// The offset term takes the block's sum as rounded (s * sum qx), not the exact sum of x: then
// the rounding error of x meets the weights a * u + b, which are centred near zero, rather
// than a * u alone. With the exact sum the error of a layer's output was 2-3x larger and the
// default model's perplexity 1.1% above float32's; with this, within 0.6%.
//
// llama.cpp rounds the activations of its K-quant products per 256 (Q8_K); here every format
// takes blocks of 32, finer, so the activations of a fused projection are rounded once for
// parts of any formats, and a Q4_K_M file's mix runs in one call.
//
// Layout (rillm/kernels/gguf_pack.py): the outputs in groups of kLanes = 16, each group block
// by block. A 32-bit lane of a 64-byte register holds four consecutive weights of one output,
// the order vpdpbusd multiplies them in against four broadcast bytes of x: "quad" t of a block
// is its inputs 4 t .. 4 t + 3, byte 4 * lane + j of its register the weight at 4 t + j.
//   8 bits: eight registers of u.
//   4-6 bits: four registers of nibbles, register t holding quad 2 t in its low nibbles and
//     quad 2 t + 1 in its high ones; then per bit above the fourth, a plane of eight 64-bit
//     masks, mask t's bit 4 * lane + j being that bit of quad t's weight (vpaddb under mask).
//   Then a (16 float16 or float32; Q6_K: 2 x 16 float32), then b (offset formats).
// The bytes a block (16 outputs x 32 inputs) are distinct for every format and name it.
//
// Registered as torch.ops.rillm.gguf_linear and q8_quantize_blocks (see
// rillm/kernels/__init__.py); decode_layer calls gguf_linear directly.

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
#include <type_traits>
#include <vector>

#include "kernels.h"

namespace {

// The library is built with -fassociative-math; these functions keep the order of their
// float sums, so that a row's result is the same whatever rows come with it.
#define NO_REASSOCIATION __attribute__((optimize("no-associative-math")))

constexpr int64_t kBlock = 32;  // inputs per activation scale
constexpr int64_t kLanes = 16;  // outputs per group: one per 32-bit lane of a register
constexpr int kMaxPassRows = 8;  // rows of x per pass over a group's weights

enum class Format { kQ4_0, kQ4_1, kQ5_0, kQ8_0, kQ4_K, kQ5_K, kQ6_K };

struct Spec {
  int bits;     // of u
  int zero;     // z of a zero-point format; 0: an offset format
  bool half;    // a (and b) as float16, else float32
  bool sub16;   // two scales a block (one per 16 inputs)
};

constexpr Spec spec(Format f) {
  switch (f) {
    case Format::kQ4_0: return {4, 8, true, false};
    case Format::kQ4_1: return {4, 0, true, false};
    case Format::kQ5_0: return {5, 16, true, false};
    case Format::kQ8_0: return {8, 128, true, false};
    case Format::kQ4_K: return {4, 0, false, false};
    case Format::kQ5_K: return {5, 0, false, false};
    case Format::kQ6_K: return {6, 32, false, true};
  }
  return {0, 0, false, false};
}

template <Format F>
struct Layout {
  static constexpr Spec kSpec = spec(F);
  static constexpr int64_t kWeightBytes =
      kSpec.bits == 8 ? kLanes * kBlock : kLanes * kBlock / 2 + (kSpec.bits - 4) * 64;
  static constexpr int64_t kConstBytes = kSpec.half ? 2 * kLanes : 4 * kLanes;
  static constexpr int64_t kScaleBytes = kConstBytes * (kSpec.sub16 ? 2 : 1);
  static constexpr int64_t kBlockBytes =
      kWeightBytes + kScaleBytes + (kSpec.zero == 0 ? kConstBytes : 0);
};

constexpr int64_t block_bytes(Format f) {
  switch (f) {
    case Format::kQ4_0: return Layout<Format::kQ4_0>::kBlockBytes;
    case Format::kQ4_1: return Layout<Format::kQ4_1>::kBlockBytes;
    case Format::kQ5_0: return Layout<Format::kQ5_0>::kBlockBytes;
    case Format::kQ8_0: return Layout<Format::kQ8_0>::kBlockBytes;
    case Format::kQ4_K: return Layout<Format::kQ4_K>::kBlockBytes;
    case Format::kQ5_K: return Layout<Format::kQ5_K>::kBlockBytes;
    case Format::kQ6_K: return Layout<Format::kQ6_K>::kBlockBytes;
  }
  return 0;
}

constexpr Format kFormats[] = {Format::kQ4_0, Format::kQ4_1, Format::kQ5_0, Format::kQ8_0,
                               Format::kQ4_K, Format::kQ5_K, Format::kQ6_K};

// The format whose blocks are `bytes` long; false if none is.
bool format_of(int64_t bytes, Format* out) {
  for (Format f : kFormats) {
    if (block_bytes(f) == bytes) {
      *out = f;
      return true;
    }
  }
  return false;
}

using rillm::bf16_to_float;

// Where one row of x goes: per block of 32, its int8 values, scale s, sum as rounded
// (s * sum q), the sum of its int8 values and of each half's.
struct QuantizedRows {
  int8_t* q;
  float* scales;
  float* sums;
  int32_t* q_sums;
  int32_t* half_sums;  // [rows, K / 16]
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
    const int32_t sum_lo = _mm512_reduce_add_epi32(q_lo), sum_hi = _mm512_reduce_add_epi32(q_hi);
    out.half_sums[2 * (i * blocks + b)] = sum_lo;
    out.half_sums[2 * (i * blocks + b) + 1] = sum_hi;
    out.q_sums[i * blocks + b] = sum_lo + sum_hi;
    out.sums[i * blocks + b] = static_cast<float>(sum_lo + sum_hi) * (absmax / 127.0f);
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
    int32_t half[2] = {0, 0};
    for (int t = 0; t < kBlock; ++t) {
      const float r = std::min(127.0f, std::max(-127.0f, std::nearbyint(values[t] * inv)));
      out.q[i * k + b * kBlock + t] = static_cast<int8_t>(r);
      half[t / 16] += static_cast<int32_t>(r);
    }
    out.scales[i * blocks + b] = absmax / 127.0f;
    out.half_sums[2 * (i * blocks + b)] = half[0];
    out.half_sums[2 * (i * blocks + b) + 1] = half[1];
    out.q_sums[i * blocks + b] = half[0] + half[1];
    out.sums[i * blocks + b] = static_cast<float>(half[0] + half[1]) * (absmax / 127.0f);
  }
}
#endif

#ifdef RILLM_AVX512_VNNI
// 16 constants of a group (float16 or float32) as float32.
template <bool kHalf>
inline __m512 load_constants(const uint8_t* at) {
  if constexpr (kHalf) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)at));
  return _mm512_loadu_ps(at);
}

inline __mmask64 load_mask(const uint8_t* at) {
  uint64_t bits;
  std::memcpy(&bits, at, sizeof bits);
  return _cvtu64_mask64(bits);
}

// R rows of x (quantized, starting at row `first`) against one group of 16 outputs, block by
// block; y points at the group's first output of row `first`.
template <Format F, int R, typename T>
NO_REASSOCIATION void group_rows(const QuantizedRows& x, int64_t first, int64_t k,
                                 const uint8_t* group, T* y, int64_t n) {
  using L = Layout<F>;
  constexpr Spec S = L::kSpec;
  const int64_t blocks = k / kBlock;
  const int8_t* q = x.q + first * k;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* block = group + b * L::kBlockBytes;
    __m512i dot[R], dot_hi[R];  // dot_hi: the second 16 inputs, where they have their own a
    for (int r = 0; r < R; ++r) dot[r] = dot_hi[r] = _mm512_setzero_si512();
    // Quad t of the block's inputs, for every row.
    auto add = [&](int t, __m512i weights) {
      for (int r = 0; r < R; ++r) {
        int32_t four;
        std::memcpy(&four, q + r * k + b * kBlock + 4 * t, sizeof four);
        const __m512i xs = _mm512_set1_epi32(four);
        if (S.sub16 && t >= 4) {
          dot_hi[r] = _mm512_dpbusd_epi32(dot_hi[r], weights, xs);
        } else {
          dot[r] = _mm512_dpbusd_epi32(dot[r], weights, xs);
        }
      }
    };
    // The high bits of quad t's weights (planes after the nibbles).
    auto high_bits = [&](int t, __m512i low) {
      if constexpr (S.bits >= 5)
        low = _mm512_mask_add_epi8(low, load_mask(block + 256 + 8 * t), low,
                                   _mm512_set1_epi8(16));
      if constexpr (S.bits >= 6)
        low = _mm512_mask_add_epi8(low, load_mask(block + 320 + 8 * t), low,
                                   _mm512_set1_epi8(32));
      return low;
    };
    if constexpr (S.bits == 8) {
      for (int t = 0; t < 8; ++t) add(t, _mm512_loadu_si512(block + 64 * t));
    } else {
      for (int t = 0; t < 4; ++t) {
        const __m512i nibbles = _mm512_loadu_si512(block + 64 * t);
        add(2 * t, high_bits(2 * t, _mm512_and_si512(nibbles, low4)));
        add(2 * t + 1, high_bits(2 * t + 1, _mm512_and_si512(_mm512_srli_epi16(nibbles, 4), low4)));
      }
    }
    const uint8_t* constants = block + L::kWeightBytes;
    const __m512 a = load_constants<S.half>(constants);
    const __m512 a_hi = S.sub16 ? load_constants<S.half>(constants + L::kConstBytes) : a;
    for (int r = 0; r < R; ++r) {
      const int64_t at = (first + r) * blocks + b;
      const __m512 s = _mm512_set1_ps(x.scales[at]);
      if constexpr (S.sub16) {
        const __m512i lo = _mm512_sub_epi32(dot[r], _mm512_set1_epi32(S.zero * x.half_sums[2 * at]));
        const __m512i hi =
            _mm512_sub_epi32(dot_hi[r], _mm512_set1_epi32(S.zero * x.half_sums[2 * at + 1]));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), _mm512_mul_ps(a, s), acc[r]);
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), _mm512_mul_ps(a_hi, s), acc[r]);
      } else {
        __m512i d = dot[r];
        if constexpr (S.zero != 0) d = _mm512_sub_epi32(d, _mm512_set1_epi32(S.zero * x.q_sums[at]));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(a, s), acc[r]);
      }
    }
    if constexpr (S.zero == 0) {
      const __m512 offset = load_constants<S.half>(constants + L::kScaleBytes);
      for (int r = 0; r < R; ++r)
        acc[r] = _mm512_fmadd_ps(offset, _mm512_set1_ps(x.sums[(first + r) * blocks + b]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    if constexpr (std::is_same_v<T, float>) {
      _mm512_storeu_ps(y + r * n, acc[r]);
    } else {
      _mm256_storeu_si256((__m256i*)(y + r * n), (__m256i)_mm512_cvtneps_pbh(acc[r]));
    }
  }
}
#else
template <bool kHalf>
inline float constant_at(const uint8_t* at, int64_t lane) {
  if constexpr (kHalf) {
    c10::Half h;
    std::memcpy(&h, at + 2 * lane, 2);
    return static_cast<float>(h);
  }
  float f;
  std::memcpy(&f, at + 4 * lane, 4);
  return f;
}

// Weight i of the block of output `lane`, u as stored.
template <Format F>
inline int32_t weight_at(const uint8_t* block, int64_t lane, int64_t i) {
  constexpr Spec S = spec(F);
  const int64_t t = i / 4, byte = 4 * lane + i % 4;
  if constexpr (S.bits == 8) return block[64 * t + byte];
  const uint8_t nibbles = block[64 * (t / 2) + byte];
  int32_t u = t % 2 == 0 ? (nibbles & 0x0F) : (nibbles >> 4);
  for (int p = 4; p < S.bits; ++p)
    u |= ((block[256 + 64 * (p - 4) + 8 * t + byte / 8] >> (byte % 8)) & 1) << p;
  return u;
}

// Portable: the same sums in the same order, one output at a time.
template <Format F, int R, typename T>
NO_REASSOCIATION void group_rows(const QuantizedRows& x, int64_t first, int64_t k,
                                 const uint8_t* group, T* y, int64_t n) {
  using L = Layout<F>;
  constexpr Spec S = L::kSpec;
  const int64_t blocks = k / kBlock;
  for (int r = 0; r < R; ++r) {
    const int64_t row = first + r;
    for (int64_t lane = 0; lane < kLanes; ++lane) {
      float total = 0.0f;
      for (int64_t b = 0; b < blocks; ++b) {
        const uint8_t* block = group + b * L::kBlockBytes;
        int32_t dot[2] = {0, 0};
        for (int64_t i = 0; i < kBlock; ++i)
          dot[S.sub16 && i >= 16] += weight_at<F>(block, lane, i) * x.q[row * k + b * kBlock + i];
        const int64_t at = row * blocks + b;
        const float s = x.scales[at];
        const uint8_t* constants = block + L::kWeightBytes;
        if constexpr (S.sub16) {
          const float a_lo = constant_at<S.half>(constants, lane);
          const float a_hi = constant_at<S.half>(constants + L::kConstBytes, lane);
          total = std::fma(static_cast<float>(dot[0] - S.zero * x.half_sums[2 * at]), a_lo * s,
                           total);
          total = std::fma(static_cast<float>(dot[1] - S.zero * x.half_sums[2 * at + 1]),
                           a_hi * s, total);
        } else {
          const int32_t d = dot[0] - S.zero * x.q_sums[at];
          total = std::fma(static_cast<float>(d), constant_at<S.half>(constants, lane) * s, total);
          if constexpr (S.zero == 0)
            total = std::fma(constant_at<S.half>(constants + L::kScaleBytes, lane), x.sums[at],
                             total);
        }
      }
      y[r * n + lane] = T(total);
    }
  }
}
#endif

// All rows of x against one group of 16 outputs, in passes of up to kMaxPassRows rows.
template <Format F, typename T>
void group_all_rows(const QuantizedRows& x, int64_t rows, int64_t k, const uint8_t* group,
                    T* y, int64_t n) {
  for (int64_t r = 0; r < rows; r += kMaxPassRows) {
    T* out = y + r * n;
    switch (std::min<int64_t>(kMaxPassRows, rows - r)) {
      case 1: group_rows<F, 1, T>(x, r, k, group, out, n); break;
      case 2: group_rows<F, 2, T>(x, r, k, group, out, n); break;
      case 3: group_rows<F, 3, T>(x, r, k, group, out, n); break;
      case 4: group_rows<F, 4, T>(x, r, k, group, out, n); break;
      case 5: group_rows<F, 5, T>(x, r, k, group, out, n); break;
      case 6: group_rows<F, 6, T>(x, r, k, group, out, n); break;
      case 7: group_rows<F, 7, T>(x, r, k, group, out, n); break;
      default: group_rows<F, 8, T>(x, r, k, group, out, n); break;
    }
  }
}

template <typename T>
void group_dispatch(Format f, const QuantizedRows& x, int64_t rows, int64_t k,
                    const uint8_t* group, T* y, int64_t n) {
  switch (f) {
    case Format::kQ4_0: group_all_rows<Format::kQ4_0, T>(x, rows, k, group, y, n); break;
    case Format::kQ4_1: group_all_rows<Format::kQ4_1, T>(x, rows, k, group, y, n); break;
    case Format::kQ5_0: group_all_rows<Format::kQ5_0, T>(x, rows, k, group, y, n); break;
    case Format::kQ8_0: group_all_rows<Format::kQ8_0, T>(x, rows, k, group, y, n); break;
    case Format::kQ4_K: group_all_rows<Format::kQ4_K, T>(x, rows, k, group, y, n); break;
    case Format::kQ5_K: group_all_rows<Format::kQ5_K, T>(x, rows, k, group, y, n); break;
    case Format::kQ6_K: group_all_rows<Format::kQ6_K, T>(x, rows, k, group, y, n); break;
  }
}

// One packed part of a matrix: its format, its groups' bytes and its first group overall.
struct Part {
  Format format;
  const uint8_t* data;
  int64_t group_bytes;
  int64_t first_group;
};

}  // namespace

namespace rillm {

struct Quantized {
  at::Tensor q, scales, sums, q_sums, half_sums;
  QuantizedRows rows() const {
    return {q.data_ptr<int8_t>(), scales.data_ptr<float>(), sums.data_ptr<float>(),
            q_sums.data_ptr<int32_t>(), half_sums.data_ptr<int32_t>()};
  }
};

Quantized quantize(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.dim() == 2 && x_in.scalar_type() == at::kBFloat16,
              "gguf_linear takes x [rows, K] bfloat16 on the CPU");
  TORCH_CHECK(x_in.size(1) % kBlock == 0, "K must be a multiple of ", kBlock, ", got ",
              x_in.size(1));
  const auto x = x_in.contiguous();
  const int64_t rows = x.size(0), k = x.size(1), blocks = k / kBlock;
  Quantized out{at::empty({rows, k}, x.options().dtype(at::kChar)),
                at::empty({rows, blocks}, x.options().dtype(at::kFloat)),
                at::empty({rows, blocks}, x.options().dtype(at::kFloat)),
                at::empty({rows, blocks}, x.options().dtype(at::kInt)),
                at::empty({rows, 2 * blocks}, x.options().dtype(at::kInt))};
  const QuantizedRows rows_out = out.rows();
  const auto* data = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) quantize_row(data + i * k, k, rows_out, i);
  });
  return out;
}

// x [rows, K] bfloat16 -> (q [rows, K] int8, scales [rows, K / 32] float32, sums [rows, K / 32]
// float32, q_sums [rows, K / 32] int32, half_sums [rows, K / 16] int32): each block of 32 of a
// row as int8 with its scale s (absmax / 127), the sum of its int8 values (and of each half's)
// and that sum times s.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> q8_quantize_blocks(
    const at::Tensor& x) {
  auto out = quantize(x);
  return {out.q, out.scales, out.sums, out.q_sums, out.half_sums};
}

at::Tensor gguf_linear(const at::Tensor& x, at::TensorList packed, bool float_out) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.scalar_type() == at::kBFloat16,
              "gguf_linear takes x [rows, K] bfloat16 on the CPU");
  TORCH_CHECK(!packed.empty(), "gguf_linear takes at least one packed matrix");
  const int64_t rows = x.size(0), k = x.size(1);
  std::vector<Part> parts;
  int64_t groups = 0;
  for (const auto& p : packed) {
    Format format;
    TORCH_CHECK(p.scalar_type() == at::kByte && p.is_contiguous() && p.dim() == 3 &&
                    format_of(p.size(2), &format),
                "packed matrices must be contiguous uint8 [N / 16, K / 32, bytes a block] "
                "(from rillm.kernels.gguf_pack)");
    TORCH_CHECK(p.size(1) * kBlock == k, "x has ", k, " columns, the weights ",
                p.size(1) * kBlock);
    parts.push_back({format, p.data_ptr<uint8_t>(), p.size(1) * p.size(2), groups});
    groups += p.size(0);
  }
  const int64_t n = groups * kLanes;
  auto y = at::empty({rows, n}, x.options().dtype(float_out ? at::kFloat : at::kBFloat16));
  if (rows == 0) return y;
  const auto quantized = quantize(x);
  const QuantizedRows xq = quantized.rows();
  auto run = [&](auto* yd) {
    at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
      size_t p = 0;
      for (int64_t g = begin; g < end; ++g) {
        while (p + 1 < parts.size() && parts[p + 1].first_group <= g) ++p;
        const Part& part = parts[p];
        group_dispatch(part.format, xq, rows, k,
                       part.data + (g - part.first_group) * part.group_bytes, yd + g * kLanes,
                       n);
      }
    });
  };
  if (float_out) {
    run(y.data_ptr<float>());
  } else {
    run(y.data_ptr<c10::BFloat16>());
  }
  return y;
}

// The bytes a block of 16 outputs x 32 inputs takes in each format, in the order
// Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K: what rillm.kernels.gguf_pack writes.
std::vector<int64_t> gguf_block_bytes() {
  std::vector<int64_t> out;
  for (Format f : kFormats) out.push_back(block_bytes(f));
  return out;
}

}  // namespace rillm

TORCH_LIBRARY_FRAGMENT(rillm, m) {
  m.def("q8_quantize_blocks(Tensor x) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("gguf_linear(Tensor x, Tensor[] packed, bool float_out=False) -> Tensor");
  m.def("gguf_block_bytes() -> int[]", &rillm::gguf_block_bytes);
  m.impl("q8_quantize_blocks", c10::DispatchKey::CPU, &rillm::q8_quantize_blocks);
  m.impl("gguf_linear", c10::DispatchKey::CPU, &rillm::gguf_linear);
}
