"""The Triton kernels of model/kernels/triton_decode.py (which documents them). Imported
only by triton_decode's loader: triton.jit reads TRITON_INTERPRET when this module runs, so
the loader reloads it when the mode changes (the interpreter also needs `tl` as a module
global of the kernels, not a closure variable)."""

import triton
import triton.language as tl


@triton.jit
def attention_kernel(q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, rows_ptr, pos_ptr, out_ptr,
                     s_qb, s_qh, s_kb, s_kh, s_vb, s_vh, s_cr, s_ch, s_cs, s_ob, s_oh, scale,
                     HAS_ROWS: tl.constexpr, HS: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    b, h = tl.program_id(0), tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    dmask = d < HS
    row = tl.load(rows_ptr + b) if HAS_ROWS else b
    p = tl.load(pos_ptr + b)
    cache_ty = kc_ptr.dtype.element_ty
    q = tl.load(q_ptr + b * s_qb + h * s_qh + d, mask=dmask, other=0.0).to(tl.float32)
    k_new = tl.load(k_ptr + b * s_kb + h * s_kh + d, mask=dmask, other=0.0).to(cache_ty)
    v_new = tl.load(v_ptr + b * s_vb + h * s_vh + d, mask=dmask, other=0.0).to(cache_ty)
    kc = kc_ptr + row * s_cr + h * s_ch
    vc = vc_ptr + row * s_cr + h * s_ch
    tl.store(kc + p * s_cs + d, k_new, mask=dmask)
    tl.store(vc + p * s_cs + d, v_new, mask=dmask)
    # The new position's score from registers: another thread's store above need not be
    # visible yet, so the loop reads only positions before p.
    m = tl.sum(q * k_new.to(tl.float32), axis=0) * scale
    total = tl.exp(m - m)  # 1.0, as a float32 tensor (loop-carried types must not change)
    acc = v_new.to(tl.float32)
    for start in range(0, p, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        nmask = n < p
        tile = nmask[:, None] & dmask[None, :]
        keys = tl.load(kc + n[:, None] * s_cs + d[None, :], mask=tile, other=0.0).to(tl.float32)
        s = tl.where(nmask, tl.sum(keys * q[None, :], axis=1) * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        alpha = tl.exp(m - m_new)
        weights = tl.exp(s - m_new)
        values = tl.load(vc + n[:, None] * s_cs + d[None, :], mask=tile, other=0.0).to(tl.float32)
        total = total * alpha + tl.sum(weights, axis=0)
        acc = acc * alpha + tl.sum(weights[:, None] * values, axis=0)
        m = m_new
    tl.store(out_ptr + b * s_ob + h * s_oh + d, (acc / total).to(out_ptr.dtype.element_ty), mask=dmask)

@triton.jit
def linear_kernel(x_ptr, w_ptr, b_ptr, r_ptr, lnw_ptr, lnb_ptr, out_ptr, M, N, K, s_xm, s_wn, s_rm, s_om, eps,
                  HAS_BIAS: tl.constexpr, LN: tl.constexpr, LN_BIAS: tl.constexpr, GELU: tl.constexpr,
                  RESIDUAL: tl.constexpr, WIDEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask, nmask = rm < M, rn < N
    ty = out_ptr.dtype.element_ty
    mean = tl.zeros([BLOCK_M], tl.float32)
    rstd = tl.zeros([BLOCK_M], tl.float32)
    if LN:  # F.layer_norm's statistics in float32: mean, then the biased variance
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            xk = tl.load(x_ptr + rm[:, None] * s_xm + rk[None, :], mask=mmask[:, None] & (rk < K)[None, :],
                         other=0.0).to(tl.float32)
            mean += tl.sum(xk, axis=1)
        mean = mean / K
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            kmask = mmask[:, None] & (rk < K)[None, :]
            xk = tl.load(x_ptr + rm[:, None] * s_xm + rk[None, :], mask=kmask, other=0.0).to(tl.float32)
            dev = tl.where(kmask, xk - mean[:, None], 0.0)
            rstd += tl.sum(dev * dev, axis=1)
        rstd = 1.0 / tl.sqrt(rstd / K + eps)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        kmask = rk < K
        x = tl.load(x_ptr + rm[:, None] * s_xm + rk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        if LN:
            g = tl.load(lnw_ptr + rk, mask=kmask, other=0.0).to(tl.float32)
            xn = (x.to(tl.float32) - mean[:, None]) * rstd[:, None] * g[None, :]
            if LN_BIAS:
                xn += tl.load(lnb_ptr + rk, mask=kmask, other=0.0).to(tl.float32)[None, :]
            x = tl.where(mmask[:, None] & kmask[None, :], xn, 0.0).to(ty)  # the norm's output, as torch's
        w = tl.load(w_ptr + rn[:, None] * s_wn + rk[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
        if WIDEN:
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(x.to(w.dtype), tl.trans(w))
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    y = acc.to(ty).to(tl.float32)  # the product rounded as torch's linear rounds it
    if GELU == 1:  # exact: x/2 (1 + erf(x / sqrt 2))
        y = (0.5 * y * (1.0 + tl.erf(y * 0.7071067811865476))).to(ty).to(tl.float32)
    if GELU == 2:  # tanh approximation, tanh(u) = 2 sigmoid(2u) - 1
        u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        y = (0.5 * y * (2.0 / (1.0 + tl.exp(-2.0 * u)))).to(ty).to(tl.float32)
    omask = mmask[:, None] & nmask[None, :]
    if RESIDUAL:
        y += tl.load(r_ptr + rm[:, None] * s_rm + rn[None, :], mask=omask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rm[:, None] * s_om + rn[None, :], y.to(ty), mask=omask)
