"""Bifurcated decode attention as two Triton kernels (CUDA; CPU through TRITON_INTERPRET=1).

One decode step for N branches that share a context: the context K/V (G, M, D) is stored
once, each branch has its own short K/V (N, G, m, D) of the tokens it decoded. The library
composition in model.py (flash attention over the stacked queries, einsum for the branch
part, a log-sum-exp merge) launches ~25 kernels per layer and gives the context pass one
thread block per KV head: 32 blocks on a 132-SM GPU. Here:

1. `_partial_kernel`, grid (G, S + N): programs s < S each take one slice of the context
   for *all* N·P queries of KV head g (flash-decoding's split over the keys, so the
   context is read once and by enough blocks to reach the memory bound); programs S + n
   take branch n's own keys for its P queries. Each writes a normalised partial output
   and its log-sum-exp.
2. `_combine_kernel`, grid (G, N·P): merges the S context partials and the branch partial
   of each query row by their log-sum-exp and writes (N, H, D) in the input dtype.

Rows are ordered query row r = n·P + p for query head g·P + p of branch n (P = H / G).
"""

from __future__ import annotations

import functools

import torch

from .fused_triton import next_pow2

try:
    import triton
    import triton.language as tl
except ImportError:  # the laptop install and CI have no Triton: callers check AVAILABLE
    triton = None
    tl = None

AVAILABLE = triton is not None


if AVAILABLE:

    @triton.jit
    def _tile(q, k_base, v_base, stride_k, stride_v, offs, hi, m_i, l_i, acc, scale, D: tl.constexpr,
              DOT: tl.constexpr):
        """One key tile into the running softmax state."""
        d = tl.arange(0, D)
        valid = offs < hi
        k = tl.load(k_base + offs[:, None] * stride_k + d[None, :], mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT) * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        v = tl.load(v_base + offs[:, None] * stride_v + d[None, :], mask=valid[:, None], other=0.0)
        return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT)

    @triton.jit
    def _attend(q, k_base, v_base, stride_k, stride_v, lo, hi, scale,
                BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, D: tl.constexpr, USE_FOR: tl.constexpr,
                DOT: tl.constexpr):
        """Online-softmax attention of q [BLOCK_Q, D] over keys [lo, hi): (acc/l, lse)."""
        m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_Q], tl.float32)
        acc = tl.zeros([BLOCK_Q, D], tl.float32)
        if USE_FOR:  # compiled: a for loop, which Triton software-pipelines
            for start in range(lo, hi, BLOCK_K):
                m_i, l_i, acc = _tile(q, k_base, v_base, stride_k, stride_v, start + tl.arange(0, BLOCK_K), hi,
                                      m_i, l_i, acc, scale, D, DOT)
        else:  # the interpreter: its runtime scalars cannot bound a Python range under numpy >= 2.4
            start = lo
            while start < hi:
                m_i, l_i, acc = _tile(q, k_base, v_base, stride_k, stride_v, start + tl.arange(0, BLOCK_K), hi,
                                      m_i, l_i, acc, scale, D, DOT)
                start += BLOCK_K
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        return acc / l_safe[:, None], m_i + tl.log(l_safe)

    @triton.jit(do_not_specialize=["M", "m", "chunk", "n_splits"])  # one compile per shape class, not per step
    def _partial_kernel(Q, KC, VC, KD, VD, PARTS, LSE,
                        stride_qn, stride_qh, stride_kcg, stride_kcm, stride_vcg, stride_vcm,
                        stride_kdn, stride_kdg, stride_kdm, stride_vdn, stride_vdg, stride_vdm,
                        stride_og, stride_os, stride_or, stride_lg, stride_ls,
                        M, m, chunk, n_splits, scale,
                        P: tl.constexpr, NP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
                        D: tl.constexpr, USE_FOR: tl.constexpr, DOT: tl.constexpr):
        g = tl.program_id(0)
        s = tl.program_id(1)
        r = tl.arange(0, BLOCK_Q)
        d = tl.arange(0, D)
        o_base = PARTS + g * stride_og + s * stride_os
        l_base = LSE + g * stride_lg + s * stride_ls
        if s < n_splits:  # a slice of the shared context, for every query row of head g
            ok = r < NP
            q = tl.load(Q + (r // P)[:, None] * stride_qn + (g * P + r % P)[:, None] * stride_qh + d[None, :],
                        mask=ok[:, None], other=0.0)
            lo = s * chunk
            hi = tl.minimum(lo + chunk, M)
            out, lse = _attend(q, KC + g * stride_kcg, VC + g * stride_vcg, stride_kcm, stride_vcm, lo, hi, scale,
                               BLOCK_Q, BLOCK_K, D, USE_FOR, DOT)
        else:  # branch n's own keys, for its P query rows (stored at local rows 0..P-1)
            n = s - n_splits
            ok = r < P
            q = tl.load(Q + n * stride_qn + (g * P + r)[:, None] * stride_qh + d[None, :],
                        mask=ok[:, None], other=0.0)
            out, lse = _attend(q, KD + n * stride_kdn + g * stride_kdg, VD + n * stride_vdn + g * stride_vdg,
                               stride_kdm, stride_vdm, 0, m, scale, BLOCK_Q, BLOCK_K, D, USE_FOR, DOT)
        tl.store(o_base + r[:, None] * stride_or + d[None, :], out, mask=ok[:, None])
        tl.store(l_base + r, lse, mask=ok)

    @triton.jit(do_not_specialize=["n_splits"])
    def _combine_kernel(PARTS, LSE, OUT, stride_og, stride_os, stride_or, stride_lg, stride_ls,
                        stride_outn, stride_outh, n_splits,
                        P: tl.constexpr, S_BLOCK: tl.constexpr, D: tl.constexpr):
        g = tl.program_id(0)
        row = tl.program_id(1)  # n * P + p
        n = row // P
        p = row % P
        sl = tl.arange(0, S_BLOCK)
        d = tl.arange(0, D)
        ok = sl < n_splits
        lse_c = tl.load(LSE + g * stride_lg + sl * stride_ls + row, mask=ok, other=float("-inf"))
        o_c = tl.load(PARTS + g * stride_og + sl[:, None] * stride_os + row * stride_or + d[None, :],
                      mask=ok[:, None], other=0.0)
        dec = n_splits + n
        lse_d = tl.load(LSE + g * stride_lg + dec * stride_ls + p)
        o_d = tl.load(PARTS + g * stride_og + dec * stride_os + p * stride_or + d)
        top = tl.maximum(tl.max(lse_c, 0), lse_d)
        w_c = tl.exp(lse_c - top)
        w_d = tl.exp(lse_d - top)
        out = (tl.sum(o_c * w_c[:, None], 0) + o_d * w_d) / (tl.sum(w_c, 0) + w_d)
        tl.store(OUT + n * stride_outn + (g * P + p) * stride_outh + d, out.to(OUT.dtype.element_ty))


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def plan_splits(context: int, kv_heads: int, sm_count: int, block_k: int) -> tuple[int, int]:
    """(number of context slices, keys per slice): about two blocks per SM over all heads,
    slices a multiple of block_k long, every slice non-empty."""
    target = max(1, (2 * sm_count + kv_heads - 1) // kv_heads)
    chunk = max(block_k, -(-context // target))
    chunk = -(-chunk // block_k) * block_k
    return -(-context // chunk), chunk


def bifurcated_attention_triton(q: torch.Tensor, k_ctx: torch.Tensor, v_ctx: torch.Tensor,
                                k_dec: torch.Tensor, v_dec: torch.Tensor, scale: float) -> torch.Tensor:
    """Same contract as model.bifurcated_attention_merged: q (N, H, D); k_ctx, v_ctx (G, M, D);
    k_dec, v_dec (N, G, m, D) with m >= 1 (this step's key included). Returns (N, H, D)."""
    if not AVAILABLE:
        raise RuntimeError("bifurcated_attention_triton needs the triton package")
    n, h, d = q.shape
    g, ctx, _ = k_ctx.shape
    m = k_dec.shape[2]
    if d & (d - 1) or d < 16:
        raise ValueError(f"head size {d}: the Triton kernel needs a power of two >= 16")
    if ctx == 0 or m == 0:
        raise ValueError("bifurcated_attention_triton needs a non-empty context and branch part")
    for t in (q, k_ctx, v_ctx, k_dec, v_dec):
        if t.stride(-1) != 1:
            raise ValueError("the last dimension of every input must be contiguous")
    p = h // g
    rows = n * p
    block_q = max(16, next_pow2(rows))
    block_k = 64 if d >= 128 or block_q >= 128 else 128
    sms = _sm_count(q.device.index or 0) if q.is_cuda else 8
    n_splits, chunk = plan_splits(ctx, g, sms, block_k)
    parts = torch.empty(g, n_splits + n, block_q, d, device=q.device, dtype=torch.float32)
    lse = torch.empty(g, n_splits + n, block_q, device=q.device, dtype=torch.float32)
    warps = 4 if block_q <= 32 else 8
    _partial_kernel[(g, n_splits + n)](
        q, k_ctx, v_ctx, k_dec, v_dec, parts, lse,
        q.stride(0), q.stride(1), k_ctx.stride(0), k_ctx.stride(1), v_ctx.stride(0), v_ctx.stride(1),
        k_dec.stride(0), k_dec.stride(1), k_dec.stride(2), v_dec.stride(0), v_dec.stride(1), v_dec.stride(2),
        parts.stride(0), parts.stride(1), parts.stride(2), lse.stride(0), lse.stride(1),
        ctx, m, chunk, n_splits, scale,
        P=p, NP=rows, BLOCK_Q=block_q, BLOCK_K=block_k, D=d, USE_FOR=q.is_cuda,
        DOT="ieee" if q.dtype == torch.float32 else None, num_warps=warps)  # fp32: no tf32 rounding
    out = torch.empty(n, h, d, device=q.device, dtype=q.dtype)
    _combine_kernel[(g, rows)](
        parts, lse, out, parts.stride(0), parts.stride(1), parts.stride(2), lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1), n_splits, P=p, S_BLOCK=max(2, next_pow2(n_splits)), D=d, num_warps=1)
    return out
