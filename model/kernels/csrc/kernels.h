// The CPU kernels' C++ entry points, for one kernel file to call another's (block.cpp
// composes the other two). Each is also a torch op: torch.ops.nanogpt.<name>.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/List.h>

#include "simd.h"

namespace nanogpt {

// matvec.cpp: y = x W^T + b for the few rows of decoding; weight a contiguous [out, in] matrix.
at::Tensor linear_rows(const at::Tensor& x, const at::Tensor& weight, const nanogpt_simd::OptionalTensor& bias);

// matvec.cpp: the same for an int8 [out, in] weight with float32 [out, in / group] scales (model/quant.py's
// layout); the bias, if any, and y in x's dtype.
at::Tensor linear_rows_int8(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                            const nanogpt_simd::OptionalTensor& bias);

// attention.cpp: cache writes and attention for T new tokens a sequence, (B, nh, T, hs) q/k/v -> (B, T, nh, hs).
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                            at::Tensor& v_cache, const nanogpt_simd::OptionalTensor& rows, const at::Tensor& pos);

}  // namespace nanogpt
