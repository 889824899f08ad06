// An int8 x int8 linear layer for `quantization="int8"` (CPU): each row of the bfloat16 input
// is quantized on the fly to int8 with its own scale (symmetric, absmax / 127), multiplied by
// int8 weights that carry one scale per output row, and the int32 sums are scaled back:
//
//   y[i, j] = bf16((float(sum_k xq[i, k] wq[j, k]) * sw[j]) * sx[i])
//
// VNNI's vpdpbusd does 64 multiply-adds an instruction where vdpbf16ps does 32, and int8
// weights are half the bytes of bfloat16. The matmul is, by the weight's layout:
// - rillm::int8_pack's (decode batches, up to kMaxPackedRows rows): the loop below, near
//   memory speed; oneDNN's reads the weights at about half of it at 8 rows;
// - onednn::qlinear_prepack's (prefill, larger batches): oneDNN's int8 matmul, 1.5-2x its
//   bfloat16 one from 32 rows up; x goes in as uint8 q + 128 with zero point 128, and it
//   returns float(acc) * sw;
// - plain int8 [out, in] (no oneDNN): at::_int_mm.
// The quantization and the scale back are written here because as PyTorch ops they are five
// to seven passes over the data each, as slow as the matmul at prefill sizes.
//
// With `rotate`, each block of 64 inputs is first multiplied by the orthonormal Hadamard
// matrix H/8 (a fast Walsh-Hadamard transform in registers); the weights were multiplied by
// the same matrix when they were quantized, so x W^T = (x H/8)(W H/8)^T. A few channels of
// this model's activations are far larger than the rest, and one scale a row rounds the rest
// to a handful of levels; the rotation spreads each such channel over its 64-block. Measured
// on the default model (bench/perplexity.py): mean KL from float32 0.035 without, 0.0056 with.
//
// The roundings are those of the PyTorch code in rillm/model/int4_linear.py
// (`quantize_rows_reference`, Int8Weight): the same butterflies in the same order, then
// q = round-half-even(x * (127 / absmax)) clamped to +-127; the scale back is
// ((float(acc) * sw) * sx), rounded to bfloat16 to nearest even; all three matmuls give the
// same exact int32 sums. A row of zeros has scale 0 and quantizes to zeros.
//
// Registered as torch.ops.rillm.int8_quantize_rows / int8_linear / int8_pack (see
// rillm/kernels/__init__.py); decode_layer.cpp calls int8_linear directly.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "kernels.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define RILLM_INT8_AVX512 1
#endif

namespace {

// The library is built with -fassociative-math, which lets the compiler turn x * (127 / absmax)
// into (x * 127) / absmax and (acc * sw) * sx into acc * (sw * sx): other roundings.
#define NO_REASSOCIATION __attribute__((optimize("no-associative-math")))


using rillm::bf16_to_float;

#ifdef RILLM_INT8_AVX512
// One butterfly stage within a register: lane i meets lane i ^ h (t); lower lanes get a + b,
// upper lanes (`upper`) t - v = a - b.
inline __m512 butterfly(__m512 v, __m512 t, __mmask16 upper) {
  return _mm512_mask_sub_ps(_mm512_add_ps(v, t), upper, t, v);
}

// 64 bfloat16 values times the Hadamard matrix of order 64 over 8 (orthonormal) into 64 floats:
// butterflies (a, b) -> (a + b, a - b) at strides 1, 2, 4, 8, 16, 32 in that order, a the
// lower index.
NO_REASSOCIATION void rotate64(const uint16_t* x, float* out) {
  __m512 r[4];
  for (int i = 0; i < 4; ++i) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(x + 16 * i)));
    r[i] = _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
  for (int i = 0; i < 4; ++i) {
    __m512 v = r[i];
    v = butterfly(v, _mm512_permute_ps(v, 0xB1), 0xAAAA);          // stride 1
    v = butterfly(v, _mm512_permute_ps(v, 0x4E), 0xCCCC);          // stride 2
    v = butterfly(v, _mm512_shuffle_f32x4(v, v, 0xB1), 0xF0F0);    // stride 4
    r[i] = butterfly(v, _mm512_shuffle_f32x4(v, v, 0x4E), 0xFF00);  // stride 8
  }
  for (int h = 1; h <= 2; h *= 2) {  // strides 16 and 32: whole registers
    for (int i = 0; i < 4; ++i) {
      if (i & h) continue;
      const __m512 a = r[i], b = r[i + h];
      r[i] = _mm512_add_ps(a, b);
      r[i + h] = _mm512_sub_ps(a, b);
    }
  }
  const __m512 eighth = _mm512_set1_ps(0.125f);
  for (int i = 0; i < 4; ++i) _mm512_storeu_ps(out + 16 * i, _mm512_mul_ps(r[i], eighth));
}
#else
NO_REASSOCIATION void rotate64(const uint16_t* x, float* out) {
  for (int i = 0; i < 64; ++i) out[i] = bf16_to_float(x[i]);
  for (int h = 1; h < 64; h *= 2) {
    for (int i = 0; i < 64; ++i) {
      if (i & h) continue;
      const float a = out[i], b = out[i + h];
      out[i] = a + b;
      out[i + h] = a - b;
    }
  }
  for (int i = 0; i < 64; ++i) out[i] *= 0.125f;
}
#endif

// One row: to float32 (rotated by 64-blocks with `rotate`), its absmax, then the int8 values
// (as uint8 q + 128 with `offset`); returns the row's scale (absmax / 127). `work`: n floats.
NO_REASSOCIATION float quantize_row(const uint16_t* x, int64_t n, bool rotate, bool offset,
                                    float* work, int8_t* out, int32_t* sum) {
  if (rotate) {
    for (int64_t k = 0; k < n; k += rillm::kInt8Rotation) rotate64(x + k, work + k);
  } else {
    for (int64_t k = 0; k < n; ++k) work[k] = bf16_to_float(x[k]);
  }
  int64_t k = 0;
  float absmax = 0.0f;
#ifdef RILLM_INT8_AVX512
  __m512 top = _mm512_setzero_ps();
  for (; k + 16 <= n; k += 16) top = _mm512_max_ps(top, _mm512_abs_ps(_mm512_loadu_ps(work + k)));
  absmax = _mm512_reduce_max_ps(top);
#endif
  for (; k < n; ++k) absmax = std::max(absmax, std::fabs(work[k]));
  const float inv = absmax > 0.0f ? 127.0f / absmax : 0.0f;
  k = 0;
  int32_t row_sum = 0;
#ifdef RILLM_INT8_AVX512
  const __m512 vinv = _mm512_set1_ps(inv);
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  const __m128i flip = _mm_set1_epi8(static_cast<char>(0x80));  // q ^ 0x80 == q + 128 as uint8
  __m512i total = _mm512_setzero_si512();
  for (; k + 16 <= n; k += 16) {
    const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(work + k), vinv);
    // Round to nearest even (the default rounding mode), then clamp.
    const __m512i q = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(v), lo), hi);
    total = _mm512_add_epi32(total, q);
    const __m128i bytes = _mm512_cvtepi32_epi8(q);
    _mm_storeu_si128((__m128i*)(out + k), offset ? _mm_xor_si128(bytes, flip) : bytes);
  }
  row_sum = _mm512_reduce_add_epi32(total);
#endif
  for (; k < n; ++k) {
    const float q = std::nearbyint(work[k] * inv);
    const auto byte = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, q)));
    out[k] = offset ? static_cast<int8_t>(byte ^ 0x80) : byte;
    row_sum += byte;
  }
  *sum = row_sum;
  return absmax / 127.0f;
}

float scaled(int32_t acc, float sw) { return static_cast<float>(acc) * sw; }
float scaled(float product, float) { return product; }

#ifdef RILLM_INT8_AVX512
__m512 scaled16(const int32_t* acc, const float* sw) {
  return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(acc)), _mm512_loadu_ps(sw));
}
__m512 scaled16(const float* product, const float*) { return _mm512_loadu_ps(product); }
#endif

// out[i, :] = bf16((float(acc[i, :]) * sw[:]) * sx[i]) for rows [begin, end); `acc` is the int32
// sums, or the float products float(acc) * sw that oneDNN's int8 matmul returns.
template <typename acc_t>
NO_REASSOCIATION void scale_rows(const acc_t* acc, const float* sx, const float* sw, int64_t n,
                                 c10::BFloat16* out, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const acc_t* a = acc + i * n;
    c10::BFloat16* y = out + i * n;
    int64_t j = 0;
#ifdef RILLM_INT8_AVX512
    const __m512 row = _mm512_set1_ps(sx[i]);
    for (; j + 16 <= n; j += 16) {
      const __m512 v = _mm512_mul_ps(scaled16(a + j, sw + j), row);
      _mm256_storeu_si256((__m256i*)(y + j), (__m256i)_mm512_cvtneps_pbh(v));
    }
#endif
    for (; j < n; ++j) y[j] = c10::BFloat16(scaled(a[j], sw[j]) * sx[i]);
  }
}

// x (rows of bytes) times a weight packed by onednn::qlinear_prepack: float(acc) * w_scale.
at::Tensor packed_int8_matmul(const at::Tensor& xu8, const at::Tensor& weight,
                              const at::Tensor& scales) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("onednn::qlinear_pointwise", "")
          // The kernel's own signature (registered with arguments by value).
          .typed<at::Tensor(at::Tensor, double, int64_t, at::Tensor, at::Tensor, at::Tensor,
                            std::optional<at::Tensor>, double, int64_t,
                            std::optional<at::ScalarType>, c10::string_view,
                            c10::List<std::optional<at::Scalar>>, c10::string_view)>();
  const auto no_zero_points = at::empty({0}, scales.options().dtype(at::kLong));
  return op.call(xu8, 1.0, 128, weight, scales, no_zero_points, std::nullopt, 1.0, 0, at::kFloat,
                 "none", c10::List<std::optional<at::Scalar>>(), "none");
}

// Few rows (decode batches) times int8 weights at memory speed. oneDNN's int8 matmul reads
// the weights at about half the machine's bandwidth at 8 rows; here each 64-byte load of
// weights (16 output rows x 4 inputs, the layer packed by `int8_pack`) feeds one vpdpbusd per
// input row, up to 8 rows at a time, and a layer's 16-row group stays in L1 while the rows
// pass. vpdpbusd multiplies unsigned by signed bytes: the weights are stored as w + 128 and
// the 128 * sum(q) that adds to a row is taken off at the end (exact in int32).
constexpr int64_t kGroup = 16;  // output rows per packed group
constexpr int kMaxPassRows = 8;  // input rows per pass over a group
constexpr int64_t kMaxPackedRows = 16;  // above, oneDNN's matmul is as fast (measured)

#if defined(RILLM_INT8_AVX512) && defined(__AVX512VNNI__)
constexpr bool kVnni = true;
template <int R>
void group_rows(const int8_t* q, const int32_t* q_sums, int64_t k, const uint8_t* w,
                int32_t* acc, int64_t n) {
  __m512i sums[R];
  for (int r = 0; r < R; ++r) sums[r] = _mm512_setzero_si512();
  for (int64_t s = 0; s < k / 4; ++s) {
    const __m512i weights = _mm512_loadu_si512(w + kGroup * 4 * s);
    for (int r = 0; r < R; ++r) {
      int32_t four;
      std::memcpy(&four, q + r * k + 4 * s, sizeof four);
      sums[r] = _mm512_dpbusd_epi32(sums[r], weights, _mm512_set1_epi32(four));
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m512i offset = _mm512_set1_epi32(128 * q_sums[r]);
    _mm512_storeu_si512(acc + r * n, _mm512_sub_epi32(sums[r], offset));
  }
}
#else
constexpr bool kVnni = false;  // the portable loop below: correct, slow
template <int R>
void group_rows(const int8_t* q, const int32_t* q_sums, int64_t k, const uint8_t* w,
                int32_t* acc, int64_t n) {
  for (int r = 0; r < R; ++r) {
    for (int64_t j = 0; j < kGroup; ++j) {
      int32_t total = 0;
      for (int64_t i = 0; i < k; ++i)
        total += static_cast<int32_t>(q[r * k + i]) * w[(i / 4) * kGroup * 4 + j * 4 + i % 4];
      acc[r * n + j] = total - 128 * q_sums[r];
    }
  }
}
#endif

// acc [rows, n] int32 = q [rows, k] int8 times the packed weights [n / 16, k / 4, 16, 4] uint8.
void packed_rows_matmul(const int8_t* q, const int32_t* q_sums, int64_t rows, int64_t k,
                        const uint8_t* w, int64_t n, int32_t* acc) {
  at::parallel_for(0, n / kGroup, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const uint8_t* group = w + g * kGroup * k;
      for (int64_t r = 0; r < rows; r += kMaxPassRows) {
        const int8_t* x = q + r * k;
        const int32_t* sums = q_sums + r;
        int32_t* out = acc + r * n + g * kGroup;
        switch (std::min<int64_t>(kMaxPassRows, rows - r)) {
          case 1: group_rows<1>(x, sums, k, group, out, n); break;
          case 2: group_rows<2>(x, sums, k, group, out, n); break;
          case 3: group_rows<3>(x, sums, k, group, out, n); break;
          case 4: group_rows<4>(x, sums, k, group, out, n); break;
          case 5: group_rows<5>(x, sums, k, group, out, n); break;
          case 6: group_rows<6>(x, sums, k, group, out, n); break;
          case 7: group_rows<7>(x, sums, k, group, out, n); break;
          default: group_rows<8>(x, sums, k, group, out, n); break;
        }
      }
    }
  });
}

void check_input(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "int8_linear runs on the CPU");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16,
              "the input must be bfloat16 [rows, in_features]");
}

}  // namespace

namespace rillm {

// -> (q [rows, n] int8, or uint8 q + 128 with `offset`; scales [rows] float32; the sums of
// each row's q [rows] int32).
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_rows(const at::Tensor& x_in, bool rotate,
                                                             bool offset) {
  check_input(x_in);
  TORCH_CHECK(!rotate || x_in.size(1) % kInt8Rotation == 0, "a rotated input's width must be a "
              "multiple of ", kInt8Rotation, ", got ", x_in.size(1));
  const auto x = x_in.contiguous();
  const int64_t rows = x.size(0), n = x.size(1);
  auto q = at::empty({rows, n}, x.options().dtype(offset ? at::kByte : at::kChar));
  auto scales = at::empty({rows}, x.options().dtype(at::kFloat));
  const auto* data = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  auto* out = static_cast<int8_t*>(q.data_ptr());
  float* s = scales.data_ptr<float>();
  auto sums = at::empty({rows}, x.options().dtype(at::kInt));
  int32_t* sum = sums.data_ptr<int32_t>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> work(n);
    for (int64_t i = begin; i < end; ++i)
      s[i] = quantize_row(data + i * n, n, rotate, offset, work.data(), out + i * n, sum + i);
  });
  return {q, scales, sums};
}

std::tuple<at::Tensor, at::Tensor> int8_quantize_rows(const at::Tensor& x, bool rotate) {
  const auto [q, scales, sums] = quantize_rows(x, rotate, false);
  return {q, scales};
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight_in, const at::Tensor& scales,
                       bool rotate, const std::optional<at::Tensor>& few_rows_weight) {
  check_input(x);
  const bool few = few_rows_weight.has_value() && few_rows_weight->defined() &&
                   few_rows_weight->numel() > 0 && x.size(0) <= kMaxPackedRows;
  const at::Tensor& weight = few ? *few_rows_weight : weight_in;
  const bool rows_packed = weight.dim() == 4;  // int8_pack's layout
  TORCH_CHECK((weight.dim() == 2 && weight.scalar_type() == at::kChar &&
               (weight.is_mkldnn() || weight.is_contiguous())) ||
                  (rows_packed && weight.scalar_type() == at::kByte && weight.is_contiguous() &&
                   weight.size(2) == kGroup && weight.size(3) == 4),
              "the weight must be int8 [out_features, in_features] (contiguous or packed by "
              "onednn::qlinear_prepack) or packed by rillm::int8_pack");
  // qlinear_prepack's tensor is [in_features, out_features].
  const int64_t k = rows_packed ? 4 * weight.size(1) : weight.size(weight.is_mkldnn() ? 0 : 1);
  const int64_t n = rows_packed ? kGroup * weight.size(0) : weight.size(weight.is_mkldnn() ? 1 : 0);
  TORCH_CHECK(k == x.size(1), "the input has ", x.size(1), " features, the weight ", k);
  TORCH_CHECK(scales.dim() == 1 && scales.scalar_type() == at::kFloat && scales.is_contiguous() &&
                  scales.size(0) == n,
              "the weight scales must be contiguous float32 [out_features]");
  const int64_t rows = x.size(0);
  auto out = at::empty({rows, n}, x.options());
  if (rows == 0) return out;
  const auto [q, sx, q_sums] = quantize_rows(x, rotate, weight.is_mkldnn());
  at::Tensor acc;
  if (rows_packed) {
    acc = at::empty({rows, n}, x.options().dtype(at::kInt));
    packed_rows_matmul(q.data_ptr<int8_t>(), q_sums.data_ptr<int32_t>(), rows, k,
                       weight.data_ptr<uint8_t>(), n, acc.data_ptr<int32_t>());
  } else {
    acc = weight.is_mkldnn() ? packed_int8_matmul(q, weight, scales) : at::_int_mm(q, weight.t());
  }
  const float* row_scales = sx.data_ptr<float>();
  const float* col_scales = scales.data_ptr<float>();
  auto* y = out.data_ptr<c10::BFloat16>();
  const int64_t grain = std::max<int64_t>(1, 16384 / n);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    if (weight.is_mkldnn()) {
      scale_rows(acc.data_ptr<float>(), row_scales, col_scales, n, y, begin, end);
    } else {
      scale_rows(acc.data_ptr<int32_t>(), row_scales, col_scales, n, y, begin, end);
    }
  });
  return out;
}

at::Tensor int8_pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.device().is_cpu() && weight.dim() == 2 && weight.scalar_type() == at::kChar,
              "int8_pack takes int8 weights [out_features, in_features] on the CPU");
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(n % kGroup == 0 && k % 4 == 0, "int8_pack needs out_features a multiple of ",
              kGroup, " and in_features of 4, got [", n, ", ", k, "]");
  // w + 128 as uint8, [n / 16, 16, k / 4, 4] -> [n / 16, k / 4, 16, 4].
  const auto shifted = at::bitwise_xor(weight.view(at::kByte), 0x80);
  return shifted.view({n / kGroup, kGroup, k / 4, 4}).permute({0, 2, 1, 3}).contiguous();
}

bool int8_pack_vectorized() { return kVnni; }

}  // namespace rillm

TORCH_LIBRARY_FRAGMENT(rillm, m) {
  m.def("int8_quantize_rows(Tensor x, bool rotate) -> (Tensor, Tensor)");
  m.def("int8_linear(Tensor x, Tensor weight, Tensor scales, bool rotate, "
        "Tensor? few_rows_weight=None) -> Tensor");
  m.def("int8_pack(Tensor weight) -> Tensor");
  m.def("int8_pack_vectorized() -> bool", &rillm::int8_pack_vectorized);
  m.impl("int8_quantize_rows", c10::DispatchKey::CPU, &rillm::int8_quantize_rows);
  m.impl("int8_pack", c10::DispatchKey::CPU, &rillm::int8_pack);
  m.impl("int8_linear", c10::DispatchKey::CPU, &rillm::int8_linear);
  m.impl("int8_linear", c10::DispatchKey::MkldnnCPU, &rillm::int8_linear);  // packed weights
}
