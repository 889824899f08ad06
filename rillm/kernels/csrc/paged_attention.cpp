// Decode attention that reads the paged KV cache in place (CPU).
//
// One query token per sequence (at position context_lens[b] - 1; with a sliding window of W
// keys, it sees the last W only). The keys and values of sequence b live in the cache slots its
// block table names; the torch path copies them out (index_select) into a padded batch before
// two batched matmuls. Here each (sequence, KV head) task walks its blocks and reads every key
// and value once, where it lies: no copy, no padding, no mask. Scores and the weighted sum of
// values stay in float32 whatever the cache's dtype; the output is rounded once.
//
// Registered as torch.ops.rillm.paged_decode_attention (see rillm/kernels/__init__.py).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "kernels.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int kLanes = 16;  // partial sums the compiler keeps in vector registers

inline float to_float(float x) { return x; }
inline float to_float(double x) { return static_cast<float>(x); }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }
inline float to_float(c10::Half x) { return static_cast<float>(x); }

using rillm::exp_nonpositive;

// The first key a query at position length - 1 sees: 0, or with a sliding window of
// `window` keys (0: none) the key window - 1 positions back.
inline int64_t first_key(int64_t length, int64_t window) {
  return window > 0 ? std::max<int64_t>(0, length - window) : 0;
}

inline float dot(const float* a, const float* b, int64_t n) {
  float lanes[kLanes] = {0.0f};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] += a[i + l] * b[i + l];
  }
  float sum = 0.0f;
  for (int l = 0; l < kLanes; ++l) sum += lanes[l];
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

inline float sum(const float* a, int64_t n) {
  float lanes[kLanes] = {0.0f};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] += a[i + l];
  }
  float total = 0.0f;
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
  for (; i < n; ++i) total += a[i];
  return total;
}

template <typename scalar_t>
inline void load_row(const scalar_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}

// bfloat16 is the top half of a float32: a shift, which vectorizes where the class may not.
template <>
inline void load_row<c10::BFloat16>(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  uint32_t* out = reinterpret_cast<uint32_t*>(dst);
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<uint32_t>(bits[i]) << 16;
}

// Reads ahead of a thread's decode attention tasks: the blocks it will read, in the order it
// reads them (each task's key blocks, then its value blocks, then the next task's), fetched
// into L2 `kAhead` blocks before they are used. A sequence's blocks lie wherever its block table
// points, so the hardware prefetcher starts over at each one; running ahead across blocks and
// across tasks keeps several blocks' loads in flight while one is computed on.
class ReadAhead {
 public:
  ReadAhead(const void* keys, const void* values, const int64_t* tables, const int64_t* lens,
            int64_t max_blocks, int64_t num_kv_heads, int64_t num_slots, int64_t block_size,
            int64_t row_bytes, int64_t window, int64_t task, int64_t end)
      : keys_(static_cast<const char*>(keys)), values_(static_cast<const char*>(values)),
        tables_(tables), lens_(lens), max_blocks_(max_blocks), num_kv_heads_(num_kv_heads),
        head_bytes_(num_slots * row_bytes), block_size_(block_size), row_bytes_(row_bytes),
        window_(window), task_(task), end_(end) {
    for (int i = 0; i < kAhead; ++i) next();
  }

  // One block is about to be read: ask for the one kAhead blocks after it.
  void next() {
    if (task_ >= end_) return;
    const int64_t b = task_ / num_kv_heads_, h = task_ % num_kv_heads_;
    const int64_t length = lens_[b], blocks = (length + block_size_ - 1) / block_size_;
    if (block_ == 0) block_ = first_key(length, window_) / block_size_;
    const char* head = (pass_ == 0 ? keys_ : values_) + h * head_bytes_;
    const char* block = head + tables_[b * max_blocks_ + block_] * block_size_ * row_bytes_;
    const int64_t bytes = std::min(block_size_, length - block_ * block_size_) * row_bytes_;
    for (int64_t offset = 0; offset < bytes; offset += 64) {
      __builtin_prefetch(block + offset, 0, 2);
    }
    if (++block_ < blocks) return;
    block_ = 0;
    if (++pass_ < 2) return;
    pass_ = 0;
    ++task_;
  }

 private:
  // Four blocks (8 KiB of a 64-wide bf16 head): 2 to 8 measured alike, 1 ~10% slower.
  static constexpr int kAhead = 4;
  const char* keys_;
  const char* values_;
  const int64_t* tables_;
  const int64_t* lens_;
  int64_t max_blocks_, num_kv_heads_, head_bytes_, block_size_, row_bytes_, window_, task_, end_;
  int64_t pass_ = 0, block_ = 0;  // 0: keys, 1: values; the block within the pass
};

// The softmax of each query head's scores, shared by both paths: scores[g * length + j] holds
// key j's score for query head g on entry, its probability on return.
inline void softmax_rows(float* scores, int64_t group, int64_t length) {
  for (int64_t g = 0; g < group; ++g) {
    float* s = scores + g * length;
    float top = -INFINITY;
    for (int64_t j = 0; j < length; ++j) top = s[j] > top ? s[j] : top;
    for (int64_t j = 0; j < length; ++j) s[j] = exp_nonpositive(s[j] - top);
    const float inverse = 1.0f / sum(s, length);
    for (int64_t j = 0; j < length; ++j) s[j] *= inverse;
  }
}

template <typename scalar_t>
void decode_attention(const at::Tensor& q, const at::Tensor& key_cache,
                      const at::Tensor& value_cache, const at::Tensor& block_tables,
                      const at::Tensor& context_lens, int64_t block_size, double scale,
                      int64_t window, at::Tensor& out) {
  const int64_t batch = q.size(0), num_heads = q.size(1), dim = q.size(2);
  const int64_t num_kv_heads = key_cache.size(0), num_slots = key_cache.size(1);
  const int64_t group = num_heads / num_kv_heads;
  const int64_t q_batch_stride = q.stride(0), q_head_stride = q.stride(1);
  const int64_t max_blocks = block_tables.size(1);
  const scalar_t* q_data = q.data_ptr<scalar_t>();
  const scalar_t* k_data = key_cache.data_ptr<scalar_t>();
  const scalar_t* v_data = value_cache.data_ptr<scalar_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  scalar_t* out_data = out.data_ptr<scalar_t>();
  const float fscale = static_cast<float>(scale);
  const int64_t row_bytes = dim * static_cast<int64_t>(sizeof(scalar_t));

  at::parallel_for(0, batch * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> query(group * dim), acc(group * dim), row(dim), scores;
    ReadAhead ahead(k_data, v_data, tables, lens, max_blocks, num_kv_heads, num_slots,
                    block_size, row_bytes, window, begin, end);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / num_kv_heads, h = task % num_kv_heads;
      const int64_t length = lens[b];
      const int64_t* table = tables + b * max_blocks;
      const scalar_t* keys = k_data + h * num_slots * dim;
      const scalar_t* values = v_data + h * num_slots * dim;
      for (int64_t g = 0; g < group; ++g) {
        const scalar_t* src = q_data + b * q_batch_stride + (h * group + g) * q_head_stride;
        for (int64_t d = 0; d < dim; ++d) query[g * dim + d] = to_float(src[d]) * fscale;
      }
      // Keys first..length - 1, score j - first.
      const int64_t first = first_key(length, window), count = length - first;
      scores.resize(group * count);
      // Keys block by block: a block's slots are consecutive rows of the cache.
      for (int64_t start = first - first % block_size; start < length; start += block_size) {
        const int64_t base = table[start / block_size] * block_size;
        const int64_t rows = std::min(block_size, length - start);
        ahead.next();
        for (int64_t r = std::max<int64_t>(0, first - start); r < rows; ++r) {
          load_row(keys + (base + r) * dim, row.data(), dim);
          for (int64_t g = 0; g < group; ++g) {
            scores[g * count + start + r - first] = dot(query.data() + g * dim, row.data(), dim);
          }
        }
      }
      softmax_rows(scores.data(), group, count);
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t start = first - first % block_size; start < length; start += block_size) {
        const int64_t base = table[start / block_size] * block_size;
        const int64_t rows = std::min(block_size, length - start);
        ahead.next();
        for (int64_t r = std::max<int64_t>(0, first - start); r < rows; ++r) {
          load_row(values + (base + r) * dim, row.data(), dim);
          for (int64_t g = 0; g < group; ++g) {
            const float p = scores[g * count + start + r - first];
            float* a = acc.data() + g * dim;
            for (int64_t d = 0; d < dim; ++d) a[d] += p * row[d];
          }
        }
      }
      scalar_t* dst = out_data + b * num_heads * dim + h * group * dim;
      for (int64_t i = 0; i < group * dim; ++i) dst[i] = static_cast<scalar_t>(acc[i]);
    }
  });
}

#ifdef RILLM_AVX512_BF16
// Lane-wise partial sums of q . k over kPairs * 32 bfloat16 values.
template <int kPairs>
inline __m512 dot_bf16(const uint16_t* q, const uint16_t* k) {
  __m512 acc = _mm512_setzero_ps();
  for (int c = 0; c < kPairs; ++c) {
    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(q + 32 * c),
                           (__m512bh)_mm512_loadu_si512(k + 32 * c));
  }
  return acc;
}

// The totals of four vectors' lanes, [sum(a), sum(b), sum(c), sum(d)]: one reduction for four
// rows instead of four.
inline __m128 sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  // Per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] and the same for c, d.
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  // Per 128-bit lane: [a, b, c, d] partial sums.
  const __m512 abcd = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                                    _mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m256 halves = _mm256_add_ps(_mm512_castps512_ps256(abcd),
                                      _mm512_extractf32x8_ps(abcd, 1));
  return _mm_add_ps(_mm256_castps256_ps128(halves), _mm256_extractf128_ps(halves, 1));
}

// bfloat16 on AVX-512 BF16: q . k with the bf16 dot-product instruction (pairs of bf16
// products summed into float32 lanes, no conversion of the keys), one block of keys at a time;
// values widened to float32 once per block and accumulated in registers. DIM: head_dim, a
// multiple of 32.
template <int DIM>
void decode_attention_avx512_bf16(const at::Tensor& q, const at::Tensor& key_cache,
                                  const at::Tensor& value_cache, const at::Tensor& block_tables,
                                  const at::Tensor& context_lens, int64_t block_size,
                                  double scale, int64_t window, at::Tensor& out) {
  constexpr int kPairs = DIM / 32;  // 512-bit vectors of bf16 per row
  constexpr int kFloats = DIM / 16;  // 512-bit vectors of float32 per row
  const int64_t batch = q.size(0), num_heads = q.size(1);
  const int64_t num_kv_heads = key_cache.size(0), num_slots = key_cache.size(1);
  const int64_t group = num_heads / num_kv_heads;
  const int64_t q_batch_stride = q.stride(0), q_head_stride = q.stride(1);
  const int64_t max_blocks = block_tables.size(1);
  const auto* q_data = reinterpret_cast<const uint16_t*>(q.data_ptr<c10::BFloat16>());
  const auto* k_data = reinterpret_cast<const uint16_t*>(key_cache.data_ptr<c10::BFloat16>());
  const auto* v_data = reinterpret_cast<const uint16_t*>(value_cache.data_ptr<c10::BFloat16>());
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  auto* out_data = reinterpret_cast<uint16_t*>(out.data_ptr<c10::BFloat16>());
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, batch * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint16_t> query(group * DIM);  // bfloat16 bits
    std::vector<float> scores;
    ReadAhead ahead(k_data, v_data, tables, lens, max_blocks, num_kv_heads, num_slots,
                    block_size, DIM * 2, window, begin, end);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / num_kv_heads, h = task % num_kv_heads;
      const int64_t length = lens[b];
      const int64_t* table = tables + b * max_blocks;
      const uint16_t* keys = k_data + h * num_slots * DIM;
      const uint16_t* values = v_data + h * num_slots * DIM;
      for (int64_t g = 0; g < group; ++g) {
        const uint16_t* src = q_data + b * q_batch_stride + (h * group + g) * q_head_stride;
        std::copy(src, src + DIM, query.data() + g * DIM);
      }
      // Keys first..length - 1, score j - first.
      const int64_t first = first_key(length, window), count = length - first;
      const int64_t first_start = first - first % block_size;
      scores.resize(group * count);
      for (int64_t start = first_start; start < length; start += block_size) {
        const uint16_t* block = keys + table[start / block_size] * block_size * DIM;
        const int64_t rows = std::min(block_size, length - start);
        ahead.next();
        for (int64_t g = 0; g < group; ++g) {
          const uint16_t* qg = query.data() + g * DIM;
          float* s = scores.data() + g * count + start - first;  // s[r]: row r of this block
          int64_t r = std::max<int64_t>(0, first - start);
          for (; r + 4 <= rows; r += 4) {
            const uint16_t* k = block + r * DIM;
            const __m128 four = sum4(dot_bf16<kPairs>(qg, k), dot_bf16<kPairs>(qg, k + DIM),
                                     dot_bf16<kPairs>(qg, k + 2 * DIM),
                                     dot_bf16<kPairs>(qg, k + 3 * DIM));
            _mm_storeu_ps(s + r, _mm_mul_ps(four, _mm_set1_ps(fscale)));
          }
          for (; r < rows; ++r) {
            s[r] = _mm512_reduce_add_ps(dot_bf16<kPairs>(qg, block + r * DIM)) * fscale;
          }
        }
      }
      softmax_rows(scores.data(), group, count);
      // Query heads in passes of kHeads, their sums in registers: each value row is widened
      // once a pass, not once a head.
      constexpr int kHeads = DIM == 64 ? 4 : DIM == 128 ? 2 : 1;
      for (int64_t g0 = 0; g0 < group; g0 += kHeads) {
        const int heads = static_cast<int>(std::min<int64_t>(kHeads, group - g0));
        __m512 acc[kHeads][kFloats];
        for (int g = 0; g < kHeads; ++g) {
          for (int c = 0; c < kFloats; ++c) acc[g][c] = _mm512_setzero_ps();
        }
        for (int64_t start = first_start; start < length; start += block_size) {
          const uint16_t* block = values + table[start / block_size] * block_size * DIM;
          const int64_t rows = std::min(block_size, length - start);
          if (g0 == 0) ahead.next();
          for (int64_t r = std::max<int64_t>(0, first - start); r < rows; ++r) {
            __m512 v[kFloats];
            for (int c = 0; c < kFloats; ++c) {
              const __m256i raw = _mm256_loadu_si256(
                  reinterpret_cast<const __m256i*>(block + r * DIM + 16 * c));
              v[c] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
            }
            for (int g = 0; g < kHeads; ++g) {
              if (g >= heads) break;
              const __m512 weight =
                  _mm512_set1_ps(scores[(g0 + g) * count + start + r - first]);
              for (int c = 0; c < kFloats; ++c) {
                acc[g][c] = _mm512_fmadd_ps(weight, v[c], acc[g][c]);
              }
            }
          }
        }
        for (int g = 0; g < heads; ++g) {
          uint16_t* dst = out_data + b * num_heads * DIM + (h * group + g0 + g) * DIM;
          for (int c = 0; c < kFloats; ++c) {
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16 * c),
                                (__m256i)_mm512_cvtneps_pbh(acc[g][c]));
          }
        }
      }
    }
  });
}
#endif

}  // namespace

namespace rillm {

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& key_cache,
                                  const at::Tensor& value_cache, const at::Tensor& block_tables,
                                  const at::Tensor& context_lens, int64_t block_size,
                                  double scale, int64_t window) {
  TORCH_CHECK(q.device().is_cpu(), "paged_decode_attention runs on the CPU");
  TORCH_CHECK(window >= 0, "window must be 0 (none) or the keys a query sees");
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1, "q must be [batch, heads, head_dim], rows dense");
  TORCH_CHECK(key_cache.dim() == 3 && key_cache.is_contiguous() && value_cache.is_contiguous(),
              "the caches must be contiguous [kv_heads, slots, head_dim]");
  TORCH_CHECK(key_cache.sizes() == value_cache.sizes(), "key and value caches differ in shape");
  TORCH_CHECK(q.scalar_type() == key_cache.scalar_type() &&
                  key_cache.scalar_type() == value_cache.scalar_type(),
              "q and the caches must share a dtype");
  TORCH_CHECK(q.size(2) == key_cache.size(2), "q and the caches differ in head_dim");
  TORCH_CHECK(q.size(1) % key_cache.size(0) == 0, "heads must be a multiple of kv_heads");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.is_contiguous() &&
                  block_tables.dim() == 2 && block_tables.size(0) == q.size(0),
              "block_tables must be contiguous int64 [batch, max_blocks]");
  TORCH_CHECK(context_lens.scalar_type() == at::kLong && context_lens.is_contiguous() &&
                  context_lens.numel() == q.size(0),
              "context_lens must be contiguous int64 [batch]");
  TORCH_CHECK(block_size > 0 && key_cache.size(1) % block_size == 0,
              "the caches must hold whole blocks");
  // The tasks read wherever the tables point: check every block they will read is a block.
  const int64_t num_blocks = key_cache.size(1) / block_size;
  const int64_t max_blocks = block_tables.size(1);
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < q.size(0); ++b) {
    TORCH_CHECK(lens[b] >= 1 && lens[b] <= max_blocks * block_size,
                "context_lens[", b, "] = ", lens[b], " does not fit its block table");
    check_block_table(tables + b * max_blocks, b, lens[b], block_size, num_blocks);
  }
  auto out = at::empty({q.size(0), q.size(1) * q.size(2)}, q.options());
#ifdef RILLM_AVX512_BF16
  const int64_t dim = q.size(2);
  if (q.scalar_type() == at::kBFloat16 && (dim == 64 || dim == 128 || dim == 256)) {
    auto kernel = dim == 64    ? &decode_attention_avx512_bf16<64>
                  : dim == 128 ? &decode_attention_avx512_bf16<128>
                               : &decode_attention_avx512_bf16<256>;
    kernel(q, key_cache, value_cache, block_tables, context_lens, block_size, scale, window,
           out);
    return out;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(),
                                  "paged_decode_attention", [&] {
                                    decode_attention<scalar_t>(q, key_cache, value_cache,
                                                               block_tables, context_lens,
                                                               block_size, scale, window, out);
                                  });
  return out;
}

// How many threads at::parallel_for runs a loop on here: torch's thread count if the library
// was built with OpenMP, 1 if the pragma behind at::parallel_for was compiled away.
int64_t parallel_threads() {
  std::atomic<uint64_t> seen{0};
  at::parallel_for(0, 64, 1,
                   [&](int64_t, int64_t) { seen |= 1ull << (at::get_thread_num() % 64); });
  return __builtin_popcountll(seen.load());
}

bool vectorized(c10::string_view name) {
#ifdef RILLM_AVX512_VNNI
  if (name == "gguf_linear") return true;
#endif
#ifdef RILLM_AVX512_BF16
  if (name == "decode_attention" || name == "prefill_attention") return true;
#endif
#ifdef RILLM_AVX512
  if (name == "argmax") return true;
#endif
  return false;
}

}  // namespace rillm

TORCH_LIBRARY(rillm, m) {
  m.def("parallel_threads() -> int", &rillm::parallel_threads);
  m.def("vectorized(str name) -> bool", &rillm::vectorized);
  m.def(
      "paged_decode_attention(Tensor q, Tensor key_cache, Tensor value_cache, "
      "Tensor block_tables, Tensor context_lens, int block_size, float scale, int window=0) "
      "-> Tensor");
  m.impl("paged_decode_attention", c10::DispatchKey::CPU, &rillm::paged_decode_attention);
}
