// Every transformer block's decode step on a CPU, as one op: for each block its layer norms,
// the four matrix products (matvec.cpp), the fused attention (attention.cpp), GELU and both
// residuals; float weights (decode_blocks) or int8 ones with their scales (decode_blocks_int8).
// model/kernels/cpu.py builds this file with the others.
//
// Why: between the passes over the weights, a step in Python calls some 25 modules and
// operators per block (model/gpt.py's Block.step_parts) while memory sits idle, a noticeable
// share of a batch-1 step (docs/engine.md). The same ATen ops in the same order, called from
// here, cost microseconds, and give the very same numbers.
#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/layer_norm.h>
#include <torch/library.h>

#include "kernels.h"
#include "pool.h"

namespace {

using nanogpt_simd::OptionalTensor;

constexpr double kLayerNormEps = 1e-5;  // model/gpt.py's LayerNorm
// Where a block's four linear layers (c_attn, attn.c_proj, c_fc, mlp.c_proj) have their weights
// among its 12 parameters (see block_step); each bias follows its weight.
constexpr size_t kWeightOf[4] = {2, 4, 8, 10};

// The layers' int8 scales, for decode_blocks_int8: 4 a block (c_attn, attn.c_proj, c_fc,
// mlp.c_proj), None where that layer's weight is float. decode_blocks passes none at all.
using Scales = const c10::List<OptionalTensor>*;

// One of a block's four linear layers: x W^T + b on float weights (linear_rows), or on int8
// weights with their float32 scales (linear_rows_int8, the bias first cast to x's dtype, which
// is a no-op in a model cast as a whole), as model/quant.py's KernelInt8Linear calls it.
at::Tensor linear(const at::Tensor& x, const OptionalTensor& weight, const OptionalTensor& bias, Scales scales,
                  size_t layer) {
  if (scales != nullptr) {
    const OptionalTensor scale = scales->get(layer);
    if (scale.has_value()) {
      const OptionalTensor b = bias.has_value() ? OptionalTensor(bias->to(x.scalar_type())) : OptionalTensor();
      return nanogpt::linear_rows_int8(x, *weight, *scale, b);
    }
  }
  return nanogpt::linear_rows(x, *weight, bias);
}

// One block's step: x (B, 1, C), one new token per sequence, rows 0..B-1 of the block's caches
// (B, nh, S, hs) at positions pos (B,). Its parameters are w[base, base + 12), in model/gpt.py's
// order: ln_1 weight, bias; attn.c_attn weight, bias; attn.c_proj weight, bias; ln_2 weight,
// bias; mlp.c_fc weight, bias; mlp.c_proj weight, bias (biases may be None); its linear layers'
// scales (if any) are scales[base / 3, base / 3 + 4). Returns the block's output (B, 1, C), as
// Block.step_parts would.
at::Tensor block_step(const at::Tensor& x, const c10::List<OptionalTensor>& w, Scales scales, size_t base,
                      at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& pos, bool gelu_tanh) {
  const int64_t B = x.size(0), C = x.size(2), nh = k_cache.size(1);
  const int64_t hs = C / nh;
  auto p = [&](size_t i) -> OptionalTensor { return w.get(base + i); };
  auto lin = [&](const at::Tensor& in, size_t j) {  // the block's j-th linear layer
    return linear(in, p(kWeightOf[j]), p(kWeightOf[j] + 1), scales, base / 3 + j);
  };

  const at::Tensor qkv = lin(at::layer_norm(x, {C}, p(0), p(1), kLayerNormEps), 0);
  auto heads = [&](int64_t i) { return qkv.narrow(2, i * C, C).view({B, 1, nh, hs}).transpose(1, 2); };
  const at::Tensor y = nanogpt::decode_attention(heads(0), heads(1), heads(2), k_cache, v_cache, OptionalTensor(), pos);
  const at::Tensor x1 = at::add(x, lin(y.view({B, 1, C}), 1));
  const at::Tensor h = lin(at::layer_norm(x1, {C}, p(6), p(7), kLayerNormEps), 2);
  return at::add(x1, lin(at::gelu(h, gelu_tanh ? "tanh" : "none"), 3));
}

// Checks that decode_blocks and decode_blocks_int8 share; returns the number of blocks.
int64_t check_blocks(const char* op, const at::Tensor& x, const c10::List<OptionalTensor>& w,
                     const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t row0) {
  TORCH_CHECK(k_cache.dim() == 5 && v_cache.dim() == 5, op, ": caches must be (n_layer, rows, n_head, S, head_dim)");
  const int64_t L = k_cache.size(0);
  TORCH_CHECK(w.size() == static_cast<size_t>(12 * L), op, ": 12 parameters a block (weight and bias of 6 "
              "layers) for ", L, " blocks, got ", w.size());
  for (size_t i = 0; i < w.size(); i += 2) {
    TORCH_CHECK(w.get(i).has_value(), op, ": parameter ", i, " (a weight) is None");
  }
  TORCH_CHECK(x.dim() == 3 && x.size(1) == 1, op, ": x must be (B, 1, n_embd)");
  const int64_t B = x.size(0), C = x.size(2), nh = k_cache.size(2);
  TORCH_CHECK(nh > 0 && C % nh == 0, op, ": n_embd ", C, " is not a multiple of n_head ", nh);
  TORCH_CHECK(row0 >= 0 && row0 + B <= k_cache.size(1), op, ": rows ", row0, "..", row0 + B - 1,
              " are not all in a cache of ", k_cache.size(1), " rows");
  return L;
}

// Every block's step, layer after layer: x (B, 1, C) into the first block; the caches hold all
// layers (L, R, nh, S, hs), of which rows row0..row0+B-1 are the sequences'; w has 12
// parameters a block, block by block (as block_step). Returns the last block's output.
at::Tensor run_blocks(int64_t L, const at::Tensor& x, const c10::List<OptionalTensor>& w, Scales scales,
                      at::Tensor& k_cache, at::Tensor& v_cache, int64_t row0, const at::Tensor& pos, bool gelu_tanh) {
  const int64_t B = x.size(0);
  const nanogpt::SerialATen serial;  // layer norms, GELU and adds of a few rows: no OpenMP regions
  at::Tensor h = x;
  for (int64_t i = 0; i < L; ++i) {
    at::Tensor k = k_cache.select(0, i).narrow(0, row0, B), v = v_cache.select(0, i).narrow(0, row0, B);
    h = block_step(h, w, scales, static_cast<size_t>(12 * i), k, v, pos, gelu_tanh);
  }
  return h;
}

at::Tensor decode_blocks(const at::Tensor& x, const c10::List<OptionalTensor>& w, at::Tensor& k_cache,
                         at::Tensor& v_cache, int64_t row0, const at::Tensor& pos, bool gelu_tanh) {
  const int64_t L = check_blocks("decode_blocks", x, w, k_cache, v_cache, row0);
  return run_blocks(L, x, w, nullptr, k_cache, v_cache, row0, pos, gelu_tanh);
}

// decode_blocks for a model whose linear layers hold int8 weights (model/quant.py's Int8Linear:
// int8 [out, in] in the weight's place, float32 [out, in / group] scales): scales has 4 entries
// a block, in block_step's order of layers, None for a layer whose weight is float.
at::Tensor decode_blocks_int8(const at::Tensor& x, const c10::List<OptionalTensor>& w,
                              const c10::List<OptionalTensor>& scales, at::Tensor& k_cache, at::Tensor& v_cache,
                              int64_t row0, const at::Tensor& pos, bool gelu_tanh) {
  const int64_t L = check_blocks("decode_blocks_int8", x, w, k_cache, v_cache, row0);
  TORCH_CHECK(scales.size() == static_cast<size_t>(4 * L), "decode_blocks_int8: scales must hold 4 a block (None "
              "for a float layer) for ", L, " blocks, got ", scales.size());
  for (size_t j = 0; j < scales.size(); ++j) {
    const size_t i = 12 * (j / 4) + kWeightOf[j % 4];  // the layer's weight among w
    const bool int8 = w.get(i)->scalar_type() == at::kChar;
    TORCH_CHECK(!int8 || scales.get(j).has_value(), "decode_blocks_int8: parameter ", i, " (a weight) is int8 but "
                "scales[", j, "] is None; an int8 layer needs its scales");
    TORCH_CHECK(int8 || !scales.get(j).has_value(), "decode_blocks_int8: parameter ", i, " (a weight) is ",
                w.get(i)->scalar_type(), ", not int8, but scales[", j, "] is given; a float layer's is None");
  }
  return run_blocks(L, x, w, &scales, k_cache, v_cache, row0, pos, gelu_tanh);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nanogpt, m) {
  m.def("decode_blocks(Tensor x, Tensor?[] params, Tensor(a!) k_cache, Tensor(b!) v_cache, int row0, Tensor pos, "
        "bool gelu_tanh) -> Tensor");
  m.impl("decode_blocks", c10::DispatchKey::CPU, TORCH_FN(decode_blocks));
  m.def("decode_blocks_int8(Tensor x, Tensor?[] params, Tensor?[] scales, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "int row0, Tensor pos, bool gelu_tanh) -> Tensor");
  m.impl("decode_blocks_int8", c10::DispatchKey::CPU, TORCH_FN(decode_blocks_int8));
}
