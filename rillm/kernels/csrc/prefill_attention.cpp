// Prefill attention read from the paged KV cache (CPU, bfloat16, AVX-512 BF16).
//
// A step's prompt chunks: sequence b has query_lens[b] new tokens at rows query_offsets[b]...
// of the flat batch, the last of its context_lens[b] positions, their keys and values already
// in the cache. Query i (position p) attends keys 0..p (with a sliding window of W keys,
// p - W + 1..p: the local layers of Gemma, Mistral). The torch path gathers every sequence's
// keys into a padded batch and runs scaled_dot_product_attention with a mask, computing the
// masked half of every causal square too. Here a task is one KV head of one sequence for a
// tile of 16 query positions, its query heads together (the group that shares the KV head):
// each task reads only the keys its last query can see, lays them out for the bf16
// dot-product instruction once, and multiplies every query of the tile by them.
//
// Arithmetic: q . k on `vdpbf16ps` (bf16 pairs, float32 sums), the softmax in float32, the
// probabilities rounded once to bf16 for the value pass (`vdpbf16ps` again, float32 sums), the
// output divided by the float32 sum of the unrounded probabilities and rounded to bf16: the
// roundings of PyTorch's flash attention for bf16 on the CPU, in another order.
//
// Registered as torch.ops.rillm.paged_prefill_attention (see rillm/kernels/__init__.py).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

#ifdef RILLM_AVX512_BF16

constexpr int64_t kTile = 16;  // query positions a task
constexpr int64_t kKeys = 16;  // keys a chunk: one float32 lane each in the score pass
constexpr int kScoreRows = 8;  // query rows a score pass keeps in registers

struct Task {
  int64_t seq, head, first, count;  // queries first..first+count-1 of the sequence
  int64_t lo;                       // the first key the first of them sees
  int64_t keys;                     // keys lo.. the tile sees (the last query sees lo + keys - 1)
};

// One task's scratch, reused across the tasks of a thread.
struct Scratch {
  std::vector<uint32_t> query;   // [rows][DIM / 2] bf16 pairs, row = i * group + g
  std::vector<uint32_t> keys;    // [chunks][DIM / 2][kKeys]: key j's dims 2p, 2p+1 at [p][j]
  std::vector<uint32_t> values;  // [chunks][kKeys / 2][DIM]: keys 2t, 2t+1 of dim d at [t][d]
  std::vector<float> scores;     // [rows][chunks * kKeys]
  std::vector<uint16_t> probs;   // [rows][chunks * kKeys] bf16, 0 past the row's last key
  std::vector<float> sums;       // [rows]
};

inline uint32_t pair(uint16_t low, uint16_t high) {
  return static_cast<uint32_t>(low) | (static_cast<uint32_t>(high) << 16);
}

template <int DIM>
void run_task(const Task& task, const uint16_t* q_data, int64_t q_row_stride,
              int64_t q_head_stride, const uint16_t* k_head, const uint16_t* v_head,
              const int64_t* table, int64_t block_size, int64_t first_position, int64_t group,
              int64_t window, float scale, uint16_t* out_data, int64_t out_row_stride,
              int64_t query_row0, Scratch& s) {
  constexpr int64_t kPairs = DIM / 2;
  const int64_t rows = task.count * group;
  const int64_t chunks = (task.keys + kKeys - 1) / kKeys;
  const int64_t width = chunks * kKeys;
  s.query.resize(rows * kPairs);
  s.keys.resize(chunks * kPairs * kKeys);
  s.values.resize(chunks * (kKeys / 2) * DIM);
  s.scores.resize(rows * width);
  s.probs.resize(rows * width);
  s.sums.resize(rows);

  // Queries, row i * group + g: query position first + i, query head head * group + g.
  for (int64_t i = 0; i < task.count; ++i) {
    for (int64_t g = 0; g < group; ++g) {
      const uint16_t* src = q_data + (query_row0 + task.first + i) * q_row_stride +
                            (task.head * group + g) * q_head_stride;
      std::memcpy(s.query.data() + (i * group + g) * kPairs, src, DIM * sizeof(uint16_t));
    }
  }
  // Keys and values lo.., re-laid per chunk of 16 keys; past the last key: zeros (a cache slot
  // there may hold anything, and 0 * NaN is NaN).
  for (int64_t c = 0; c < chunks; ++c) {
    uint32_t* kt = s.keys.data() + c * kPairs * kKeys;
    uint32_t* vp = s.values.data() + c * (kKeys / 2) * DIM;
    const uint16_t* krow[kKeys];
    const uint16_t* vrow[kKeys];
    for (int64_t j = 0; j < kKeys; ++j) {
      const int64_t index = c * kKeys + j;
      const int64_t key = task.lo + index;
      if (index < task.keys) {
        const int64_t slot = table[key / block_size] * block_size + key % block_size;
        krow[j] = k_head + slot * DIM;
        vrow[j] = v_head + slot * DIM;
      } else {
        krow[j] = vrow[j] = nullptr;
      }
    }
    for (int64_t j = 0; j < kKeys; ++j) {
      const uint32_t* k32 = reinterpret_cast<const uint32_t*>(krow[j]);
      for (int64_t p = 0; p < kPairs; ++p) kt[p * kKeys + j] = k32 ? k32[p] : 0;
    }
    for (int64_t t = 0; t < kKeys / 2; ++t) {
      const uint16_t* a = vrow[2 * t];
      const uint16_t* b = vrow[2 * t + 1];
      for (int64_t d = 0; d < DIM; ++d) {
        vp[t * DIM + d] = pair(a ? a[d] : 0, b ? b[d] : 0);
      }
    }
  }
  // The last key row r sees (its position), and the first (a window's), as indices from lo.
  auto last_key = [&](int64_t r) { return first_position + task.first + r / group - task.lo; };
  auto first_seen = [&](int64_t r) {
    return window > 0 ? std::max<int64_t>(0, last_key(r) + 1 - window) : 0;
  };

  // Scores, kScoreRows rows at a time, only the chunks the group's last row sees.
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t r0 = 0; r0 < rows; r0 += kScoreRows) {
    const int n = static_cast<int>(std::min<int64_t>(kScoreRows, rows - r0));
    const int64_t seen = last_key(r0 + n - 1) / kKeys + 1;
    const uint32_t* qr = s.query.data() + r0 * kPairs;
    for (int64_t c = 0; c < seen; ++c) {
      const uint32_t* kt = s.keys.data() + c * kPairs * kKeys;
      __m512 acc[kScoreRows];
      for (int r = 0; r < kScoreRows; ++r) acc[r] = _mm512_setzero_ps();
      for (int64_t p = 0; p < kPairs; ++p) {
        const __m512bh k = (__m512bh)_mm512_loadu_si512(kt + p * kKeys);
        for (int r = 0; r < kScoreRows; ++r) {
          if (r < n) {
            acc[r] = _mm512_dpbf16_ps(
                acc[r], (__m512bh)_mm512_set1_epi32(static_cast<int>(qr[r * kPairs + p])), k);
          }
        }
      }
      for (int r = 0; r < n; ++r) {
        _mm512_storeu_ps(s.scores.data() + (r0 + r) * width + c * kKeys,
                         _mm512_mul_ps(acc[r], vscale));
      }
    }
  }
  // Softmax of each row over the keys it sees; probabilities as bf16, zero outside them.
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t lo = first_seen(r), n = last_key(r) + 1;
    float* sc = s.scores.data() + r * width;
    uint16_t* pr = s.probs.data() + r * width;
    float top = -INFINITY;
    for (int64_t j = lo; j < n; ++j) top = std::max(top, sc[j]);
    float total = 0.0f;
    std::fill(pr, pr + lo, 0);
    for (int64_t j = lo; j < n; ++j) {
      const float e = rillm::exp_nonpositive(sc[j] - top);
      total += e;
      pr[j] = c10::BFloat16(e).x;
    }
    std::fill(pr + n, pr + width, 0);
    s.sums[r] = total;
  }
  // Values: each row's float32 sums in registers, key pairs on vdpbf16ps.
  constexpr int kVec = DIM / 16;                   // float32 vectors a row
  constexpr int kValueRows = DIM == 64 ? 4 : DIM == 128 ? 2 : 1;  // 16 accumulators a pass
  for (int64_t r0 = 0; r0 < rows; r0 += kValueRows) {
    const int n = static_cast<int>(std::min<int64_t>(kValueRows, rows - r0));
    const int64_t seen = last_key(r0 + n - 1) / kKeys + 1;
    __m512 acc[kValueRows][kVec];
    for (int r = 0; r < kValueRows; ++r) {
      for (int v = 0; v < kVec; ++v) acc[r][v] = _mm512_setzero_ps();
    }
    for (int64_t t = 0; t < seen * (kKeys / 2); ++t) {
      const uint32_t* vp = s.values.data() + t * DIM;
      __m512bh val[kVec];
      for (int v = 0; v < kVec; ++v) val[v] = (__m512bh)_mm512_loadu_si512(vp + 16 * v);
      for (int r = 0; r < kValueRows; ++r) {
        if (r >= n) break;
        const uint32_t* p32 = reinterpret_cast<const uint32_t*>(s.probs.data() + (r0 + r) * width);
        const __m512bh weight = (__m512bh)_mm512_set1_epi32(static_cast<int>(p32[t]));
        for (int v = 0; v < kVec; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], weight, val[v]);
      }
    }
    for (int r = 0; r < n; ++r) {
      const int64_t row = r0 + r, i = row / group, g = row % group;
      uint16_t* dst = out_data + (query_row0 + task.first + i) * out_row_stride +
                      (task.head * group + g) * DIM;
      const __m512 inverse = _mm512_set1_ps(1.0f / s.sums[row]);
      for (int v = 0; v < kVec; ++v) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16 * v),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[r][v], inverse)));
      }
    }
  }
}

template <int DIM>
void prefill_attention(const at::Tensor& q, const at::Tensor& key_cache,
                       const at::Tensor& value_cache, const at::Tensor& block_tables,
                       const at::Tensor& query_offsets, const at::Tensor& query_lens,
                       const at::Tensor& context_lens, int64_t block_size, double scale,
                       int64_t window, at::Tensor& out) {
  const int64_t batch = block_tables.size(0), num_heads = q.size(1);
  const int64_t num_kv_heads = key_cache.size(0), num_slots = key_cache.size(1);
  const int64_t group = num_heads / num_kv_heads, max_blocks = block_tables.size(1);
  const int64_t* offsets = query_offsets.data_ptr<int64_t>();
  const int64_t* qlens = query_lens.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  // The tasks, and what each costs (keys times query rows), so the threads get equal shares.
  std::vector<Task> tasks;
  std::vector<double> cost_before{0.0};
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t first_position = lens[b] - qlens[b];
    for (int64_t h = 0; h < num_kv_heads; ++h) {
      for (int64_t first = 0; first < qlens[b]; first += kTile) {
        const int64_t count = std::min(kTile, qlens[b] - first);
        const int64_t end_key = first_position + first + count;  // one past the last seen
        const int64_t lo =
            window > 0 ? std::max<int64_t>(0, first_position + first + 1 - window) : 0;
        const int64_t keys = end_key - lo;
        tasks.push_back({b, h, first, count, lo, keys});
        cost_before.push_back(cost_before.back() + static_cast<double>(keys) * count);
      }
    }
  }
  const auto* q_data = reinterpret_cast<const uint16_t*>(q.data_ptr<c10::BFloat16>());
  const auto* k_data = reinterpret_cast<const uint16_t*>(key_cache.data_ptr<c10::BFloat16>());
  const auto* v_data = reinterpret_cast<const uint16_t*>(value_cache.data_ptr<c10::BFloat16>());
  auto* out_data = reinterpret_cast<uint16_t*>(out.data_ptr<c10::BFloat16>());
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const double total = cost_before.back();
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    // This share: the tasks whose cost starts in [begin, end) / threads of the total.
    const auto from = std::lower_bound(cost_before.begin(), cost_before.end() - 1,
                                       total * static_cast<double>(begin) / threads);
    const auto to = std::lower_bound(cost_before.begin(), cost_before.end() - 1,
                                     total * static_cast<double>(end) / threads);
    Scratch scratch;
    for (auto it = from; it != to; ++it) {
      const Task& task = tasks[it - cost_before.begin()];
      const int64_t b = task.seq;
      run_task<DIM>(task, q_data, q.stride(0), q.stride(1),
                    k_data + task.head * num_slots * DIM, v_data + task.head * num_slots * DIM,
                    tables + b * max_blocks, block_size, lens[b] - qlens[b], group, window,
                    static_cast<float>(scale), out_data, out.stride(0), offsets[b], scratch);
    }
  });
}

#endif  // RILLM_AVX512_BF16

}  // namespace

namespace rillm {

void paged_prefill_attention(const at::Tensor& q, const at::Tensor& key_cache,
                             const at::Tensor& value_cache, const at::Tensor& block_tables,
                             const at::Tensor& query_offsets, const at::Tensor& query_lens,
                             const at::Tensor& context_lens, int64_t block_size, double scale,
                             at::Tensor out, int64_t window) {
  TORCH_CHECK(vectorized("prefill_attention"),
              "paged_prefill_attention needs AVX-512 BF16 (rillm::vectorized)");
  TORCH_CHECK(q.device().is_cpu(), "paged_prefill_attention runs on the CPU");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && key_cache.scalar_type() == at::kBFloat16 &&
                  value_cache.scalar_type() == at::kBFloat16 &&
                  out.scalar_type() == at::kBFloat16,
              "paged_prefill_attention takes bfloat16 q, caches and out");
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2),
              "q must be [tokens, heads, head_dim] with each token's heads dense");
  const int64_t dim = q.size(2);
  TORCH_CHECK(dim == 64 || dim == 128 || dim == 256,
              "paged_prefill_attention takes head_dim 64, 128 or 256");
  TORCH_CHECK(window >= 0, "window must be 0 (none) or the keys a query sees");
  TORCH_CHECK(key_cache.dim() == 3 && key_cache.is_contiguous() && value_cache.is_contiguous() &&
                  key_cache.sizes() == value_cache.sizes() && key_cache.size(2) == dim,
              "the caches must be contiguous [kv_heads, slots, head_dim] like q's heads");
  TORCH_CHECK(q.size(1) % key_cache.size(0) == 0, "heads must be a multiple of kv_heads");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == q.size(0) && out.size(1) == q.size(1) * dim &&
                  out.stride(1) == 1,
              "out must be [tokens, heads * head_dim], rows dense");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.is_contiguous() &&
                  block_tables.dim() == 2,
              "block_tables must be contiguous int64 [batch, max_blocks]");
  const int64_t batch = block_tables.size(0);
  for (const auto* t : {&query_offsets, &query_lens, &context_lens}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous() && t->numel() == batch,
                "query_offsets, query_lens and context_lens must be contiguous int64 [batch]");
  }
  TORCH_CHECK(block_size > 0 && key_cache.size(1) % block_size == 0,
              "the caches must hold whole blocks");
  // Every row a task writes and every block it reads must exist.
  const int64_t num_blocks = key_cache.size(1) / block_size, max_blocks = block_tables.size(1);
  const int64_t* offsets = query_offsets.data_ptr<int64_t>();
  const int64_t* qlens = query_lens.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(qlens[b] >= 1 && qlens[b] <= lens[b] && lens[b] <= max_blocks * block_size,
                "sequence ", b, ": ", qlens[b], " queries, ", lens[b],
                " keys do not fit its block table");
    TORCH_CHECK(offsets[b] >= 0 && offsets[b] + qlens[b] <= q.size(0), "sequence ", b,
                ": its queries are not rows of q");
    check_block_table(tables + b * max_blocks, b, lens[b], block_size, num_blocks);
  }
#ifdef RILLM_AVX512_BF16
  auto kernel = dim == 64    ? &prefill_attention<64>
                : dim == 128 ? &prefill_attention<128>
                             : &prefill_attention<256>;
  kernel(q, key_cache, value_cache, block_tables, query_offsets, query_lens, context_lens,
         block_size, scale, window, out);
#endif
}

}  // namespace rillm

TORCH_LIBRARY_FRAGMENT(rillm, m) {
  m.def(
      "paged_prefill_attention(Tensor q, Tensor key_cache, Tensor value_cache, "
      "Tensor block_tables, Tensor query_offsets, Tensor query_lens, Tensor context_lens, "
      "int block_size, float scale, Tensor(a!) out, int window=0) -> ()");
  m.impl("paged_prefill_attention", c10::DispatchKey::CPU, &rillm::paged_prefill_attention);
}
