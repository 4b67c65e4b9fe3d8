// The sampler's counter-based uniforms on a CPU, as one op: model/sampling.py's hash of
// (row key, token id) and its 24-bit uniform, the same arithmetic as its tensor ops, in one pass.
//
// Why: those tensor ops are some 35 passes over a (rows, vocabulary) int64 tensor; sampling
// from the whole vocabulary (temperature, no top-k) then costs as much as the model's forward
// pass at large batches (docs/engine.md). Here it is one pass.
// The uniforms are equal to the tensor ops' to the bit (integer hashing, then exact float steps;
// tests compare them), so which path ran never shows.
//
// And argmax over each row of logits, as torch.argmax gives it (the first largest; the first
// NaN where there is one) but 8 values at a time: torch's CPU argmax keeps an index beside
// every value it compares, slow over GPT-2's 50257 logits; two vector passes are not.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include <immintrin.h>

#include "pool.h"

namespace {

// model/sampling.py's _mix32 ("lowbias32"), in uint32 arithmetic.
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

// The index of the first largest of x[0..n), or of the first NaN (NaN counts as largest, as in
// torch.argmax). Pass one finds the largest value (and whether any is NaN), pass two where it
// first is: two passes over a row that stays in cache, each 8 floats at a time.
int64_t argmax_row(const float* x, int64_t n) {
  __m256 top = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 nan = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    top = _mm256_max_ps(top, v);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, top);
  float m = lanes[0];
  for (int l = 1; l < 8; ++l) m = std::max(m, lanes[l]);
  bool any_nan = _mm256_movemask_ps(nan) != 0;
  for (int64_t j = i; j < n; ++j) {
    any_nan = any_nan || std::isnan(x[j]);
    m = std::max(m, x[j]);
  }
  if (any_nan) {
    for (int64_t j = 0; j < n; ++j) {
      if (std::isnan(x[j])) return j;
    }
  }
  const __m256 target = _mm256_set1_ps(m);
  for (i = 0; i + 8 <= n; i += 8) {
    const int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), target, _CMP_EQ_OQ));
    if (hit != 0) return i + __builtin_ctz(static_cast<unsigned>(hit));
  }
  for (; i < n; ++i) {
    if (x[i] == m) return i;
  }
  return 0;  // unreachable: m is one of the values
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
  nanogpt::parallel_for(0, B * K, 16384, [&](int64_t i0, int64_t i1) {
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

// x: (B, V) float32 -> (B,) int64, torch.argmax(x, dim=-1)'s answer.
at::Tensor argmax_rows(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2,
              "argmax_rows: a (B, V) float32 CPU tensor only");
  TORCH_CHECK(x.size(1) > 0, "argmax_rows: rows of no values have no argmax");
  const at::Tensor xc = x.contiguous();
  const int64_t B = xc.size(0), V = xc.size(1);
  at::Tensor out = at::empty({B}, xc.options().dtype(at::kLong));
  const float* xp = xc.data_ptr<float>();
  int64_t* o = out.data_ptr<int64_t>();
  nanogpt::parallel_for(0, B, std::max<int64_t>(1, 65536 / V), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) o[b] = argmax_row(xp + b * V, V);
  });
  return out;
}

}  // namespace nanogpt

TORCH_LIBRARY_FRAGMENT(nanogpt, m) {
  m.def("argmax_rows(Tensor x) -> Tensor");
  m.impl("argmax_rows", c10::DispatchKey::CPU, TORCH_FN(nanogpt::argmax_rows));
  m.def("noise_uniform(Tensor row_key, Tensor token_ids) -> Tensor");
  m.impl("noise_uniform", c10::DispatchKey::CPU, TORCH_FN(nanogpt::noise_uniform));
}
