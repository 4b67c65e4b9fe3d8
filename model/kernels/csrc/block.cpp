// Every transformer block's decode step on a CPU, as one op: for each block its layer norms,
// the four matrix products (matvec.cpp), the fused attention (attention.cpp), GELU and both
// residuals. model/kernels/cpu.py builds this file with the others.
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

namespace {

using nanogpt_simd::OptionalTensor;

constexpr double kLayerNormEps = 1e-5;  // model/gpt.py's LayerNorm

// One block's step: x (B, 1, C), one new token per sequence, rows 0..B-1 of the block's caches
// (B, nh, S, hs) at positions pos (B,). Its parameters are w[base, base + 12), in model/gpt.py's
// order: ln_1 weight, bias; attn.c_attn weight, bias; attn.c_proj weight, bias; ln_2 weight,
// bias; mlp.c_fc weight, bias; mlp.c_proj weight, bias (biases may be None). Returns the
// block's output (B, 1, C), as Block.step_parts would.
at::Tensor block_step(const at::Tensor& x, const c10::List<OptionalTensor>& w, size_t base, at::Tensor& k_cache,
                      at::Tensor& v_cache, const at::Tensor& pos, bool gelu_tanh) {
  const int64_t B = x.size(0), C = x.size(2), nh = k_cache.size(1);
  const int64_t hs = C / nh;
  auto p = [&](size_t i) -> OptionalTensor { return w.get(base + i); };

  const at::Tensor qkv = nanogpt::linear_rows(at::layer_norm(x, {C}, p(0), p(1), kLayerNormEps), *p(2), p(3));
  auto heads = [&](int64_t i) { return qkv.narrow(2, i * C, C).view({B, 1, nh, hs}).transpose(1, 2); };
  const at::Tensor y = nanogpt::decode_attention(heads(0), heads(1), heads(2), k_cache, v_cache, OptionalTensor(), pos);
  const at::Tensor x1 = at::add(x, nanogpt::linear_rows(y.view({B, 1, C}), *p(4), p(5)));
  const at::Tensor h = nanogpt::linear_rows(at::layer_norm(x1, {C}, p(6), p(7), kLayerNormEps), *p(8), p(9));
  return at::add(x1, nanogpt::linear_rows(at::gelu(h, gelu_tanh ? "tanh" : "none"), *p(10), p(11)));
}

// Every block's step, layer after layer: x (B, 1, C) into the first block; the caches hold all
// layers (L, R, nh, S, hs), of which rows row0..row0+B-1 are the sequences'; w has 12
// parameters a block, block by block (as block_step). Returns the last block's output.
at::Tensor decode_blocks(const at::Tensor& x, const c10::List<OptionalTensor>& w, at::Tensor& k_cache,
                         at::Tensor& v_cache, int64_t row0, const at::Tensor& pos, bool gelu_tanh) {
  TORCH_CHECK(k_cache.dim() == 5 && v_cache.dim() == 5, "decode_blocks: caches must be (n_layer, rows, n_head, S, head_dim)");
  const int64_t L = k_cache.size(0);
  TORCH_CHECK(w.size() == static_cast<size_t>(12 * L), "decode_blocks: 12 parameters a block (weight and bias of 6 "
              "layers) for ", L, " blocks, got ", w.size());
  for (size_t i = 0; i < w.size(); i += 2) {
    TORCH_CHECK(w.get(i).has_value(), "decode_blocks: parameter ", i, " (a weight) is None");
  }
  TORCH_CHECK(x.dim() == 3 && x.size(1) == 1, "decode_blocks: x must be (B, 1, n_embd)");
  const int64_t B = x.size(0), C = x.size(2), nh = k_cache.size(2);
  TORCH_CHECK(nh > 0 && C % nh == 0, "decode_blocks: n_embd ", C, " is not a multiple of n_head ", nh);
  TORCH_CHECK(row0 >= 0 && row0 + B <= k_cache.size(1), "decode_blocks: rows ", row0, "..", row0 + B - 1,
              " are not all in a cache of ", k_cache.size(1), " rows");
  at::Tensor h = x;
  for (int64_t i = 0; i < L; ++i) {
    at::Tensor k = k_cache.select(0, i).narrow(0, row0, B), v = v_cache.select(0, i).narrow(0, row0, B);
    h = block_step(h, w, static_cast<size_t>(12 * i), k, v, pos, gelu_tanh);
  }
  return h;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nanogpt, m) {
  m.def("decode_blocks(Tensor x, Tensor?[] params, Tensor(a!) k_cache, Tensor(b!) v_cache, int row0, Tensor pos, "
        "bool gelu_tanh) -> Tensor");
  m.impl("decode_blocks", c10::DispatchKey::CPU, TORCH_FN(decode_blocks));
}
