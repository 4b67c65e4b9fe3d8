"""The Triton kernels of model/kernels/triton_decode.py and triton_sampling.py (which document
them). Imported only on first use, by triton_decode.kernels(): triton.jit reads TRITON_INTERPRET
when this module runs (and the interpreter needs `tl` as a module global of the kernels)."""

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


@triton.jit
def _mix32(x):
    """model/sampling.py's _mix32 ("lowbias32") on uint32: multiplication wraps mod 2**32 as its
    split products do."""
    x = x ^ (x >> 16)
    x = x * tl.full([], 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full([], 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _order_key(v):
    """Float32 -> uint32 that orders as the floats do (-inf lowest)."""
    bits = v.to(tl.uint32, bitcast=True)
    return tl.where((bits >> 31) == 1, ~bits, bits | tl.full([], 0x80000000, tl.uint32))


@triton.jit
def _from_key(key):
    """_order_key's inverse: the float32 of an order key."""
    top = tl.full([], 0x80000000, tl.uint32)
    return tl.where((key & top) != 0, key ^ top, ~key).to(tl.float32, bitcast=True)


@triton.jit
def _bisect_key(row, t, target, floor_key, m, z, V, BLOCK_V: tl.constexpr, MASS: tl.constexpr,
                PRECISE: tl.constexpr):
    """The largest order key c whose weight, summed over the row's scaled logits with keys >= c,
    reaches target (or c <= floor_key), found bit by bit in 32 passes over the row: the weight is
    1 a token (a count, exact in float32 below 2**24) or, with MASS, its probability exp(x - m) / z.
    Either sum only grows as terms join it, so the weight falls as c rises and the search is exact
    for the sums computed. It is the key of a value of the row, or 0 where no c reaches target."""
    key = tl.full([], 0, tl.uint32)
    for i in range(32):
        cand = key | (tl.full([], 1, tl.uint32) << (31 - i))
        acc = tl.full([], 0.0, tl.float32)
        for start in range(0, V, BLOCK_V):
            j = start + tl.arange(0, BLOCK_V)
            x = tl.math.div_rn(tl.load(row + j, mask=j < V, other=float("-inf")).to(tl.float32), t)
            if MASS:
                w = _exp(x - m, PRECISE) / z
            else:
                w = tl.full([BLOCK_V], 1.0, tl.float32)
            acc += tl.sum(tl.where((j < V) & (_order_key(x) >= cand), w, 0.0), axis=0)
        key = tl.where((cand <= floor_key) | (acc >= target), cand, key)
    return key


@triton.jit
def _exp(x, PRECISE: tl.constexpr):
    if PRECISE:  # CUDA's expf, as torch's softmax on the GPU
        return tl.extra.cuda.libdevice.exp(x)
    return tl.exp(x)


@triton.jit
def _nucleus_key(row, t, k, top_p, k_key, best_v, V, BLOCK_V: tl.constexpr, PRECISE: tl.constexpr):
    """The order key of a row's top-p threshold: the largest scaled logit x whose probability mass
    of tokens >= x reaches top_p, and at least the top-k threshold (key k_key; 0 without top-k).
    Probabilities are softmax over the top-k set (exactly k tokens: ties at the k-th value count
    up to k, as sample()'s sorted prefix does) or over the whole row. Found bit by bit as the
    top-k threshold is (32 passes), each pass summing the mass at or above a candidate in a fixed
    order (_bisect_key). 0: no candidate reaches top_p (keep the whole row)."""
    m = tl.math.div_rn(best_v, t)  # the largest scaled logit (division by t > 0 keeps the order)
    has_k = k > 1
    kth = _from_key(k_key)
    z = tl.full([], 0.0, tl.float32)
    n_above = tl.full([], 0, tl.int32)
    for start in range(0, V, BLOCK_V):
        j = start + tl.arange(0, BLOCK_V)
        x = tl.math.div_rn(tl.load(row + j, mask=j < V, other=float("-inf")).to(tl.float32), t)
        inside = (j < V) & ((x > kth) | ~has_k)
        z += tl.sum(tl.where(inside, _exp(x - m, PRECISE), 0.0), axis=0)
        n_above += tl.sum(inside.to(tl.int32), axis=0)
    z += tl.where(has_k, (k - n_above).to(tl.float32) * _exp(kth - m, PRECISE), 0.0)
    floor_key = tl.where(has_k, k_key, tl.full([], 0, tl.uint32))
    return _bisect_key(row, t, top_p, floor_key, m, z, V, BLOCK_V, True, PRECISE)


@triton.jit
def sample_kernel(logits_ptr, temp_ptr, topk_ptr, topp_ptr, seed_ptr, step_ptr, out_ptr, thr_ptr, s_lb, V,
                  BLOCK_V: tl.constexpr, PRECISE_LOG: tl.constexpr):
    b = tl.program_id(0)
    row = logits_ptr + b * s_lb
    temp = tl.load(temp_ptr + b)
    k = tl.minimum(tl.load(topk_ptr + b), V).to(tl.int32)
    greedy = (temp == 0.0) | (k == 1)
    t = tl.maximum(temp, 1e-6)
    # greedy: the first largest logit; sampling with top-k and/or top-p: a threshold (order key)
    best_v = float("-inf")
    best_i = 0
    for start in range(0, V, BLOCK_V):
        j = start + tl.arange(0, BLOCK_V)
        x = tl.load(row + j, mask=j < V, other=float("-inf")).to(tl.float32)
        m = tl.max(x, axis=0)
        i = tl.min(tl.where(x == m, j, V), axis=0)
        take = m > best_v
        best_i = tl.where(take, i, best_i)
        best_v = tl.where(take, m, best_v)
    threshold_key = tl.full([], 0, tl.uint32)
    top_p = tl.load(topp_ptr + b)
    nucleus = (top_p < 1.0) & (temp != 0.0) & (k != 1)
    # no top-k or top-p (and greedy rows, whose race is not used)
    keep_all = ((k <= 1) | (temp == 0.0)) & ~nucleus
    if (k > 1) & (temp != 0.0):
        threshold_key = _bisect_key(row, t, k.to(tl.float32), threshold_key, 0.0, 1.0, V, BLOCK_V, False,
                                    PRECISE_LOG)
    if nucleus:
        threshold_key = _nucleus_key(row, t, k, top_p, threshold_key, best_v, V, BLOCK_V, PRECISE_LOG)
        keep_all = threshold_key == 0  # the whole row's mass rounded below top_p: keep every token
    threshold = _from_key(threshold_key)  # compared as floats: -0.0 and 0.0 are one threshold, as in sample()
    # the race: scaled logit + Gumbel noise of (seed, step, token id) among the kept tokens
    seed = tl.load(seed_ptr + b).to(tl.uint32)
    step = tl.load(step_ptr + b).to(tl.uint32)
    row_key = _mix32(_mix32(seed) ^ _mix32(step + tl.full([], 0x9E3779B9, tl.uint32)))
    win_v = float("-inf")
    win_i = V
    for start in range(0, V, BLOCK_V):
        j = start + tl.arange(0, BLOCK_V)
        x = tl.math.div_rn(tl.load(row + j, mask=j < V, other=float("-inf")).to(tl.float32), t)
        bits = _mix32(row_key ^ _mix32(j.to(tl.uint32) + tl.full([], 0x85EBCA6B, tl.uint32)))
        u = ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
        if PRECISE_LOG:  # CUDA's logf, as torch's log on the GPU
            g = -tl.extra.cuda.libdevice.log(-tl.extra.cuda.libdevice.log(u))
        else:
            g = -tl.log(-tl.log(u))
        score = tl.where((j < V) & (keep_all | (x >= threshold)), x + g, float("-inf"))
        m = tl.max(score, axis=0)
        i = tl.min(tl.where(score == m, j, V), axis=0)
        take = m > win_v
        win_i = tl.where(take, i, win_i)
        win_v = tl.where(take, m, win_v)
    win_i = tl.where(win_i < V, win_i, 0)  # every score -inf: torch's argmax answers 0
    tl.store(thr_ptr + b, tl.where(keep_all | greedy, float("-inf"), threshold))
    tl.store(out_ptr + b, tl.where(greedy, best_i, win_i).to(tl.int64))
