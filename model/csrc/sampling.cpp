// The sampler's counter-based uniforms on a CPU, as one op: model/sampling.py's hash of
// (row key, token id) and its 24-bit uniform, the same arithmetic as its tensor ops, in one pass.
//
// Why: those tensor ops are some 35 passes over a (rows, vocabulary) int64 tensor. Sampling
// from the whole vocabulary (an OpenAI-style request: temperature, no top-k) took 61-87 ms
// per step at batch 32 on the Xeon, as long as the model's forward pass; here it is one pass.
// The uniforms are equal to the tensor ops' to the bit (integer hashing, then exact float steps;
// tests compare them), so which path ran never shows.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

namespace {

// model/sampling.py's _mix32 ("lowbias32"), in uint32 arithmetic.
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

}  // namespace

namespace nanogpt {

// row_key: (B,) int64 in [0, 2**32); token_ids: (K,) or (B, K) int64. Returns (B, K) float32:
// u = ((bits >> 8) + 0.5) / 2**24 with bits = mix32(row_key[b] ^ mix32(token_ids[b, k] + 0x85EBCA6B)),
// as gumbel_noise computes them (every float step is exact, so the bits are the same).
at::Tensor noise_uniform(const at::Tensor& row_key, const at::Tensor& token_ids) {
  TORCH_CHECK(row_key.device().is_cpu() && token_ids.device().is_cpu(), "noise_uniform: CPU tensors only");
  TORCH_CHECK(row_key.scalar_type() == at::kLong && token_ids.scalar_type() == at::kLong,
              "noise_uniform: int64 tensors only");
  TORCH_CHECK(row_key.dim() == 1, "noise_uniform: row_key must be (B,)");
  const int64_t B = row_key.size(0);
  TORCH_CHECK(token_ids.dim() == 1 || (token_ids.dim() == 2 && token_ids.size(0) == B),
              "noise_uniform: token_ids must be (K,) or (", B, ", K)");
  const int64_t K = token_ids.size(-1);
  const bool shared = token_ids.dim() == 1;
  const at::Tensor keys = row_key.contiguous(), ids = token_ids.contiguous();
  const int64_t* key = keys.data_ptr<int64_t>();
  const int64_t* id = ids.data_ptr<int64_t>();
  at::Tensor out = at::empty({B, K}, row_key.options().dtype(at::kFloat));
  float* u = out.data_ptr<float>();
  at::parallel_for(0, B * K, 16384, [&](int64_t i0, int64_t i1) {
    while (i0 < i1) {  // row by row: no division per element, and a loop the compiler vectorizes
      const int64_t b = i0 / K, k0 = i0 % K, k1 = std::min(K, k0 + (i1 - i0));
      const uint32_t row = static_cast<uint32_t>(key[b]);
      const int64_t* ids_b = shared ? id : id + b * K;
      float* u_b = u + b * K;
      for (int64_t k = k0; k < k1; ++k) {
        const uint32_t bits = mix32(row ^ mix32(static_cast<uint32_t>(ids_b[k] + 0x85EBCA6Bll)));
        u_b[k] = (static_cast<float>(bits >> 8) + 0.5f) * 0x1p-24f;
      }
      i0 += k1 - k0;
    }
  });
  return out;
}

}  // namespace nanogpt

TORCH_LIBRARY_FRAGMENT(nanogpt, m) {
  m.def("noise_uniform(Tensor row_key, Tensor token_ids) -> Tensor");
  m.impl("noise_uniform", c10::DispatchKey::CPU, TORCH_FN(nanogpt::noise_uniform));
}
