// y = x W^T + b for the few rows of x of decoding on an AVX2 CPU: matrix-vector products,
// and skinny matrix products in blocks of up to kBlockRows rows. model/cpukernels.py builds
// this file with torch's extension builder and routes small nn.Linear calls here.
//
// Why: at batch 1 a decode step is one pass over every weight, so its speed is memory
// bandwidth. On a 2-core AMD EPYC torch's float32 GEMV reaches about two thirds of the read
// bandwidth and its half-precision GEMV about the same in bytes; streaming each weight
// row once, converting half precision to float32 in registers and accumulating in
// float32 (as llama.cpp does) reaches nearly all of it. Each weight is loaded once per
// block and used for every row of x in it, so a block of kBlockRows rows costs little
// more than one row; on the EPYC that also beats torch's float32 GEMM up to a few dozen
// rows and its half-precision GEMM far beyond, while on a Xeon with AVX-512 and AMX
// torch's GEMMs win from 8 rows on (model/fastpath.py measures where the crossover lies).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "kernels.h"
#include "simd.h"

namespace {

using nanogpt_simd::OptionalTensor;
using nanogpt_simd::hsum;
using nanogpt_simd::load8;

constexpr int64_t kBlockRows = 8;  // accumulators in registers: one per row

// Output rows [n0, n1) for M rows of x (float32, M x K): each weight is loaded once and
// used for every row of x. One accumulator per row: M <= 8 of them fit in 16 registers
// beside a weight vector, and each output is summed in the same order whatever M is, so
// a sequence decoded beside others gets the very same numbers as alone. For one or two
// rows of x, R output rows go together and the next R rows' weights are prefetched: one
// stream of weights per thread, converted and summed as it arrives, read 12 GB/s of
// half-precision weights at batch 1 on a 2-core Intel Xeon, R = 4 streams and the
// prefetches 16-20 GB/s, its read bandwidth (not yet measured on the EPYC).
template <typename T, int M, int R>
void rows_of_w(const float* x, const T* w, const T* bias, T* y, int64_t n0, int64_t n1, int64_t N, int64_t K) {
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    // The loops over m and r are unrolled in full so that the accumulators live in registers
    // (left as an array, GCC stores them to the stack on every iteration).
    __m256 acc[R][M];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      if (R > 1 && (k & (64 / sizeof(T) - 1)) == 0 && n + 2 * R <= n1) {  // a cache line each
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + (n + R + r) * K + k), _MM_HINT_T0);
      }
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m256 wk = load8(w + (n + r) * K + k);
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) acc[r][m] = _mm256_fmadd_ps(wk, _mm256_loadu_ps(x + m * K + k), acc[r][m]);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const T* wn = w + (n + r) * K;
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        float s = hsum(acc[r][m]);
        for (int64_t j = k; j < K; ++j) s += static_cast<float>(wn[j]) * x[m * K + j];
        if (bias != nullptr) s += static_cast<float>(bias[n + r]);
        y[m * N + n + r] = static_cast<T>(s);
      }
    }
  }
  if constexpr (R > 1) rows_of_w<T, M, 1>(x, w, bias, y, n, n1, N, K);
}

template <typename T>
void row_block(int64_t M, const float* x, const T* w, const T* bias, T* y, int64_t n0, int64_t n1, int64_t N,
               int64_t K) {
  switch (M) {
    case 1: return rows_of_w<T, 1, 4>(x, w, bias, y, n0, n1, N, K);
    case 2: return rows_of_w<T, 2, 2>(x, w, bias, y, n0, n1, N, K);
    case 3: return rows_of_w<T, 3, 1>(x, w, bias, y, n0, n1, N, K);
    case 4: return rows_of_w<T, 4, 1>(x, w, bias, y, n0, n1, N, K);
    case 5: return rows_of_w<T, 5, 1>(x, w, bias, y, n0, n1, N, K);
    case 6: return rows_of_w<T, 6, 1>(x, w, bias, y, n0, n1, N, K);
    case 7: return rows_of_w<T, 7, 1>(x, w, bias, y, n0, n1, N, K);
    default: return rows_of_w<T, 8, 1>(x, w, bias, y, n0, n1, N, K);
  }
}

// Threads split the output rows. With more than one block of x's rows, each thread takes its
// outputs a panel at a time (about 64 KiB of weights, which stays in L2) and runs every block
// over the panel before moving on: the weights cross the memory bus once per call rather than
// once per block, which is what bounds a block-at-a-time loop (at 32 rows, four passes over
// every weight per step).
template <typename T>
void dispatch_rows(int64_t M, const float* x, const T* w, const T* bias, T* y, int64_t N, int64_t K) {
  // Enough output rows per task that each thread streams long runs of weights, and at
  // least 64K weights per task: below that, waking a second thread costs more than it saves.
  const int64_t grain = std::max({int64_t{16}, 65536 / K, N / (4 * at::get_num_threads())});
  const int64_t panel = std::max<int64_t>(4, 65536 / (K * int64_t{sizeof(T)}));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t p0 = n0; p0 < n1; p0 += panel) {
      const int64_t p1 = std::min(p0 + panel, n1);
      for (int64_t m0 = 0; m0 < M; m0 += kBlockRows) {
        row_block<T>(std::min(kBlockRows, M - m0), x + m0 * K, w, bias, y + m0 * N, p0, p1, N, K);
      }
    }
  });
}

template <typename T>
const float* widen(const T* src, int64_t n, std::vector<float>& dst) {
  dst.resize(n);
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  return dst.data();
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
  std::vector<float> widened;
  const float* xp = nullptr;
  switch (x.scalar_type()) {
    case at::kFloat: xp = xc.data_ptr<float>(); break;
    case at::kHalf: xp = widen(xc.data_ptr<c10::Half>(), M * K, widened); break;
    case at::kBFloat16: xp = widen(xc.data_ptr<c10::BFloat16>(), M * K, widened); break;
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

}  // namespace nanogpt

TORCH_LIBRARY_FRAGMENT(nanogpt, m) {
  m.def("linear_rows(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.impl("linear_rows", c10::DispatchKey::CPU, TORCH_FN(nanogpt::linear_rows));
}
