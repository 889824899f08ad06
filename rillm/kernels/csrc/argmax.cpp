// The index of each row's largest logit (CPU, float32): greedy sampling's argmax over the
// vocabulary. PyTorch's takes ~20 us a row of 49k logits here (0.7 ms for a step of 32 rows);
// this one runs the rows on every thread and scans each with 16-wide compares.
//
// The same answer as torch.argmax(dim=-1): the first index of the maximum, and if a row holds
// a NaN, the first NaN's index (NaN counts as the largest value).
//
// Registered as torch.ops.rillm.argmax_rows (see rillm/kernels/__init__.py).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "kernels.h"

namespace {

int64_t first_nan(const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (std::isnan(x[i])) return i;
  return -1;
}

int64_t argmax_row(const float* x, int64_t n) {
  int64_t i = 0;
#ifdef RILLM_AVX512
  __m512 top = _mm512_set1_ps(-INFINITY);
  __mmask16 nan = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    top = _mm512_max_ps(top, v);
  }
  if (nan) return first_nan(x, n);
  float best = _mm512_reduce_max_ps(top);
#else
  float best = -INFINITY;
#endif
  for (int64_t j = i; j < n; ++j) {
    if (std::isnan(x[j])) return first_nan(x, n);
    best = x[j] > best ? x[j] : best;
  }
  // The first position holding the maximum.
  int64_t k = 0;
#ifdef RILLM_AVX512
  const __m512 wanted = _mm512_set1_ps(best);
  for (; k + 16 <= n; k += 16) {
    const __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + k), wanted, _CMP_EQ_OQ);
    if (hit) return k + __builtin_ctz(static_cast<unsigned>(hit));
  }
#endif
  for (; k < n; ++k)
    if (x[k] == best) return k;
  return 0;  // n == 0 is refused by the caller
}

}  // namespace

namespace rillm {

at::Tensor argmax_rows(const at::Tensor& logits) {
  TORCH_CHECK(logits.device().is_cpu(), "argmax_rows runs on the CPU");
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat,
              "argmax_rows takes float32 logits [rows, vocab]");
  TORCH_CHECK(logits.size(1) > 0, "argmax_rows needs at least one column");
  const auto x = logits.contiguous();
  const int64_t rows = x.size(0), n = x.size(1);
  auto out = at::empty({rows}, logits.options().dtype(at::kLong));
  const float* data = x.data_ptr<float>();
  int64_t* result = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) result[r] = argmax_row(data + r * n, n);
  });
  return out;
}

}  // namespace rillm

TORCH_LIBRARY_FRAGMENT(rillm, m) {
  m.def("argmax_rows(Tensor logits) -> Tensor");
  m.impl("argmax_rows", c10::DispatchKey::CPU, &rillm::argmax_rows);
}
