// Rotary embedding of a step's queries and keys, and the keys' and values' write into the paged
// KV cache, as one op (CPU).
//
// In PyTorch these are ~15 small ops a layer (slices, a concatenation, multiplies and an add
// for the rotation; transposes and two index_copy_ for the cache), each a few microseconds of
// dispatch for a few kilobytes of work. The arithmetic is PyTorch's own, rounding for
// rounding: x * cos and rotate_half(x) * sin are each rounded to the tensor's dtype, then their
// sum (no fused multiply-add), so the results are bit-identical to the PyTorch path.
//
// Registered as torch.ops.rillm.rotary_cache_write (see rillm/kernels/__init__.py).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "kernels.h"

#include <cstdint>

namespace {

// Each product and the sum are rounded to scalar_t, as in PyTorch; contraction into a fused
// multiply-add would skip a rounding.
template <typename scalar_t>
__attribute__((optimize("fp-contract=off"))) void rotate_row(const scalar_t* x, const scalar_t* cos,
                                                             const scalar_t* sin, scalar_t* out,
                                                             int64_t dim) {
  const int64_t half = dim / 2;
  for (int64_t i = 0; i < dim; ++i) {
    const scalar_t rotated = i < half ? static_cast<scalar_t>(-x[i + half]) : x[i - half];
    const scalar_t a = static_cast<scalar_t>(static_cast<float>(x[i]) * static_cast<float>(cos[i]));
    const scalar_t b =
        static_cast<scalar_t>(static_cast<float>(rotated) * static_cast<float>(sin[i]));
    out[i] = static_cast<scalar_t>(static_cast<float>(a) + static_cast<float>(b));
  }
}

template <>
__attribute__((optimize("fp-contract=off"))) void rotate_row<double>(
    const double* x, const double* cos, const double* sin, double* out, int64_t dim) {
  const int64_t half = dim / 2;
  for (int64_t i = 0; i < dim; ++i) {
    const double rotated = i < half ? -x[i + half] : x[i - half];
    const double a = x[i] * cos[i];
    const double b = rotated * sin[i];
    out[i] = a + b;
  }
}

template <typename scalar_t>
void rotary_cache(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& cos, const at::Tensor& sin, at::Tensor& key_cache,
                  at::Tensor& value_cache, const at::Tensor& slot_mapping, at::Tensor& q_out) {
  const int64_t tokens = q.size(0), num_heads = q.size(1), num_kv_heads = k.size(1);
  const int64_t dim = q.size(2), num_slots = key_cache.size(1);
  const scalar_t* q_data = q.data_ptr<scalar_t>();
  const scalar_t* k_data = k.data_ptr<scalar_t>();
  const scalar_t* v_data = v.data_ptr<scalar_t>();
  const scalar_t* cos_data = cos.data_ptr<scalar_t>();
  const scalar_t* sin_data = sin.data_ptr<scalar_t>();
  scalar_t* key_data = key_cache.data_ptr<scalar_t>();
  scalar_t* value_data = value_cache.data_ptr<scalar_t>();
  scalar_t* out = q_out.data_ptr<scalar_t>();
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  // Few tokens (decode) run on the calling thread: a parallel region costs more than the work.
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const scalar_t* c = cos_data + t * cos.stride(0);
      const scalar_t* s = sin_data + t * sin.stride(0);
      for (int64_t h = 0; h < num_heads; ++h) {
        rotate_row(q_data + t * q.stride(0) + h * q.stride(1), c, s,
                   out + (t * num_heads + h) * dim, dim);
      }
      const int64_t slot = slots[t];
      for (int64_t h = 0; h < num_kv_heads; ++h) {
        rotate_row(k_data + t * k.stride(0) + h * k.stride(1), c, s,
                   key_data + (h * num_slots + slot) * dim, dim);
        const scalar_t* src = v_data + t * v.stride(0) + h * v.stride(1);
        std::copy(src, src + dim, value_data + (h * num_slots + slot) * dim);
      }
    }
  });
}

}  // namespace

namespace rillm {

at::Tensor rotary_cache_write(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& cos, const at::Tensor& sin, at::Tensor key_cache,
                              at::Tensor value_cache, const at::Tensor& slot_mapping) {
  TORCH_CHECK(q.device().is_cpu(), "rotary_cache_write runs on the CPU");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3,
              "q, k, v must be [tokens, heads, head_dim]");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1,
              "q, k, v rows must be dense");
  TORCH_CHECK(k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(2) == k.size(2),
              "q, k, v disagree in shape");
  TORCH_CHECK(q.size(2) % 2 == 0, "head_dim must be even");
  TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(0) == q.size(0) &&
                  cos.size(1) == q.size(2) && cos.stride(1) == 1 && sin.stride(1) == 1,
              "cos and sin must be [tokens, head_dim] with dense rows");
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous() &&
                  key_cache.sizes() == value_cache.sizes() && key_cache.dim() == 3 &&
                  key_cache.size(0) == k.size(1) && key_cache.size(2) == k.size(2),
              "the caches must be contiguous [kv_heads, slots, head_dim]");
  for (const auto& t : {k, v, cos, sin, key_cache, value_cache}) {
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), "every tensor must share q's dtype");
  }
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous() &&
                  slot_mapping.numel() == q.size(0),
              "slot_mapping must be contiguous int64 [tokens]");
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < q.size(0); ++t) {
    TORCH_CHECK(slots[t] >= 0 && slots[t] < key_cache.size(1), "slot_mapping[", t, "] = ",
                slots[t], " is not a cache slot");
  }
  auto q_out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "rotary_cache_write",
                                  [&] {
                                    rotary_cache<scalar_t>(q, k, v, cos, sin, key_cache,
                                                           value_cache, slot_mapping, q_out);
                                  });
  return q_out;
}

}  // namespace rillm

TORCH_LIBRARY_FRAGMENT(rillm, m) {
  m.def(
      "rotary_cache_write(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, "
      "Tensor(a!) key_cache, Tensor(b!) value_cache, Tensor slot_mapping) -> Tensor");
  m.impl("rotary_cache_write", c10::DispatchKey::CPU, &rillm::rotary_cache_write);
}
