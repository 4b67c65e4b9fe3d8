// Decode attention on an AVX2 CPU, one op per layer: each sequence of the batch writes its
// new key and value into its own KV-cache row and attends its one query over its own
// cached positions. model/kernels/cpu.py builds this file with matvec.cpp.
//
// It also takes several new tokens per sequence (a prompt chunk): they are written first,
// then each query attends over the positions up to its own, by the very code a one-token
// step runs. So a token's attention has the same bits whether it came in a chunk of any
// length or alone, which torch's attention (blocked matrix products whose blocking follows
// the chunk's length) does not promise; the engine's batch-invariant mode relies on it.
//
// Why: torch's version of this step is a dozen small operators per layer (cache writes
// through advanced indexing, a mask, dtype casts, scaled_dot_product_attention), which at
// batch 1 cost as much as the layer's matrix products (docs/engine.md). Here it is one pass over the keys and values a row
// actually holds: no mask, and no reading of other rows' padding in a batch of
// sequences of different lengths. Each row's arithmetic is the same whatever batch it
// is in. Scores and sums are float32 whatever the cache's dtype.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "kernels.h"
#include "pool.h"
#include "simd.h"

namespace {

using nanogpt_simd::OptionalTensor;
using nanogpt_simd::hsum;
using nanogpt_simd::load8;

// The scores of L positions from j on, scaled, into scores[j..j+L); returns the largest.
// Each score is one chain of dependent multiply-adds, which alone waits on the adder's
// latency: L = 4 independent chains keep it busy, and each
// score is summed in the very same order whatever L is.
template <int L, typename C>
float score(const float* q, const C* kc, int64_t j, int64_t hs, float scale, float* scores) {
  __m256 acc[L];
#pragma GCC unroll 4
  for (int l = 0; l < L; ++l) acc[l] = _mm256_setzero_ps();
  for (int64_t d = 0; d < hs; d += 8) {
    const __m256 qd = _mm256_loadu_ps(q + d);
#pragma GCC unroll 4
    for (int l = 0; l < L; ++l) acc[l] = _mm256_fmadd_ps(load8(kc + (j + l) * hs + d), qd, acc[l]);
  }
  float top = -std::numeric_limits<float>::infinity();
#pragma GCC unroll 4
  for (int l = 0; l < L; ++l) {
    scores[j + l] = hsum(acc[l]) * scale;
    top = std::max(top, scores[j + l]);
  }
  return top;
}

// e^x for x <= 0, 8 at a time (softmax's exponentials, after subtracting the largest score):
// x = n ln2 + r with |r| <= ln2/2, e^r by Cephes' degree-7 polynomial (within 2 ulp), times 2^n
// through the exponent bits. Below -87.3 (2^-126) the result is held at that least normal
// float, a weight no sum of ones notices. One std::exp per score cost more than the scores.
inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3365447f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504089f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln 2 in two parts: exact n * hi
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

// One (sequence, head): y = softmax(q K^T * scale) V over positions 0..pos, whose keys and
// values are in the cache. kc, vc: this row's and head's (S, hs) cache; q, y: hs floats.
template <typename C>
void attend(const float* q, const C* kc, const C* vc, int64_t pos, int64_t hs, float scale, float* scores, float* y) {
  const int64_t n = pos + 1;
  float top = -std::numeric_limits<float>::infinity();
  {
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) top = std::max(top, score<4>(q, kc, j, hs, scale, scores));
    for (; j < n; ++j) top = std::max(top, score<1>(q, kc, j, hs, scale, scores));
  }
  float total = 0.f;
  {
    const __m256 shift = _mm256_set1_ps(top);
    __m256 sum = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(scores + j), shift));
      _mm256_storeu_ps(scores + j, e);
      sum = _mm256_add_ps(sum, e);
    }
    total = hsum(sum);
    for (; j < n; ++j) {  // the tail through the same exp, one lane used
      scores[j] = _mm256_cvtss_f32(exp_nonpositive(_mm256_set1_ps(scores[j] - top)));
      total += scores[j];
    }
  }
  const __m256 norm = _mm256_set1_ps(1.f / total);
  for (int64_t d0 = 0; d0 < hs; d0 += 64) {  // up to 8 accumulators in registers at a time
    const int64_t width = std::min<int64_t>(64, hs - d0);
    __m256 acc[8];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
      const __m256 p = _mm256_set1_ps(scores[j]);
      const C* vj = vc + j * hs + d0;
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) {
        if (8 * i < width) acc[i] = _mm256_fmadd_ps(load8(vj + 8 * i), p, acc[i]);
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      if (8 * i < width) _mm256_storeu_ps(y + d0 + 8 * i, _mm256_mul_ps(acc[i], norm));
    }
  }
}

// The hs values of head h, token i of sequence b of a (B, nh, T, hs) tensor with a unit last
// stride (what splitting the fused q/k/v projection gives).
template <typename T>
const T* head(const at::Tensor& t, int64_t b, int64_t h, int64_t i) {
  return t.data_ptr<T>() + b * t.stride(0) + h * t.stride(1) + i * t.stride(2);
}

// Those values widened to float32.
template <typename T>
void gather(const at::Tensor& t, int64_t b, int64_t h, int64_t i, int64_t hs, float* out) {
  const T* p = head<T>(t, b, h, i);
  for (int64_t d = 0; d < hs; ++d) out[d] = static_cast<float>(p[d]);
}

// Those values into the cache's (S, hs) slice at position pos.
template <typename T, typename C>
void store(const at::Tensor& t, int64_t b, int64_t h, int64_t i, int64_t hs, C* cache, int64_t pos) {
  const T* p = head<T>(t, b, h, i);
  for (int64_t d = 0; d < hs; ++d) cache[pos * hs + d] = static_cast<C>(static_cast<float>(p[d]));
}

template <typename T>
void scatter(const float* in, at::Tensor& t, int64_t i, int64_t hs) {
  T* p = t.data_ptr<T>() + i * hs;
  for (int64_t d = 0; d < hs; ++d) p[d] = static_cast<T>(in[d]);
}

}  // namespace

namespace nanogpt {

// q, k, v: (B, nh, T, hs) this step's projections (T new tokens per sequence), one float
// dtype, unit last stride; k_cache, v_cache: (R, nh, S, hs) contiguous; rows: (B,) int64
// cache rows, or None for rows 0..B-1; pos: (B,) int64, the position each sequence's first
// new token takes. Returns y (B, T, nh, hs) in q's dtype: token t of sequence b attended
// over positions 0..pos[b]+t. Everything is read and converted in place: no temporaries per call.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                            at::Tensor& v_cache, const OptionalTensor& rows, const at::Tensor& pos) {
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu(), "decode_attention: CPU tensors only");
  TORCH_CHECK(q.dim() == 4 && q.size(2) >= 1, "decode_attention: q must be (B, n_head, T, head_dim)");
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), "decode_attention: q, k and v shapes differ");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "decode_attention: q, k and v dtypes differ");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "decode_attention: q, k and v need a unit last stride");
  const int64_t B = q.size(0), nh = q.size(1), T = q.size(2), hs = q.size(3);
  TORCH_CHECK(hs % 8 == 0, "decode_attention: head_dim must be a multiple of 8, got ", hs);
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  v_cache.sizes() == k_cache.sizes() && k_cache.size(1) == nh && k_cache.size(3) == hs &&
                  v_cache.scalar_type() == k_cache.scalar_type(),
              "decode_attention: caches must be contiguous (R, ", nh, ", S, ", hs, ") tensors of one dtype");
  const int64_t R = k_cache.size(0), S = k_cache.size(2);
  TORCH_CHECK(pos.scalar_type() == at::kLong && pos.numel() == B && (!rows.has_value() ||
                  (rows->scalar_type() == at::kLong && rows->numel() == B)),
              "decode_attention: rows and pos must be int64 vectors of ", B);
  const at::Tensor pos_c = pos.contiguous();
  const int64_t* pos_of = pos_c.data_ptr<int64_t>();
  std::vector<int64_t> row_of(B);
  const at::Tensor rows_c = rows.has_value() ? rows->contiguous() : at::Tensor();
  for (int64_t b = 0; b < B; ++b) {
    row_of[b] = rows.has_value() ? rows_c.data_ptr<int64_t>()[b] : b;
    TORCH_CHECK(row_of[b] >= 0 && row_of[b] < R, "decode_attention: row ", row_of[b], " outside the cache's ", R);
    TORCH_CHECK(pos_of[b] >= 0 && pos_of[b] + T <= S, "decode_attention: positions ", pos_of[b], "..",
                pos_of[b] + T - 1, " outside 0..", S - 1);
  }
  at::Tensor y = at::empty({B, T, nh, hs}, q.options());
  const float scale = 1.f / std::sqrt(static_cast<float>(hs));

  // Each task is one (sequence, head): its T keys and values go into the cache before any
  // of its queries reads them.
  auto run = [&](auto* kc, auto* vc, auto io) {
    using T_ = decltype(io);
    nanogpt::parallel_for(0, B * nh, 1, [&](int64_t i0, int64_t i1) {
      std::vector<float> scores(S), buf(2 * hs);  // q and y of one head, in float32
      float *qf = buf.data(), *yf = qf + hs;
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / nh, h = i % nh;
        const int64_t at_row = (row_of[b] * nh + h) * S * hs;
        for (int64_t t = 0; t < T; ++t) {
          store<T_>(k, b, h, t, hs, kc + at_row, pos_of[b] + t);
          store<T_>(v, b, h, t, hs, vc + at_row, pos_of[b] + t);
        }
        for (int64_t t = 0; t < T; ++t) {
          gather<T_>(q, b, h, t, hs, qf);
          attend(qf, kc + at_row, vc + at_row, pos_of[b] + t, hs, scale, scores.data(), yf);
          scatter<T_>(yf, y, (b * T + t) * nh + h, hs);
        }
      }
    });
  };
  auto with_cache = [&](auto io) {
    switch (k_cache.scalar_type()) {
      case at::kFloat: return run(k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), io);
      case at::kHalf: return run(k_cache.data_ptr<c10::Half>(), v_cache.data_ptr<c10::Half>(), io);
      case at::kBFloat16: return run(k_cache.data_ptr<c10::BFloat16>(), v_cache.data_ptr<c10::BFloat16>(), io);
      default: TORCH_CHECK(false, "decode_attention: float32, float16 or bfloat16 caches only, got ",
                           k_cache.scalar_type());
    }
  };
  switch (q.scalar_type()) {
    case at::kFloat: with_cache(float{}); break;
    case at::kHalf: with_cache(c10::Half{}); break;
    case at::kBFloat16: with_cache(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "decode_attention: float32, float16 or bfloat16 q only, got ", q.scalar_type());
  }
  return y;
}

}  // namespace nanogpt

TORCH_LIBRARY_FRAGMENT(nanogpt, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? rows, "
        "Tensor pos) -> Tensor");
  m.impl("decode_attention", c10::DispatchKey::CPU, TORCH_FN(nanogpt::decode_attention));
}
