// y = x W^T + b for the few rows of x of decoding on an x86-64 CPU with AVX2 (or AVX-512):
// matrix-vector products, and skinny matrix products in blocks of up to kBlockRows rows, over
// float32/float16/bfloat16 weights (linear_rows) or int8 weights with group scales (linear_rows_int8). model/kernels/cpu.py
// builds this file with torch's extension builder and routes small nn.Linear calls here.
//
// Why: at batch 1 a decode step is one pass over every weight, so its speed is memory
// bandwidth; streaming each weight row once, converting half precision to float32 in
// registers and accumulating in float32 (as llama.cpp does) gets closer to it than torch's
// GEMV. Each weight is loaded once per block and used for every row of x in it, so a block
// of kBlockRows rows costs little more than one row. Where torch's GEMMs overtake it depends
// on the CPU: model/engine/cpu_setup.py measures it at start-up (figures: docs/engine.md).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels.h"
#include "pool.h"
#include "simd.h"

namespace {

using nanogpt_simd::OptionalTensor;

constexpr int64_t kBlockRows = 8;  // accumulators in registers: one per row

// The int8 kernels' split of output rows among threads (as dispatch_rows below, with panels sized
// for one byte a weight): fn(p0, p1) runs over output rows [p0, p1). With `many` rows of x, a
// thread takes its outputs a panel of 64-150 KiB of weights at a time and runs every row of x
// over the panel before moving on; otherwise its whole range is one panel.
template <typename Fn>
void for_panels(bool many, int64_t N, int64_t K, const Fn& fn) {
  const int64_t grain = std::max({int64_t{16}, 65536 / K, N / (4 * at::get_num_threads())});
  const int64_t panel = many ? (std::max<int64_t>(4, 65536 / K) + 23) / 24 * 24 : N;
  nanogpt::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t p0 = n0; p0 < n1; p0 += panel) fn(p0, std::min(p0 + panel, n1));
  });
}

namespace avx2 {
struct V {
  using Vec = __m256;
  static constexpr int kWidth = 8;
  static Vec zero() { return _mm256_setzero_ps(); }
  template <typename T>
  static Vec load(const T* p) { return nanogpt_simd::load8(p); }
  static Vec loadx(const float* p) { return _mm256_loadu_ps(p); }
  static Vec fma(Vec a, Vec b, Vec acc) { return _mm256_fmadd_ps(a, b, acc); }
  static float sum(Vec v) { return nanogpt_simd::hsum(v); }
  static Vec loadq(const int8_t* p) {  // 8 int8 -> 8 float32
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
  static Vec set1(float v) { return _mm256_set1_ps(v); }
  using IVec = __m256i;  // 16 int16 or 8 int32
  static IVec izero() { return _mm256_setzero_si256(); }
  static IVec loadq16(const int8_t* p) {  // 16 int8 -> 16 int16
    return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static IVec loadx16(const int16_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static void storex16(int16_t* p, IVec v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
  static IVec pair(const int16_t* p) {
    int32_t v;
    std::memcpy(&v, p, sizeof v);
    return _mm256_set1_epi32(v);
  }
  static IVec madd(IVec a, IVec b, IVec acc) { return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b)); }
  static Vec cvt(IVec v) { return _mm256_cvtepi32_ps(v); }
  static void store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
  // lane i: the sum of v[i]'s 8 int32 lanes. Pairs of vectors interleaved and added within each
  // 128-bit half, twice, then the two halves added.
  static __m256i reduce8(const IVec* v) {
    __m256i u[2];
    for (int h = 0; h < 2; ++h) {
      const IVec* w = v + 4 * h;
      const __m256i a = _mm256_add_epi32(_mm256_unpacklo_epi32(w[0], w[1]), _mm256_unpackhi_epi32(w[0], w[1]));
      const __m256i b = _mm256_add_epi32(_mm256_unpacklo_epi32(w[2], w[3]), _mm256_unpackhi_epi32(w[2], w[3]));
      u[h] = _mm256_add_epi32(_mm256_unpacklo_epi64(a, b), _mm256_unpackhi_epi64(a, b));
    }
    return _mm256_add_epi32(_mm256_permute2x128_si256(u[0], u[1], 0x20), _mm256_permute2x128_si256(u[0], u[1], 0x31));
  }
};
#include "matvec_rows.inc"
#include "matvec_int8_rows.inc"
}  // namespace avx2

// The same kernel in 16-float vectors, for CPUs with AVX-512: twice the weights per
// conversion and FMA (faster than the AVX2 build there; docs/engine.md). Only this file's own code is
// compiled for AVX-512 (every header is included above), so no function that other files
// share can end up holding its instructions.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw")
namespace avx512 {
struct V {
  using Vec = __m512;
  static constexpr int kWidth = 16;
  static Vec zero() { return _mm512_setzero_ps(); }
  static Vec load(const float* p) { return _mm512_loadu_ps(p); }
  static Vec load(const c10::Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static Vec load(const c10::BFloat16* p) {  // bfloat16 is the top half of a float32
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
  static Vec loadx(const float* p) { return _mm512_loadu_ps(p); }
  static Vec fma(Vec a, Vec b, Vec acc) { return _mm512_fmadd_ps(a, b, acc); }
  static float sum(Vec v) {  // two 8-float halves, then as AVX2's
    const __m256 lo = _mm512_castps512_ps256(v);
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    return nanogpt_simd::hsum(_mm256_add_ps(lo, hi));
  }
  static Vec loadq(const int8_t* p) {  // 16 int8 -> 16 float32
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
  static Vec set1(float v) { return _mm512_set1_ps(v); }
  using IVec = __m512i;  // 32 int16 or 16 int32
  static IVec izero() { return _mm512_setzero_si512(); }
  static IVec loadq16(const int8_t* p) {  // 32 int8 -> 32 int16
    return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static IVec loadx16(const int16_t* p) { return _mm512_loadu_si512(p); }
  static void storex16(int16_t* p, IVec v) { _mm512_storeu_si512(p, v); }
  static IVec pair(const int16_t* p) {
    int32_t v;
    std::memcpy(&v, p, sizeof v);
    return _mm512_set1_epi32(v);
  }
  static IVec madd(IVec a, IVec b, IVec acc) { return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b)); }
  static Vec cvt(IVec v) { return _mm512_cvtepi32_ps(v); }
  static void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
  // lane i: the sum of v[i]'s 16 int32 lanes. As AVX2's within each 128-bit quarter, then the
  // quarters added: 3 operations a vector.
  static __m256i reduce8(const IVec* v) {
    __m512i u[2];
    for (int h = 0; h < 2; ++h) {
      const IVec* w = v + 4 * h;
      const __m512i a = _mm512_add_epi32(_mm512_unpacklo_epi32(w[0], w[1]), _mm512_unpackhi_epi32(w[0], w[1]));
      const __m512i b = _mm512_add_epi32(_mm512_unpacklo_epi32(w[2], w[3]), _mm512_unpackhi_epi32(w[2], w[3]));
      u[h] = _mm512_add_epi32(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b));
    }
    // quarters [u0.0 + u0.2, u0.1 + u0.3, u1.0 + u1.2, u1.1 + u1.3], then in the order 0 2 1 3
    const __m512i w = _mm512_add_epi32(_mm512_shuffle_i32x4(u[0], u[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                       _mm512_shuffle_i32x4(u[0], u[1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512i e = _mm512_shuffle_i32x4(w, w, _MM_SHUFFLE(3, 1, 2, 0));
    return _mm256_add_epi32(_mm512_castsi512_si256(e), _mm512_extracti64x4_epi64(e, 1));
  }
};
#include "matvec_rows.inc"
#include "matvec_int8_rows.inc"
}  // namespace avx512
#pragma GCC pop_options

// The int8 kernel once more for CPUs with AVX-512 VNNI: vpdpwssd does the int16 products' multiply
// and add in one instruction (vpmaddwd then vpaddd otherwise), which bounds the int16 path at
// many rows of x, where the weights stay in cache (32 rows: a decode step of 32 clients). The
// same int32 sums (neither wraps where the other does not), so the same bits.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vnni")
namespace avx512_vnni {
struct V : avx512::V {
  static IVec madd(IVec a, IVec b, IVec acc) { return _mm512_dpwssd_epi32(acc, a, b); }
};
#include "matvec_int8_rows.inc"
}  // namespace avx512_vnni
#pragma GCC pop_options

// AVX-512 where the CPU has it, unless NANOGPT_CPU_ISA=avx2 (read per call, so that tests can
// run both). Every row of one call goes through the same kind, which keeps a row's numbers
// independent of its batch; the two kinds sum in different orders.
bool isa_env_is(const char* name) {
  const char* isa = std::getenv("NANOGPT_CPU_ISA");
  return isa != nullptr && std::strcmp(isa, name) == 0;
}

bool use_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  return has && !isa_env_is("avx2");
}

// ... and its VNNI instructions for the int16 products, unless NANOGPT_CPU_ISA=avx512 (or avx2).
bool use_avx512_vnni() {
  static const bool has = __builtin_cpu_supports("avx512vnni");
  return has && use_avx512() && !isa_env_is("avx512");
}

std::string kernel_isa() { return use_avx512() ? "avx512" : "avx2"; }

// Threads split the output rows. With more than one block of x's rows, each thread takes its
// outputs a panel at a time (64-150 KiB of weights, which stays in L2) and runs every block
// over the panel before moving on: the weights cross the memory bus once per call rather than
// once per block, which is what bounds a block-at-a-time loop (at 32 rows, four passes over
// every weight per step).
template <typename T>
void dispatch_rows(int64_t M, const float* x, const T* w, const T* bias, T* y, int64_t N, int64_t K) {
  const auto row_block = use_avx512() ? avx512::row_block<T> : avx2::row_block<T>;
  // Enough output rows per task that each thread streams long runs of weights, and at
  // least 64K weights per task: below that, waking a second thread costs more than it saves.
  const int64_t grain = std::max({int64_t{16}, 65536 / K, N / (4 * at::get_num_threads())});
  // Whole groups of output rows (matvec_rows.inc takes 1-4 together in blocks of 2-8 rows: 12 is a
  // multiple of each); a panel of 5 rows of 3072 float32 weights left two of them to one-row
  // loops. A block of one row (the last of a batch of 9, 17, ...) takes 8 and leaves 4 of 12.
  // One block of x's rows (a batch of up to kBlockRows) has nothing to reuse: it takes the
  // thread's whole range as one panel, since the kernel's prefetch of the next rows stops at
  // a panel's end (at batch 1, 1-4% faster over GPT-2 124M, most in half precision).
  const int64_t panel = M <= kBlockRows ? N : (std::max<int64_t>(4, 65536 / (K * int64_t{sizeof(T)})) + 11) / 12 * 12;
  nanogpt::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t p0 = n0; p0 < n1; p0 += panel) {
      const int64_t p1 = std::min(p0 + panel, n1);
      for (int64_t m0 = 0; m0 < M; m0 += kBlockRows) {
        row_block(std::min(kBlockRows, M - m0), x + m0 * K, w, bias, y + m0 * N, p0, p1, N, K);
      }
    }
  });
}

template <typename T>
void dispatch_int8_rows(int64_t M, const float* x, const int8_t* q, const float* scale, const T* bias, T* y,
                        int64_t N, int64_t K, int64_t G) {
  const auto row_block = use_avx512() ? avx512::int8_row_block<T> : avx2::int8_row_block<T>;
  for_panels(M > kBlockRows, N, K, [&](int64_t p0, int64_t p1) {
    for (int64_t m0 = 0; m0 < M; m0 += kBlockRows) {
      row_block(std::min(kBlockRows, M - m0), x + m0 * K, q, scale, bias, y + m0 * N, p0, p1, N, K, G);
    }
  });
}

// Half-precision x through the int16 products (matvec_int8_rows.inc's int8_i16_products): each row
// rounded to int16 with its own scale, largest |x| / 32767 (0 for a row of zeros; NaN for a row
// that is not finite, whose outputs are then all NaN). Where G allows it: int16_groups_ok.
constexpr int64_t kI16PassRows = 64;  // rows of x a pass (dispatch_int8_i16_rows)
constexpr int64_t kMaxI16Group = 512;  // a group's sum: G products of at most 127 * 32767 in an int32
// 32: AVX-512's step too; the scales' offsets in int32 (int8_i16_rows_of_w's gather)
bool int16_groups_ok(int64_t N, int64_t K, int64_t G) {
  return G % 32 == 0 && G <= kMaxI16Group && N * (K / G) <= std::numeric_limits<int32_t>::max();
}

// One row of x (K a multiple of 8) rounded to int16 as described above, 8 values a step: the same
// float32 product and round-to-nearest-even (cvtps under the default MXCSR, as std::lrint) as one
// at a time, so the same bits, without the scalar loop's 10-15 us a call at K = 3072.
template <typename T>
void round_row_int16(const T* row, int64_t K, int16_t* out, float* sx) {
  const __m256 sign = _mm256_set1_ps(-0.f), big = _mm256_set1_ps(std::numeric_limits<float>::max());
  __m256 amax = _mm256_setzero_ps(), finite = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  for (int64_t k = 0; k < K; k += 8) {
    const __m256 a = _mm256_andnot_ps(sign, nanogpt_simd::load8(row + k));
    finite = _mm256_and_ps(finite, _mm256_cmp_ps(a, big, _CMP_LE_OQ));  // false for inf and NaN
    amax = _mm256_max_ps(amax, a);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, amax);
  const float m = *std::max_element(lanes, lanes + 8);
  const bool all_finite = _mm256_movemask_ps(finite) == 0xff;
  const float inv = all_finite && m > 0.f ? 32767.f / m : 0.f;
  *sx = !all_finite ? std::numeric_limits<float>::quiet_NaN() : m / 32767.f;
  const __m256 vinv = _mm256_set1_ps(inv);
  for (int64_t k = 0; k < K; k += 16) {
    const __m256i lo = _mm256_cvtps_epi32(_mm256_mul_ps(nanogpt_simd::load8(row + k), vinv));
    const __m256i hi = _mm256_cvtps_epi32(_mm256_mul_ps(nanogpt_simd::load8(row + k + 8), vinv));
    // packs works within 128-bit lanes (lo0-3 hi0-3 lo4-7 hi4-7): the permute puts them in order
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k), packed);
  }
}

template <typename T>
void dispatch_int8_i16_rows(int64_t M, const T* x, const int8_t* q, const float* scale, const T* bias, T* y,
                            int64_t N, int64_t K, int64_t G) {
  const at::Tensor x16_t = at::empty({M * K}, at::kShort), sx_t = at::empty({M}, at::kFloat);  // 64-byte aligned
  int16_t* x16 = x16_t.data_ptr<int16_t>();
  float* sx = sx_t.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) round_row_int16(x + m * K, K, x16 + m * K, sx + m);  // K: a multiple of 32
  const auto products = use_avx512_vnni() ? avx512_vnni::int8_i16_products<T>
                        : use_avx512()    ? avx512::int8_i16_products<T>
                                          : avx2::int8_i16_products<T>;
  // a pass's int16 x (64 rows: 384 KiB at K = 3072) stays in L2 beside a panel of weights
  for (int64_t m0 = 0; m0 < M; m0 += kI16PassRows) {
    products(std::min(kI16PassRows, M - m0), x16 + m0 * K, sx + m0, q, scale, bias, y + m0 * N, N, K, G);
  }
}

// x's rows as float32 on a 64-byte boundary. Every step of the kernel loads a vector from each
// row of x, and a 64-byte load that straddles two cache lines costs two, which a std::vector
// (16-byte aligned) would make every one of them. Same numbers.
struct AlignedX {
  float* data = nullptr;
  AlignedX() = default;
  AlignedX(const AlignedX&) = delete;
  AlignedX& operator=(const AlignedX&) = delete;
  ~AlignedX() { std::free(data); }
};

template <typename T>
const float* aligned_rows(const T* src, int64_t n, AlignedX& buf) {
  if constexpr (std::is_same_v<T, float>) {
    if (reinterpret_cast<uintptr_t>(src) % 64 == 0) return src;
  }
  buf.data = static_cast<float*>(std::aligned_alloc(64, (n * int64_t{sizeof(float)} + 63) / 64 * 64));
  TORCH_CHECK(buf.data != nullptr, "linear_rows: out of memory widening x (", n, " floats)");
  for (int64_t i = 0; i < n; ++i) buf.data[i] = static_cast<float>(src[i]);
  return buf.data;
}

// linear_rows_int8's products for contiguous x of dtype T (y and the bias in T too): half-precision x
// through the int16 products where its groups allow them (x's int16 rounding is finer than its own),
// float32 x and other groups through the float32 widening.
template <typename T>
void int8_products(int64_t M, const at::Tensor& xc, const int8_t* q, const float* scale, const OptionalTensor& bias,
                   at::Tensor& y, int64_t N, int64_t K, int64_t G) {
  const T* b = bias ? bias->data_ptr<T>() : nullptr;
  if constexpr (!std::is_same_v<T, float>) {
    if (int16_groups_ok(N, K, G)) {
      dispatch_int8_i16_rows<T>(M, xc.data_ptr<T>(), q, scale, b, y.data_ptr<T>(), N, K, G);
      return;
    }
  }
  AlignedX aligned;
  dispatch_int8_rows<T>(M, aligned_rows(xc.data_ptr<T>(), M * K, aligned), q, scale, b, y.data_ptr<T>(), N, K, G);
}

}  // namespace

namespace nanogpt {

at::Tensor linear_rows(const at::Tensor& x, const at::Tensor& weight, const OptionalTensor& bias) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "linear_rows: CPU tensors only");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "linear_rows: weight must be a contiguous [out, in] matrix");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "linear_rows: x is ", x.scalar_type(), " but weight is ",
              weight.scalar_type());
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "linear_rows: x's last dimension must be ", K);
  const int64_t M = x.numel() / K;
  TORCH_CHECK(M >= 1, "linear_rows: x has no rows");
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == weight.scalar_type() && bias->is_contiguous() && bias->numel() == N,
                "linear_rows: bias must be a contiguous vector of ", N, " ", weight.scalar_type());
  }
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor y = at::empty(out_shape, x.options());
  const at::Tensor xc = x.contiguous();
  // x as M x K float32: KiBs, widened here rather than by a torch op (one op per call adds up).
  AlignedX aligned;
  const float* xp = nullptr;
  switch (x.scalar_type()) {
    case at::kFloat: xp = aligned_rows(xc.data_ptr<float>(), M * K, aligned); break;
    case at::kHalf: xp = aligned_rows(xc.data_ptr<c10::Half>(), M * K, aligned); break;
    case at::kBFloat16: xp = aligned_rows(xc.data_ptr<c10::BFloat16>(), M * K, aligned); break;
    default: break;  // refused below
  }

  switch (weight.scalar_type()) {
    case at::kFloat:
      dispatch_rows<float>(M, xp, weight.data_ptr<float>(), bias ? bias->data_ptr<float>() : nullptr,
                           y.data_ptr<float>(), N, K);
      break;
    case at::kHalf:
      dispatch_rows<c10::Half>(M, xp, weight.data_ptr<c10::Half>(), bias ? bias->data_ptr<c10::Half>() : nullptr,
                               y.data_ptr<c10::Half>(), N, K);
      break;
    case at::kBFloat16:
      dispatch_rows<c10::BFloat16>(M, xp, weight.data_ptr<c10::BFloat16>(),
                                   bias ? bias->data_ptr<c10::BFloat16>() : nullptr, y.data_ptr<c10::BFloat16>(), N, K);
      break;
    default:
      TORCH_CHECK(false, "linear_rows: float32, float16 or bfloat16 only, got ", weight.scalar_type());
  }
  return y;
}

at::Tensor linear_rows_int8(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                            const OptionalTensor& bias) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu() && scale.device().is_cpu(),
              "linear_rows_int8: CPU tensors only");
  TORCH_CHECK(weight.scalar_type() == at::kChar && weight.dim() == 2 && weight.is_contiguous(),
              "linear_rows_int8: weight must be a contiguous int8 [out, in] matrix");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 2 && scale.is_contiguous() && scale.size(0) == N &&
                  scale.size(1) >= 1 && K % scale.size(1) == 0,
              "linear_rows_int8: scale must be a contiguous float32 [", N, ", groups] matrix, groups dividing ", K);
  const int64_t G = K / scale.size(1);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "linear_rows_int8: x's last dimension must be ", K);
  const int64_t M = x.numel() / K;
  TORCH_CHECK(M >= 1, "linear_rows_int8: x has no rows");
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->is_contiguous() && bias->numel() == N,
                "linear_rows_int8: bias must be a contiguous vector of ", N, " ", x.scalar_type());
  }
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor y = at::empty(out_shape, x.options());
  const at::Tensor xc = x.contiguous();
  const int8_t* qp = weight.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  switch (x.scalar_type()) {  // y and the bias in x's dtype, as Int8Linear's
    case at::kFloat: int8_products<float>(M, xc, qp, sp, bias, y, N, K, G); break;
    case at::kHalf: int8_products<c10::Half>(M, xc, qp, sp, bias, y, N, K, G); break;
    case at::kBFloat16: int8_products<c10::BFloat16>(M, xc, qp, sp, bias, y, N, K, G); break;
    default:
      TORCH_CHECK(false, "linear_rows_int8: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  }
  return y;
}

}  // namespace nanogpt

TORCH_LIBRARY_FRAGMENT(nanogpt, m) {
  m.def("kernel_isa() -> str", TORCH_FN(kernel_isa));  // what linear_rows runs on here, now
  m.def("linear_rows(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.impl("linear_rows", c10::DispatchKey::CPU, TORCH_FN(nanogpt::linear_rows));
  m.def("linear_rows_int8(Tensor x, Tensor weight, Tensor scale, Tensor? bias) -> Tensor");
  m.impl("linear_rows_int8", c10::DispatchKey::CPU, TORCH_FN(nanogpt::linear_rows_int8));
}
