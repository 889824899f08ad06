// y = x W^T for a few rows of x, with W held as 4-bit blocks (CPU): the matrix-vector products
// of a decode step, where reading the weights is the cost.
//
// W [N, K] is stored as GGUF's Q4_1 does it, one (d, m) pair of float16 per block of 32 weights
// along K and w = d * q + m with q in [0, 16), but with the nibbles laid out for the kernel
// (q4_pack_layout below). Each block's dot product is taken in bfloat16 with `vdpbf16ps`: a
// nibble q becomes the bfloat16 word 0x4300 | q, which is exactly 128 + q, so
//
//   sum_k x_k w_k = sum_b d_b * sum_{k in b} x_k (128 + q_k) + (m_b - 128 d_b) * sum_{k in b} x_k
//
// with the products exact and the sums in float32. x is bfloat16 (the activations), y bfloat16.
// Rows of W are taken four at a time (kGroup); the nibbles of a group are interleaved chunk by
// chunk so that the group is one sequential stream of memory.
//
// Registered as torch.ops.rillm.q4_linear, q4_pack and q4_linear_vectorized (see
// rillm/kernels/__init__.py). Without AVX-512 BF16 the op is plain C++ and slower than
// PyTorch's int4 kernel; q4_linear_vectorized() tells the caller which it got.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "kernels.h"

#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512BF16__)
#include <immintrin.h>
#define RILLM_Q4_AVX512 1
#endif

namespace {

constexpr int64_t kBlock = 32;         // weights per (d, m) pair
constexpr int64_t kChunk = 4 * kBlock;  // weights per 64-byte load of one row
constexpr int64_t kGroup = 4;           // rows of W interleaved and computed together

// Where the nibble of weight k (0 <= k < K) of one row sits in that row's share of the packed
// bytes, as (byte offset within the row's chunk, high nibble?). A row's K weights are cut into
// chunks of 128 (64 bytes) and, if K % 128 == 64, one tail of 64 (32 bytes).
//
// A 64-byte chunk is four 16-byte lanes; the kernel splits it into low and high nibbles and
// interleaves each with 0x43 bytes, lane by lane (vpunpcklbw / vpunpckhbw). Block j of the
// chunk comes out of: j = 0 the low nibbles of bytes 0-7 of each lane, j = 1 the low nibbles of
// bytes 8-15, j = 2 and 3 the same bytes' high nibbles; weight t of a block is word t of the
// result, lane t / 8, byte t % 8. The 32-byte tail is widened byte to word (vpmovzxbw): block 0
// is the low nibbles of bytes 0-31 in order, block 1 their high nibbles.
struct NibblePlace {
  int64_t byte;
  bool high;
};

NibblePlace place_in_chunk(int64_t k_in_chunk, bool tail) {
  const int64_t block = k_in_chunk / kBlock, t = k_in_chunk % kBlock;
  if (tail) return {t, block == 1};
  const int64_t lane = t / 8, byte = lane * 16 + (block % 2) * 8 + t % 8;
  return {byte, block >= 2};
}

// q [N, K] uint8 in [0, 16) -> packed [N / kGroup, K / 2 * kGroup] uint8: group g holds, chunk
// by chunk, the chunk of each of its kGroup rows in turn.
at::Tensor q4_pack(const at::Tensor& q) {
  TORCH_CHECK(q.device().is_cpu() && q.dim() == 2 && q.scalar_type() == at::kByte,
              "q4_pack takes q [N, K] uint8 on the CPU");
  const int64_t n = q.size(0), k = q.size(1);
  TORCH_CHECK(n % kGroup == 0, "q4_pack needs N divisible by ", kGroup, ", got ", n);
  TORCH_CHECK(k % 64 == 0 && k > 0, "q4_pack needs K divisible by 64, got ", k);
  const auto src = q.contiguous();
  TORCH_CHECK(n == 0 || src.max().item<uint8_t>() < 16, "q4_pack: q must lie in [0, 16)");
  const uint8_t* in = src.data_ptr<uint8_t>();
  auto packed = at::zeros({n / kGroup, k / 2 * kGroup}, q.options());
  uint8_t* out = packed.data_ptr<uint8_t>();
  const int64_t row_bytes = k / 2;
  // Where each of a row's K nibbles goes within its group's bytes: the same for every row.
  std::vector<int64_t> offset(k);
  std::vector<uint8_t> shift(k);
  for (int64_t kk = 0; kk < k; ++kk) {
    const int64_t chunk = kk / kChunk;
    const bool tail = (chunk + 1) * kChunk > k;
    const NibblePlace place = place_in_chunk(kk % kChunk, tail);
    offset[kk] = chunk * (kChunk / 2) * kGroup + place.byte;
    shift[kk] = place.high ? 4 : 0;
  }
  at::parallel_for(0, n / kGroup, 64, [&](int64_t begin, int64_t end) {
    for (int64_t group = begin; group < end; ++group) {
      uint8_t* group_out = out + group * row_bytes * kGroup;
      for (int64_t r = 0; r < kGroup; ++r) {
        const uint8_t* row_in = in + (group * kGroup + r) * k;
        for (int64_t kk = 0; kk < k; ++kk) {
          const int64_t chunk = kk / kChunk;
          const int64_t chunk_bytes = (chunk + 1) * kChunk > k ? kChunk / 4 : kChunk / 2;
          group_out[offset[kk] + r * chunk_bytes] |= static_cast<uint8_t>(row_in[kk] << shift[kk]);
        }
      }
    }
  });
  return packed;
}

// Per-row, per-block float32 terms: d, and the sums of x over each block.
void block_sums(const at::BFloat16* x, int64_t rows, int64_t k, float* sums) {
  const int64_t blocks = k / kBlock;
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t b = 0; b < blocks; ++b) {
      float s = 0.0f;
      for (int64_t t = 0; t < kBlock; ++t) s += static_cast<float>(x[m * k + b * kBlock + t]);
      sums[m * blocks + b] = s;
    }
}

float unpack_nibble(const uint8_t* group_bytes, int64_t r, int64_t kk, int64_t k) {
  const int64_t chunk = kk / kChunk;
  const bool tail = (chunk + 1) * kChunk > k;
  const int64_t chunk_bytes = tail ? kChunk / 4 : kChunk / 2;
  const NibblePlace place = place_in_chunk(kk % kChunk, tail);
  const uint8_t byte = group_bytes[chunk * (kChunk / 2) * kGroup + r * chunk_bytes + place.byte];
  return static_cast<float>(place.high ? byte >> 4 : byte & 0x0F);
}

// Portable version: the same sums in the same form (d * sum x (128 + q) + (m - 128 d) * sum x).
void q4_linear_portable(const at::BFloat16* x, int64_t rows, const uint8_t* packed,
                        const at::Half* d, const at::Half* mins, int64_t n, int64_t k,
                        const float* sums, at::BFloat16* y) {
  const int64_t blocks = k / kBlock, row_bytes = k / 2;
  at::parallel_for(0, n / kGroup, 16, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const uint8_t* group_bytes = packed + g * row_bytes * kGroup;
      for (int64_t r = 0; r < kGroup; ++r) {
        const int64_t row = g * kGroup + r;
        for (int64_t m = 0; m < rows; ++m) {
          float total = 0.0f;
          for (int64_t b = 0; b < blocks; ++b) {
            float dot = 0.0f;
            for (int64_t t = 0; t < kBlock; ++t) {
              const int64_t kk = b * kBlock + t;
              dot += static_cast<float>(x[m * k + kk]) *
                     (128.0f + unpack_nibble(group_bytes, r, kk, k));
            }
            const float db = static_cast<float>(d[row * blocks + b]);
            const float mb = static_cast<float>(mins[row * blocks + b]);
            total += db * dot + (mb - 128.0f * db) * sums[m * blocks + b];
          }
          y[m * n + row] = static_cast<at::BFloat16>(total);
        }
      }
    }
  });
}

#ifdef RILLM_Q4_AVX512

inline __m512bh as_bh(__m512i v) { return (__m512bh)v; }

// One group of kGroup rows against kRows rows of x (kRows <= 4), writing y[m, row0 .. row0+3].
template <int kRows>
void q4_group(const at::BFloat16* x, int64_t k, const uint8_t* group_bytes, const at::Half* d,
              const at::Half* mins, const float* sums, int64_t n, int64_t row0,
              at::BFloat16* y, int64_t x_stride_rows) {
  const int64_t blocks = k / kBlock, full_chunks = k / kChunk;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const __m512i bf16_128 = _mm512_set1_epi8(0x43);
  // d as float32, for the per-block broadcasts; blocks <= kMaxBlocks is checked by the caller.
  constexpr int64_t kMaxBlocks = 512;
  alignas(64) float dq[kGroup][kMaxBlocks];
  __m512 acc[kGroup][kRows];
  for (int r = 0; r < kGroup; ++r) {
    // The (m - 128 d) * sum x term, lane by lane over the blocks; reduced with the rest.
    for (int m = 0; m < kRows; ++m) acc[r][m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; b += 16) {
      const __mmask16 mask = blocks - b >= 16 ? 0xFFFF : (__mmask16)((1u << (blocks - b)) - 1);
      const int64_t at = (row0 + r) * blocks + b;
      const __m512 db = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, d + at));
      const __m512 mb = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, mins + at));
      _mm512_mask_storeu_ps(dq[r] + b, mask, db);
      const __m512 shift = _mm512_fnmadd_ps(_mm512_set1_ps(128.0f), db, mb);
      for (int m = 0; m < kRows; ++m)
        acc[r][m] = _mm512_fmadd_ps(shift, _mm512_maskz_loadu_ps(mask, sums + m * blocks + b),
                                    acc[r][m]);
    }
  }
  const __m512 zero = _mm512_setzero_ps();
  // Block b of row r (its 32 weights as bf16 words 128 + q) against every row of x.
  auto add_block = [&](int r, int64_t b, __m512i words) {
    const __m512 scale = _mm512_set1_ps(dq[r][b]);
    for (int m = 0; m < kRows; ++m) {
      const __m512i xb = _mm512_loadu_si512(x + m * x_stride_rows + b * kBlock);
      acc[r][m] =
          _mm512_fmadd_ps(_mm512_dpbf16_ps(zero, as_bh(words), as_bh(xb)), scale, acc[r][m]);
    }
  };
  for (int64_t c = 0; c < full_chunks; ++c) {
    const uint8_t* chunk = group_bytes + c * (kChunk / 2) * kGroup;
    for (int r = 0; r < kGroup; ++r) {
      const __m512i v = _mm512_loadu_si512(chunk + r * (kChunk / 2));
      const __m512i lo = _mm512_and_si512(v, low4);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
      add_block(r, c * 4, _mm512_unpacklo_epi8(lo, bf16_128));
      add_block(r, c * 4 + 1, _mm512_unpackhi_epi8(lo, bf16_128));
      add_block(r, c * 4 + 2, _mm512_unpacklo_epi8(hi, bf16_128));
      add_block(r, c * 4 + 3, _mm512_unpackhi_epi8(hi, bf16_128));
    }
  }
  if (full_chunks * kChunk < k) {  // the 64-weight tail
    const uint8_t* chunk = group_bytes + full_chunks * (kChunk / 2) * kGroup;
    const __m512i word_128 = _mm512_set1_epi16(0x4300);
    for (int r = 0; r < kGroup; ++r) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk + r * 32));
      const __m256i lo = _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0x0F));
      add_block(r, full_chunks * 4, _mm512_or_si512(_mm512_cvtepu8_epi16(lo), word_128));
      add_block(r, full_chunks * 4 + 1, _mm512_or_si512(_mm512_cvtepu8_epi16(hi), word_128));
    }
  }
  for (int m = 0; m < kRows; ++m)
    for (int r = 0; r < kGroup; ++r)
      y[m * n + row0 + r] = static_cast<at::BFloat16>(_mm512_reduce_add_ps(acc[r][m]));
}

// All rows of x against all groups of W; within a group, rows of x four at a time (a group's
// 4 x 4 accumulators fit the 32 vector registers), so a group is read from memory once and
// from L1 for the next four rows.
void q4_linear_avx512(const at::BFloat16* x, int64_t rows, int64_t k, const uint8_t* packed,
                      const at::Half* d, const at::Half* mins, const float* sums, int64_t n,
                      at::BFloat16* y) {
  const int64_t row_bytes = k / 2, blocks = k / kBlock;
  at::parallel_for(0, n / kGroup, 8, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const uint8_t* group_bytes = packed + g * row_bytes * kGroup;
      for (int64_t m0 = 0; m0 < rows; m0 += 4) {
        const at::BFloat16* xm = x + m0 * k;
        const float* sm = sums + m0 * blocks;
        at::BFloat16* ym = y + m0 * n;
        switch (std::min<int64_t>(rows - m0, 4)) {
          case 1: q4_group<1>(xm, k, group_bytes, d, mins, sm, n, g * kGroup, ym, k); break;
          case 2: q4_group<2>(xm, k, group_bytes, d, mins, sm, n, g * kGroup, ym, k); break;
          case 3: q4_group<3>(xm, k, group_bytes, d, mins, sm, n, g * kGroup, ym, k); break;
          default: q4_group<4>(xm, k, group_bytes, d, mins, sm, n, g * kGroup, ym, k); break;
        }
      }
    }
  });
}

#endif  // RILLM_Q4_AVX512

}  // namespace

namespace rillm {

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& d,
                     const at::Tensor& mins) {
  TORCH_CHECK(x.device().is_cpu(), "q4_linear runs on the CPU");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16,
              "q4_linear takes x [rows, K] in bfloat16");
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "packed must be contiguous uint8 [N / 4, K * 2] (from q4_pack)");
  TORCH_CHECK(d.dim() == 2 && d.scalar_type() == at::kHalf && d.is_contiguous() &&
                  mins.sizes() == d.sizes() && mins.scalar_type() == at::kHalf &&
                  mins.is_contiguous(),
              "d and mins must be contiguous float16 [N, K / 32]");
  const int64_t rows = x.size(0), k = x.size(1), n = d.size(0);
  TORCH_CHECK(k % 64 == 0 && d.size(1) * kBlock == k, "x has ", k, " columns, the weights ",
              d.size(1) * kBlock);
  TORCH_CHECK(packed.size(0) * kGroup == n && packed.size(1) * 2 == k * kGroup,
              "packed does not match d's shape");
  TORCH_CHECK(k / kBlock <= 512, "q4_linear supports K up to 16384");
  const auto xc = x.contiguous();
  auto y = at::empty({rows, n}, x.options());
  if (rows == 0) return y;
  const at::BFloat16* xd = xc.data_ptr<at::BFloat16>();
  std::vector<float> sums(rows * (k / kBlock));
  block_sums(xd, rows, k, sums.data());
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const at::Half* dd = d.data_ptr<at::Half>();
  const at::Half* md = mins.data_ptr<at::Half>();
  at::BFloat16* yd = y.data_ptr<at::BFloat16>();
#ifdef RILLM_Q4_AVX512
  q4_linear_avx512(xd, rows, k, p, dd, md, sums.data(), n, yd);
#else
  q4_linear_portable(xd, rows, p, dd, md, n, k, sums.data(), yd);
#endif
  return y;
}

bool q4_linear_vectorized() {
#ifdef RILLM_Q4_AVX512
  return true;
#else
  return false;
#endif
}

}  // namespace rillm

TORCH_LIBRARY_FRAGMENT(rillm, m) {
  m.def("q4_pack(Tensor q) -> Tensor");
  m.impl("q4_pack", c10::DispatchKey::CPU, &q4_pack);
  m.def("q4_linear(Tensor x, Tensor packed, Tensor d, Tensor mins) -> Tensor");
  m.impl("q4_linear", c10::DispatchKey::CPU, &rillm::q4_linear);
  m.def("q4_linear_vectorized() -> bool", &rillm::q4_linear_vectorized);
}
