"""Varlen bifurcated decode attention: one kernel launch per layer for a batch of requests
(CUDA; CPU through TRITON_INTERPRET=1).

A batched decode step holds R rows from several requests. Request q has its context K/V
(L, G, cap, D), stored once, and N_q rows (its candidates), each with its own short
branch K/V; requests differ in context length and in how many steps their branches
have taken. bifurcated_triton.py is the one-request version; here every per-request
fact is a tensor (`meta`, below), so one launch covers any mix and a CUDA graph captured
once replays for every step whatever the lengths are.

Where the KV lives is given by addresses, not by one pool tensor: each request's context
and branch caches stay the tensors the runtime allocated (prefill writes straight into
them, select_branches and branch_from make new ones), and the step's `meta` carries their
data_ptr. A CUDA graph reads `meta` from a static tensor, so nothing is copied to run
a step but `meta` itself.

`_partial_kernel`, grid (slots, G, S·B + 1):
- programs z < S·B are request slot x's context pass: split z // B of S slices of its
  context, row block z % B of its N_x·P query rows (all P query heads of kv head g of all
  its rows share each loaded K/V tile: the context is read once per layer for all its
  candidates, flash-decoding's split over the keys so that one long context still
  fills the GPU);
- program z = S·B is row x's own branch: its P query heads over the branch keys decoded
  before, plus this step's key (from k_new, not the cache), which it also stores at
  the branch's current step.
Each writes a normalised partial output and its log-sum-exp; `_combine_kernel`, grid
(slots, H), merges a row's S context partials and its branch partial.

Rows beyond the batch (padding up to a graph's bucket) point at a scratch branch and
belong to no request: their outputs are undefined and every row is independent of the
others, so they change nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .fused_triton import next_pow2

try:
    import triton
    import triton.language as tl
except ImportError:  # the laptop install and CI have no Triton: callers check AVAILABLE
    triton = None
    tl = None

AVAILABLE = triton is not None

# rows of `meta` (int64, shape (FIELDS, slots)): per row, then per request slot
TOKEN, POSITION, BRANCH_K, BRANCH_V, BRANCH_LAYER_STRIDE, BRANCH_CAP, STEP = range(7)
CONTEXT_K, CONTEXT_V, CONTEXT_CAP, CONTEXT_LEN, ROW_START, N_ROWS = range(7, 13)
FIELDS = 13
# a prefill chunk that rides a decode step (`chunk_attention`): int64 `cmeta`, these
# scalars, then the chunk's C tokens (C: the graph's chunk size; the first CHUNK_LEN count)
CHUNK_K, CHUNK_V, CHUNK_CAP, CHUNK_START, CHUNK_LEN = range(5)
CHUNK_FIELDS = 5


if AVAILABLE:
    # the meta rows as constexpr globals: a kernel may read no other kind of global
    _N_ROWS = tl.constexpr(N_ROWS)
    _ROW_START = tl.constexpr(ROW_START)
    _CONTEXT_LEN = tl.constexpr(CONTEXT_LEN)
    _CONTEXT_CAP = tl.constexpr(CONTEXT_CAP)
    _CONTEXT_K = tl.constexpr(CONTEXT_K)
    _CONTEXT_V = tl.constexpr(CONTEXT_V)
    _STEP = tl.constexpr(STEP)
    _BRANCH_LAYER_STRIDE = tl.constexpr(BRANCH_LAYER_STRIDE)
    _BRANCH_CAP = tl.constexpr(BRANCH_CAP)
    _BRANCH_K = tl.constexpr(BRANCH_K)
    _BRANCH_V = tl.constexpr(BRANCH_V)
    _CHUNK_K = tl.constexpr(CHUNK_K)
    _CHUNK_V = tl.constexpr(CHUNK_V)
    _CHUNK_CAP = tl.constexpr(CHUNK_CAP)
    _CHUNK_START = tl.constexpr(CHUNK_START)
    _CHUNK_LEN = tl.constexpr(CHUNK_LEN)

    @triton.jit
    def _online_tile(q, k_base, v_base, offs, hi, m_i, l_i, acc, scale, D: tl.constexpr, DOT: tl.constexpr):
        """One key tile into the running softmax state (m_i, l_i, acc)."""
        d = tl.arange(0, D)
        valid = offs < hi
        k = tl.load(k_base + offs[:, None] * D + d[None, :], mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT) * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        v = tl.load(v_base + offs[:, None] * D + d[None, :], mask=valid[:, None], other=0.0)
        return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT)

    @triton.jit
    def _attend_range(q, k_base, v_base, lo, hi, scale, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
                      D: tl.constexpr, USE_FOR: tl.constexpr, DOT: tl.constexpr):
        """Online softmax of q [BLOCK_Q, D] over keys [lo, hi) (contiguous rows of D):
        (m, l, acc) unnormalised, m = -inf where the range is empty."""
        m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_Q], tl.float32)
        acc = tl.zeros([BLOCK_Q, D], tl.float32)
        if USE_FOR:  # compiled: a for loop, which Triton software-pipelines
            for start in range(lo, hi, BLOCK_K):
                m_i, l_i, acc = _online_tile(q, k_base, v_base, start + tl.arange(0, BLOCK_K), hi, m_i, l_i, acc,
                                             scale, D, DOT)
        else:  # the interpreter: its runtime scalars cannot bound a Python range under numpy >= 2.4
            start = lo
            while start < hi:
                m_i, l_i, acc = _online_tile(q, k_base, v_base, start + tl.arange(0, BLOCK_K), hi, m_i, l_i, acc,
                                             scale, D, DOT)
                start += BLOCK_K
        return m_i, l_i, acc

    @triton.jit(do_not_specialize=["slots", "layer", "n_splits", "row_blocks"])  # one compile for every layer
    def _partial_kernel(Q, KN, VN, META, PARTS, LSE,
                        stride_qr, stride_qh, stride_knr, stride_kng, stride_vnr, stride_vng,
                        stride_pr, stride_ph, stride_ps, stride_lr, stride_lh,
                        slots, layer, n_splits, row_blocks, scale,
                        G: tl.constexpr, P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr,
                        BLOCK_K: tl.constexpr, D: tl.constexpr, USE_FOR: tl.constexpr, DOT: tl.constexpr):
        x = tl.program_id(0)
        g = tl.program_id(1)
        z = tl.program_id(2)
        d = tl.arange(0, D)
        elem = Q.dtype.element_ty
        if z < n_splits * row_blocks:  # a slice of request slot x's context, for a block of its rows
            split = z // row_blocks
            first = (z % row_blocks) * BLOCK_Q
            n_query = tl.load(META + _N_ROWS * slots + x) * P
            if first < n_query:
                local = first + tl.arange(0, BLOCK_Q)
                ok = local < n_query
                rows = tl.load(META + _ROW_START * slots + x) + local // P
                heads = g * P + local % P
                q = tl.load(Q + rows[:, None] * stride_qr + heads[:, None] * stride_qh + d[None, :],
                            mask=ok[:, None], other=0.0)
                length = tl.load(META + _CONTEXT_LEN * slots + x)
                chunk = tl.cdiv(tl.cdiv(length, n_splits), BLOCK_K) * BLOCK_K
                lo = split * chunk
                hi = tl.minimum(lo + chunk, length)
                head_off = (layer * G + g) * tl.load(META + _CONTEXT_CAP * slots + x) * D
                k_base = tl.load(META + _CONTEXT_K * slots + x).to(tl.pointer_type(elem)) + head_off
                v_base = tl.load(META + _CONTEXT_V * slots + x).to(tl.pointer_type(elem)) + head_off
                m_i, l_i, acc = _attend_range(q, k_base, v_base, lo, hi, scale, BLOCK_Q, BLOCK_K, D, USE_FOR, DOT)
                l_safe = tl.where(l_i > 0, l_i, 1.0)
                tl.store(PARTS + rows[:, None] * stride_pr + heads[:, None] * stride_ph + split * stride_ps + d[None, :],
                         acc / l_safe[:, None], mask=ok[:, None])
                tl.store(LSE + rows * stride_lr + heads * stride_lh + split, m_i + tl.log(l_safe), mask=ok)
        else:  # row x's own branch keys, then this step's key, which is stored into the branch
            p = tl.arange(0, BLOCK_P)
            ok = p < P
            heads = g * P + p
            q = tl.load(Q + x * stride_qr + heads[:, None] * stride_qh + d[None, :], mask=ok[:, None], other=0.0)
            step = tl.load(META + _STEP * slots + x)
            head_off = layer * tl.load(META + _BRANCH_LAYER_STRIDE * slots + x) + g * tl.load(
                META + _BRANCH_CAP * slots + x) * D
            k_base = tl.load(META + _BRANCH_K * slots + x).to(tl.pointer_type(elem)) + head_off
            v_base = tl.load(META + _BRANCH_V * slots + x).to(tl.pointer_type(elem)) + head_off
            m_i, l_i, acc = _attend_range(q, k_base, v_base, 0, step, scale, BLOCK_P, BLOCK_K, D, USE_FOR, DOT)
            k_cur = tl.load(KN + x * stride_knr + g * stride_kng + d)
            v_cur = tl.load(VN + x * stride_vnr + g * stride_vng + d)
            s_cur = tl.sum(q.to(tl.float32) * k_cur.to(tl.float32)[None, :], 1) * scale
            m_new = tl.maximum(m_i, s_cur)
            alpha = tl.exp(m_i - m_new)
            p_cur = tl.exp(s_cur - m_new)
            l_i = l_i * alpha + p_cur
            acc = acc * alpha[:, None] + p_cur[:, None] * v_cur.to(tl.float32)[None, :]
            tl.store(k_base + step * D + d, k_cur)  # the keys read above end before `step`: no hazard
            tl.store(v_base + step * D + d, v_cur)
            tl.store(PARTS + x * stride_pr + heads[:, None] * stride_ph + n_splits * stride_ps + d[None, :],
                     acc / l_i[:, None], mask=ok[:, None])
            tl.store(LSE + x * stride_lr + heads * stride_lh + n_splits, m_new + tl.log(l_i), mask=ok)

    @triton.jit(do_not_specialize=["n_splits"])
    def _combine_kernel(PARTS, LSE, OUT, stride_pr, stride_ph, stride_ps, stride_lr, stride_lh,
                        stride_or, stride_oh, n_splits, S_BLOCK: tl.constexpr, D: tl.constexpr):
        x = tl.program_id(0)
        h = tl.program_id(1)
        sl = tl.arange(0, S_BLOCK)
        d = tl.arange(0, D)
        ok = sl <= n_splits  # the S context slices and the branch part
        lse = tl.load(LSE + x * stride_lr + h * stride_lh + sl, mask=ok, other=float("-inf"))
        parts = tl.load(PARTS + x * stride_pr + h * stride_ph + sl[:, None] * stride_ps + d[None, :],
                        mask=ok[:, None], other=0.0)
        w = tl.exp(lse - tl.max(lse, 0))  # the branch part always holds this step's key: max is finite
        out = tl.sum(parts * w[:, None], 0) / tl.sum(w, 0)
        tl.store(OUT + x * stride_or + h * stride_oh + d, out.to(OUT.dtype.element_ty))


    @triton.jit(do_not_specialize=["layer"])
    def _chunk_store_kernel(KN, VN, CMETA, stride_knr, stride_kng, stride_vnr, stride_vng, layer,
                            G: tl.constexpr, D: tl.constexpr):
        """grid (C, G): chunk token j's key and value of kv head g into the context cache at
        start + j (tokens past the chunk's length store nothing: the cache may end there)."""
        j = tl.program_id(0)
        g = tl.program_id(1)
        if j < tl.load(CMETA + _CHUNK_LEN):
            d = tl.arange(0, D)
            elem = KN.dtype.element_ty
            at = ((layer * G + g) * tl.load(CMETA + _CHUNK_CAP) + tl.load(CMETA + _CHUNK_START) + j) * D
            k_base = tl.load(CMETA + _CHUNK_K).to(tl.pointer_type(elem))
            v_base = tl.load(CMETA + _CHUNK_V).to(tl.pointer_type(elem))
            tl.store(k_base + at + d, tl.load(KN + j * stride_knr + g * stride_kng + d))
            tl.store(v_base + at + d, tl.load(VN + j * stride_vnr + g * stride_vng + d))

    @triton.jit
    def _causal_tile(q, k_base, v_base, offs, limit, m_i, l_i, acc, scale, D: tl.constexpr, DOT: tl.constexpr):
        """_online_tile with a bound per query row: row i sees the keys before limit[i]."""
        d = tl.arange(0, D)
        hi = tl.max(limit, 0)
        k = tl.load(k_base + offs[:, None] * D + d[None, :], mask=(offs < hi)[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT) * scale
        s = tl.where(offs[None, :] < limit[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        v = tl.load(v_base + offs[:, None] * D + d[None, :], mask=(offs < hi)[:, None], other=0.0)
        return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT)

    @triton.jit(do_not_specialize=["layer"])
    def _chunk_attention_kernel(Q, OUT, CMETA, stride_qr, stride_qh, stride_or, stride_oh, layer, scale,
                                G: tl.constexpr, P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                                D: tl.constexpr, USE_FOR: tl.constexpr, DOT: tl.constexpr):
        """grid (blocks, G): a block of BLOCK_M query rows (chunk token x query head of kv head
        g) over the context's keys up to each token's own, causal: token j at start + j sees
        [0, start + j]. All P query heads of a token share each loaded K/V tile."""
        b = tl.program_id(0)
        g = tl.program_id(1)
        n = tl.load(CMETA + _CHUNK_LEN)
        first = b * BLOCK_M
        if first < n * P:
            d = tl.arange(0, D)
            local = first + tl.arange(0, BLOCK_M)
            ok = local < n * P
            rows = local // P
            heads = g * P + local % P
            q = tl.load(Q + rows[:, None] * stride_qr + heads[:, None] * stride_qh + d[None, :], mask=ok[:, None],
                        other=0.0)
            start = tl.load(CMETA + _CHUNK_START)
            limit = start + tl.minimum(rows, n - 1) + 1
            hi = tl.max(limit, 0)
            elem = Q.dtype.element_ty
            head_off = (layer * G + g) * tl.load(CMETA + _CHUNK_CAP) * D
            k_base = tl.load(CMETA + _CHUNK_K).to(tl.pointer_type(elem)) + head_off
            v_base = tl.load(CMETA + _CHUNK_V).to(tl.pointer_type(elem)) + head_off
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, D], tl.float32)
            if USE_FOR:
                for lo in range(0, hi, BLOCK_K):
                    m_i, l_i, acc = _causal_tile(q, k_base, v_base, lo + tl.arange(0, BLOCK_K), limit, m_i, l_i, acc,
                                                 scale, D, DOT)
            else:  # the interpreter (see _attend_range)
                lo = 0
                while lo < hi:
                    m_i, l_i, acc = _causal_tile(q, k_base, v_base, lo + tl.arange(0, BLOCK_K), limit, m_i, l_i, acc,
                                                 scale, D, DOT)
                    lo += BLOCK_K
            out = acc / l_i[:, None]  # every row sees key 0 at least: l_i > 0
            tl.store(OUT + rows[:, None] * stride_or + heads[:, None] * stride_oh + d[None, :],
                     out.to(OUT.dtype.element_ty), mask=ok[:, None])


def chunk_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, cmeta: torch.Tensor, layer: int,
                    scale: float) -> torch.Tensor:
    """Layer `layer` of a prefill chunk riding a decode step: q (C, H, D), its k_new, v_new
    (C, G, D), cmeta (CHUNK_FIELDS + C,) int64 on q's device (the context cache's addresses,
    capacity, the chunk's start and length). Stores the chunk's keys and values into the
    context cache at [start, start + length), then attends causally over [0, start + j] for
    token j. Returns (C, H, D) in q's dtype (rows past the length undefined). Two launches,
    no sync: the shape is C's, whatever the start and length, so a CUDA graph replays it."""
    if not AVAILABLE:
        raise RuntimeError("chunk_attention needs the triton package")
    c, h, d = q.shape
    g = k_new.shape[1]
    if d & (d - 1) or d < 16 or h % g or cmeta.shape != (CHUNK_FIELDS + c,) or cmeta.dtype != torch.int64:
        raise ValueError(f"inconsistent chunk inputs: q {tuple(q.shape)}, k {tuple(k_new.shape)}, "
                         f"cmeta {tuple(cmeta.shape)} {cmeta.dtype}")
    for t in (q, k_new, v_new):
        if t.stride(-1) != 1:
            raise ValueError("the last dimension of q, k_new and v_new must be contiguous")
    p = h // g
    _chunk_store_kernel[(c, g)](k_new, v_new, cmeta, k_new.stride(0), k_new.stride(1), v_new.stride(0),
                                v_new.stride(1), layer, G=g, D=d, num_warps=1)
    out = torch.empty(c, h, d, device=q.device, dtype=q.dtype)
    block_m = 64
    _chunk_attention_kernel[(-(-(c * p) // block_m), g)](
        q, out, cmeta, q.stride(0), q.stride(1), out.stride(0), out.stride(1), layer, scale,
        G=g, P=p, BLOCK_M=block_m, BLOCK_K=64, D=d, USE_FOR=q.is_cuda,
        DOT="ieee" if q.dtype == torch.float32 else None, num_warps=4)
    return out


def fill_chunk_meta(cmeta: np.ndarray, context_k: torch.Tensor, context_v: torch.Tensor, start: int,
                    tokens: Sequence[int]) -> None:
    """cmeta (CHUNK_FIELDS + C,) int64 in host memory for a chunk of len(tokens) <= C new
    tokens at `start` of a context cache (L, G, cap, D), contiguous; no tokens: an empty
    chunk (the graph's padding: nothing stored, nothing read)."""
    c = cmeta.shape[0] - CHUNK_FIELDS
    n = len(tokens)
    if n > c:
        raise ValueError(f"a chunk of {n} tokens does not fit {c}")
    if n:
        if not (context_k.is_contiguous() and context_v.is_contiguous()):
            raise ValueError("a fused chunk needs contiguous context caches")
        cap = context_k.shape[2]
        if start + n > cap:
            raise ValueError(f"a chunk to {start + n} tokens does not fit the cache's {cap}")
        cmeta[:CHUNK_FIELDS] = (context_k.data_ptr(), context_v.data_ptr(), cap, start, n)
    else:
        cmeta[:CHUNK_FIELDS] = (0, 0, 1, 0, 0)
    cmeta[CHUNK_FIELDS:] = 0
    cmeta[CHUNK_FIELDS:CHUNK_FIELDS + n] = [int(t) for t in tokens]


@dataclass(frozen=True)
class VarlenPlan:
    """The launch shape for a batch of `slots` rows: constant for a CUDA graph's bucket."""

    slots: int  # rows (and request slots) the launch covers
    n_splits: int  # slices of every context
    block_q: int  # query rows (row x query head of one kv head) of one context program
    row_blocks: int  # context programs per slice of one request, to cover its rows
    heads_per_kv: int  # P

    @property
    def max_request_rows(self) -> int:
        """The most rows one request may have in this launch."""
        return self.block_q * self.row_blocks // self.heads_per_kv


def plan_varlen(slots: int, max_request_rows: int, n_heads: int, kv_heads: int, sm_count: int) -> VarlenPlan:
    """About two blocks per SM when the slots are few requests with long contexts; one
    slice each when there are many requests (they fill the GPU by themselves)."""
    p = n_heads // kv_heads
    rows = max(1, min(slots, max_request_rows))
    block_q = min(64, max(16, next_pow2(rows * p)))
    row_blocks = -(-(rows * p) // block_q)
    # a typist's keystroke decodes a few candidates; row blocks past a request's rows exit
    # at once, so a request of few rows keeps only its first busy: they do not count here
    requests_guess = max(1, slots // 4)
    n_splits = max(1, min(64, -(-2 * sm_count // (kv_heads * requests_guess))))
    return VarlenPlan(slots, n_splits, block_q, row_blocks, p)


def varlen_bifurcated_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, meta: torch.Tensor,
                                layer: int, plan: VarlenPlan, scale: float, block_k: int | None = None,
                                num_warps: int | None = None, combine_warps: int | None = None) -> torch.Tensor:
    """q (slots, H, D), this step's k_new, v_new (slots, G, D), meta (FIELDS, slots) int64 on
    q's device: layer `layer` of a batched decode step. Stores k_new/v_new at each row's
    branch step; returns (slots, H, D) in q's dtype. Launches two kernels, syncs nothing.
    block_k, num_warps, combine_warps: the launch shape (None: what a sweep over the 7B
    shape's cases chose on an H200, docs/results/batching.md: 4 warps, 64-key tiles, 4
    warps to combine 32 or more slices; 8 warps for 64-row blocks were up to 1.7x slower)."""
    if not AVAILABLE:
        raise RuntimeError("varlen_bifurcated_attention needs the triton package")
    slots, h, d = q.shape
    g = k_new.shape[1]
    if d & (d - 1) or d < 16:
        raise ValueError(f"head size {d}: the Triton kernel needs a power of two >= 16")
    if h % g or meta.shape != (FIELDS, slots) or meta.dtype != torch.int64 or slots != plan.slots:
        raise ValueError(f"inconsistent varlen inputs: q {tuple(q.shape)}, k {tuple(k_new.shape)}, "
                         f"meta {tuple(meta.shape)} {meta.dtype}, plan for {plan.slots} slots")
    for t in (q, k_new, v_new):
        if t.stride(-1) != 1:
            raise ValueError("the last dimension of q, k_new and v_new must be contiguous")
    meta = meta.contiguous()
    p = h // g
    s = plan.n_splits
    parts = torch.empty(slots, h, s + 1, d, device=q.device, dtype=torch.float32)
    lse = torch.empty(slots, h, s + 1, device=q.device, dtype=torch.float32)
    block_k = block_k or (64 if d >= 128 or plan.block_q >= 64 else 128)
    _partial_kernel[(slots, g, s * plan.row_blocks + 1)](
        q, k_new, v_new, meta, parts, lse,
        q.stride(0), q.stride(1), k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        parts.stride(0), parts.stride(1), parts.stride(2), lse.stride(0), lse.stride(1),
        slots, layer, s, plan.row_blocks, scale,
        G=g, P=p, BLOCK_Q=plan.block_q, BLOCK_P=max(16, next_pow2(p)), BLOCK_K=block_k, D=d,
        USE_FOR=q.is_cuda, DOT="ieee" if q.dtype == torch.float32 else None,
        num_warps=num_warps or 4)
    out = torch.empty(slots, h, d, device=q.device, dtype=q.dtype)
    _combine_kernel[(slots, h)](
        parts, lse, out, parts.stride(0), parts.stride(1), parts.stride(2), lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1), s, S_BLOCK=max(2, next_pow2(s + 1)), D=d,
        num_warps=combine_warps or (4 if s >= 32 else 1))
    return out


@dataclass
class VarlenRequest:
    """One request's part of a batched step: its context K/V (L, G, cap, D) holding
    `context_len` tokens, its branch K/V (L, N, G, cap_b, D) at `step`. Both contiguous.
    Branch None: one row whose branch is the context itself from context_len on, so that
    step t reads the context's tokens [0, context_len + t) and writes token context_len + t
    into it (a short prefill, one token a step, through the decode graph)."""

    context_k: torch.Tensor
    context_v: torch.Tensor
    context_len: int
    branch_k: torch.Tensor | None
    branch_v: torch.Tensor | None
    step: int
    tokens: Sequence[int] = ()  # this step's token per row (the runtime's embedding input)


def fill_meta(meta: np.ndarray, requests: Sequence[VarlenRequest], scratch_k: torch.Tensor, scratch_v: torch.Tensor,
              plain: bool = False) -> int:
    """Write the step's rows into meta (FIELDS, slots) int64 (host memory); returns the
    number of rows. plain: every row a request of its own over the same context (read
    once per row). Rows past the batch point at scratch (L, 1, G, 1, D). Plain Python
    lists, one numpy write per field: this runs before every replay."""
    slots = meta.shape[1]
    per_row = {f: [] for f in (TOKEN, POSITION, BRANCH_K, BRANCH_V, BRANCH_LAYER_STRIDE, BRANCH_CAP, STEP)}
    per_request = {f: [] for f in (CONTEXT_K, CONTEXT_V, CONTEXT_CAP, CONTEXT_LEN, ROW_START, N_ROWS)}
    r = 0
    for req in requests:
        ck, cv, bk, bv = req.context_k, req.context_v, req.branch_k, req.branch_v
        in_context = bk is None
        if not (ck.is_contiguous() and cv.is_contiguous() and (in_context or (bk.is_contiguous()
                                                                               and bv.is_contiguous()))):
            raise ValueError("varlen decode needs contiguous context and branch caches")
        _, g, cap, d = ck.shape
        elem = ck.element_size()
        if in_context:  # the context's own layout: (L, G, cap, D) from token context_len on
            n = 1
            if req.context_len + req.step >= cap:
                raise ValueError("the context cache is full")
            offset = req.context_len * d * elem
            k_rows, v_rows = [ck.data_ptr() + offset], [cv.data_ptr() + offset]
            layer_stride, branch_cap = g * cap * d, cap
        else:
            n, branch_cap = bk.shape[1], bk.shape[3]
            row_bytes = bk.shape[2] * branch_cap * bk.shape[4] * bk.element_size()
            k0, v0 = bk.data_ptr(), bv.data_ptr()
            k_rows = [k0 + j * row_bytes for j in range(n)]
            v_rows = [v0 + j * row_bytes for j in range(n)]
            layer_stride = n * bk.shape[2] * branch_cap * bk.shape[4]
        if r + n > slots:
            raise ValueError(f"{r + n} rows do not fit {slots} slots")
        tokens = [int(t) for t in req.tokens] if len(req.tokens) else [0] * n
        if len(tokens) != n:
            raise ValueError(f"{len(tokens)} tokens for {n} rows")
        per_row[TOKEN] += tokens
        per_row[POSITION] += [req.context_len + req.step] * n
        per_row[BRANCH_K] += k_rows
        per_row[BRANCH_V] += v_rows
        per_row[BRANCH_LAYER_STRIDE] += [layer_stride] * n
        per_row[BRANCH_CAP] += [branch_cap] * n
        per_row[STEP] += [req.step] * n
        owners = [(r + j, 1) for j in range(n)] if plain else [(r, n)]
        per_request[CONTEXT_K] += [ck.data_ptr()] * len(owners)
        per_request[CONTEXT_V] += [cv.data_ptr()] * len(owners)
        per_request[CONTEXT_CAP] += [cap] * len(owners)
        per_request[CONTEXT_LEN] += [req.context_len] * len(owners)
        per_request[ROW_START] += [start for start, _ in owners]
        per_request[N_ROWS] += [count for _, count in owners]
        r += n
    pad = slots - r  # padding rows: the scratch branch; padding request slots: no rows
    padding = {TOKEN: 0, POSITION: 0, BRANCH_K: scratch_k.data_ptr(), BRANCH_V: scratch_v.data_ptr(),
               BRANCH_LAYER_STRIDE: scratch_k[0].numel(), BRANCH_CAP: 1, STEP: 0}
    table = [None] * FIELDS
    for f, values in per_row.items():
        table[f] = values + [padding[f]] * pad
    for f, values in per_request.items():
        table[f] = values + [0] * (slots - len(values))
    meta[:] = table  # one conversion for the whole table
    return r
