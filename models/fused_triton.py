"""Fused RMSNorm and RoPE for inference on CUDA (Triton; CPU through TRITON_INTERPRET=1).

A decode step of a small batch is launch-bound: written as PyTorch ops, RMSNorm is nine
kernels (casts, square, mean, rsqrt, two products, cast back) and RoPE ten per tensor,
so about 40 of a layer's ~55 kernels do almost no work. Each function here is one kernel
with the same arithmetic as the PyTorch version in model.py (float32 inside, the input's
dtype out). model.py uses them on CUDA when no gradient is needed; `set_enabled(False)`
turns them off (benchmarks compare both).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    tl = None

AVAILABLE = triton is not None
_enabled = AVAILABLE and os.environ.get("CODECOMPLETE_FUSED_KERNELS", "1") != "0"


def set_enabled(on: bool) -> None:
    """Use the fused kernels on CUDA (when Triton is installed) or the PyTorch ops."""
    global _enabled
    _enabled = bool(on) and AVAILABLE


def use_for(x: torch.Tensor) -> bool:
    """Whether x should take the fused path: CUDA, inference, kernels on."""
    return _enabled and x.is_cuda and not (x.requires_grad and torch.is_grad_enabled())


if AVAILABLE:

    @triton.jit
    def _rmsnorm_kernel(X, W, Y, stride_x, stride_y, dim, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        c = tl.arange(0, BLOCK)
        ok = c < dim
        x = tl.load(X + row * stride_x + c, mask=ok, other=0.0).to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(x * x, 0) / dim + eps)
        w = tl.load(W + c, mask=ok, other=0.0).to(tl.float32)
        tl.store(Y + row * stride_y + c, (x * inv * w).to(Y.dtype.element_ty), mask=ok)

    @triton.jit
    def _rope_kernel(X, COS, SIN, Y, heads, seq, sxb, sxh, sxt, stride_ct, HALF: tl.constexpr):
        pid = tl.program_id(0)  # (b, h, t) flattened
        t = pid % seq
        h = (pid // seq) % heads
        b = pid // (seq * heads)
        c = tl.arange(0, HALF)
        base = X + b * sxb + h * sxh + t * sxt
        x1 = tl.load(base + c).to(tl.float32)
        x2 = tl.load(base + HALF + c).to(tl.float32)
        cos = tl.load(COS + t * stride_ct + c)
        sin = tl.load(SIN + t * stride_ct + c)
        out = Y + pid * 2 * HALF
        tl.store(out + c, (x1 * cos - x2 * sin).to(Y.dtype.element_ty))
        tl.store(out + HALF + c, (x2 * cos + x1 * sin).to(Y.dtype.element_ty))


if AVAILABLE:

    @triton.jit
    def _silu_mul_kernel(G, U, Y, stride_g, stride_u, cols, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = c < cols
        g = tl.load(G + row * stride_g + c, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(U + row * stride_u + c, mask=ok, other=0.0).to(tl.float32)
        y = g / (1.0 + tl.exp(-g)) * u
        tl.store(Y + row * cols + c, y.to(Y.dtype.element_ty), mask=ok)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in one kernel (float32 inside); gate/up may be halves of one tensor."""
    cols = gate.shape[-1]
    g2, u2 = gate.reshape(-1, cols), up.reshape(-1, cols)
    if g2.stride(-1) != 1 or u2.stride(-1) != 1:
        g2, u2 = g2.contiguous(), u2.contiguous()
    y = torch.empty(g2.shape, dtype=gate.dtype, device=gate.device)
    if y.numel():
        block = 1024
        _silu_mul_kernel[(g2.shape[0], triton.cdiv(cols, block))](g2, u2, y, g2.stride(0), u2.stride(0), cols,
                                                                  BLOCK=block, num_warps=4)
    return y.view(gate.shape)


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension; float32 arithmetic, x's dtype out."""
    dim = x.shape[-1]
    rows = x.reshape(-1, dim)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    y = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    if rows.shape[0]:
        block = next_pow2(dim)
        _rmsnorm_kernel[(rows.shape[0],)](rows, weight, y, rows.stride(0), y.stride(0), dim, eps,
                                          BLOCK=block, num_warps=4 if block <= 2048 else 8)
    return y.view(x.shape)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) (any strides, D contiguous) by cos/sin (T, D/2) float32; the
    half-split layout of model.apply_rope. Returns a contiguous (B, H, T, D) tensor."""
    b, h, t, d = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos = cos.float().contiguous()
    sin = sin.float().contiguous()
    y = torch.empty((b, h, t, d), dtype=x.dtype, device=x.device)
    if y.numel():
        _rope_kernel[(b * h * t,)](x, cos, sin, y, h, t, x.stride(0), x.stride(1), x.stride(2), cos.stride(0),
                                   HALF=d // 2, num_warps=1)
    return y
